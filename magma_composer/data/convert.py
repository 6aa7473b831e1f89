"""Converts an ImageFolder tree of images (ImageNet's layout) to MDS shards for ``StreamingImageDataset``.

Usage::

    python -m magma_composer.data.convert --src /data/imagenet/train --out /data/mds/imagenet/train --workers 8
    python -m magma_composer.data.convert --src /data/imagenet/train --out s3://bucket/imagenet/train \\
        --staging /scratch/mds-staging --workers 16      # S3-compatible stores: set S3_ENDPOINT_URL

Input: ``SRC/<class>/<image>`` (images may sit in sub-folders of a class folder). Classes are the sorted
sub-folder names of ``SRC`` and a class's index is its position in that order, as in torchvision's
``ImageFolder`` (so ImageNet's synset folders give the usual indices). Files are found recursively and taken
in sorted order when their extension (any case) is one of ``IMAGE_EXTENSIONS`` (.jpg .jpeg .png .ppm .bmp .pgm
.tif .tiff .webp); other files are ignored and counted in the manifest.

Output: MDS shards with the columns ``x`` (``bytes``: JPEG), ``y`` (``int``: class index) and ``i`` (``int``:
the file's position in the sorted listing of all image files, a stable sample id; readers that only know
``x`` and ``y`` ignore it), a top-level ``index.json``, and ``manifest.json`` (classes, images per class, the
source, the options, the skipped files). Every shard carries ``sha1`` and ``xxh64`` hashes, so readers can
pass ``validate_hash='xxh64'``.

Images:

* A file that already is an RGB JPEG is stored byte for byte (after a full decode that proves it readable),
  unless ``--resize`` is given.
* Anything else (PNG, greyscale, CMYK, palette, images with alpha) is converted to RGB the way torchvision's
  loader does (``convert('RGB')``, alpha dropped) and re-encoded as JPEG at ``--quality``.
* ``--resize S`` scales every image so its shorter side is ``S`` pixels (up or down, bicubic) and re-encodes it.
* A corrupt or unreadable file stops the conversion with an error naming its path; with ``--skip-bad`` it is
  skipped instead, printed, and listed in the manifest.
* An empty class folder (no image files) stops the conversion with an error naming the folder; with
  ``--allow-empty-classes`` it is kept as a class with zero images, so the other classes keep their indices.

Resuming: files are written in chunks of ``--chunk-files`` (in listing order), each an MDS folder
``chunk-NNNNN/`` closed by a ``done.json`` marker. Run the same command again after an interruption: finished
chunks (whose marker matches the listing and the options) are skipped, an unfinished one is rewritten. The
top-level ``index.json`` (the chunks' shards, merged) and ``manifest.json`` come last, so a data set is
readable only once it is complete.

Workers: ``--workers N`` decodes and encodes images in N processes, in order, feeding one ``MDSWriter`` per
chunk in the main process: the output is the same for every N.

Remote output (``--out s3://bucket/prefix``): each chunk is written under ``--staging`` (a temporary folder by
default), uploaded in a background thread while the next chunk is encoded (shards, then the chunk index, then
the marker), and its staged copy deleted (``--keep-staging`` keeps it).

Exit codes: 0 done; 1 an unreadable image or a storage error; 2 bad command-line input.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

from PIL import Image
from tqdm import tqdm

from magma_composer.data.storage import RemoteDataError, is_remote, join_url, list_names, read_json, write_bytes

__all__ = [
    "COLUMNS",
    "DEFAULT_HASHES",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ConversionError",
    "SourceListing",
    "convert_image_folder",
    "encode_image",
    "list_image_folder",
    "main",
]

#: File extensions taken as images (compared in lower case), as torchvision's ``ImageFolder`` does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: MDS columns written by the converter.
COLUMNS = {"x": "bytes", "y": "int", "i": "int"}
#: Shard hashes written by default (sorted, as ``MDSWriter`` requires).
DEFAULT_HASHES = ("sha1", "xxh64")

INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.json"
DONE_NAME = "done.json"
CHUNK_PREFIX = "chunk-"
_FORMAT = "magma_composer.convert/1"


class ConversionError(ValueError):
    """Bad input to the converter: options, the source tree, or an output that holds something else."""


class BadImageError(RuntimeError):
    """An image file cannot be read or decoded; the message names it."""


@dataclass
class SourceListing:
    """The images of an ImageFolder tree, in conversion order.

    Attributes:
        root: the source folder.
        classes: class names (sorted folder names); a class's index is its position here.
        files: ``(path relative to root, class index)`` per image, in order; a file's position is its ``i``.
        ignored: number of files skipped for their extension.
        empty_classes: class folders without any image file.
    """

    root: Path
    classes: list[str]
    files: list[tuple[str, int]]
    ignored: int = 0
    empty_classes: list[str] = field(default_factory=list)


def list_image_folder(
    src: Union[str, os.PathLike],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    allow_empty_classes: bool = False,
) -> SourceListing:
    """Lists the images of ``src/<class>/...`` in sorted order.

    Args:
        src: the source folder; its sub-folders are the classes (hidden ones, starting with ``.``, are skipped).
        extensions: image file extensions, compared in lower case.
        allow_empty_classes: keep class folders without images (as classes with zero images) instead of failing.

    Raises:
        ConversionError: ``src`` is not a folder, has no class folders, or (without ``allow_empty_classes``)
            a class folder holds no image file.
    """
    root = Path(src)
    if not root.is_dir():
        raise ConversionError(f"--src {str(src)!r} is not a folder (expected SRC/<class>/<image> files)")
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConversionError(
            f"--src {str(src)!r} has no class folders: expected one sub-folder per class holding its images "
            f"(ImageNet's layout, SRC/<class>/<image>)"
        )
    files: list[tuple[str, int]] = []
    ignored = 0
    empty = []
    for label, name in enumerate(classes):
        found = 0
        for folder, _, names in sorted(os.walk(root / name, followlinks=True)):  # torchvision's order
            for fname in sorted(names):
                if fname.lower().endswith(extensions):
                    files.append((os.path.relpath(os.path.join(folder, fname), root), label))
                    found += 1
                else:
                    ignored += 1
        if found == 0:
            empty.append(name)
    if empty and not allow_empty_classes:
        raise ConversionError(
            f"class folder(s) without images ({', '.join(extensions)}): "
            f"{', '.join(str(root / n) for n in empty)}; remove them, or pass --allow-empty-classes "
            f"(allow_empty_classes=True) to keep them as classes with zero images so that class indices still match"
        )
    if not files:
        raise ConversionError(f"--src {str(src)!r} holds no image files ({', '.join(extensions)})")
    return SourceListing(root=root, classes=classes, files=files, ignored=ignored, empty_classes=empty)


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new = (size, max(1, round(height * scale))) if width <= height else (max(1, round(width * scale)), size)
    return image if new == image.size else image.resize(new, Image.Resampling.BICUBIC)


def encode_image(path: Union[str, os.PathLike], resize: int | None = None, quality: int = 90) -> tuple[bytes, bool]:
    """Reads one image file and returns JPEG bytes for the ``x`` column.

    An RGB JPEG is returned byte for byte when ``resize`` is ``None``; anything else is converted to RGB,
    resized (shorter side to ``resize``) when asked, and encoded as JPEG at ``quality``.

    Args:
        path: the image file.
        resize: the shorter side in pixels, or ``None`` to keep the size.
        quality: JPEG quality for re-encoded images (1 to 95).

    Returns:
        ``(jpeg_bytes, reencoded)``.

    Raises:
        BadImageError: the file cannot be read or decoded, naming ``path``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: truncated or corrupt files fail here
            if resize is None and image.format == "JPEG" and image.mode == "RGB":
                return data, False
            rgb = image.convert("RGB")
        if resize is not None:
            rgb = _resize_shorter_side(rgb, resize)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality)
        return out.getvalue(), True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


def _pool_worker_init() -> None:
    """Default SIGTERM and ignored SIGINT in a converter worker.

    A forked worker inherits its parent's Python signal handlers (Composer installs one for SIGTERM on import).
    Once, in a run of the test suite, a worker blocked on the task queue's lock survived ``Pool.terminate``'s
    SIGTERM with the inherited handler, and the pool waited for it forever. Ctrl-C is the parent's to handle.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_job(job: tuple[str, int | None, int]) -> tuple[bytes | None, bool, str | None]:
    """Pool task: ``(bytes, reencoded, None)`` or ``(None, False, error message)``."""
    path, resize, quality = job
    try:
        data, reencoded = encode_image(path, resize, quality)
    except BadImageError as error:
        return None, False, str(error)
    return data, reencoded, None


def _chunk_name(k: int) -> str:
    return f"{CHUNK_PREFIX}{k:05d}"


def _fingerprint(listing: SourceListing, start: int, files: Sequence[tuple[str, int]], options: dict) -> str:
    payload = json.dumps(
        {"format": _FORMAT, "classes": listing.classes, "start": start, "files": list(files), "options": options},
        sort_keys=True,
    )
    return hashlib.sha1(payload.encode()).hexdigest()


def _validate_options(
    resize: int | None, quality: int, shard_size: Union[int, str], compression: str | None, hashes: Sequence[str]
) -> tuple[int, list[str]]:
    from streaming.base.compression import get_compressions, is_compression
    from streaming.base.hashing import get_hashes, is_hash
    from streaming.base.util import bytes_to_int

    if resize is not None and (not isinstance(resize, int) or resize < 1):
        raise ConversionError(f"--resize must be a positive number of pixels (the shorter side), got {resize!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ConversionError(f"--quality must be an integer from 1 to 95, got {quality!r}")
    try:
        size = bytes_to_int(shard_size)
    except (ValueError, TypeError) as error:
        raise ConversionError(
            f"--shard-size {shard_size!r} is not a size (examples: 67108864, '64mb', '1gb')"
        ) from error
    if not 1 <= size < 2**32:
        raise ConversionError(f"--shard-size must be at least 1 byte and under 4 GiB (MDS offsets), got {shard_size!r}")
    if compression and not is_compression(compression):
        raise ConversionError(f"--compression {compression!r} is not valid; choose one of {sorted(get_compressions())}")
    bad = [h for h in hashes if not is_hash(h)]
    if bad:
        raise ConversionError(f"--hashes {bad} not supported; choose from {sorted(get_hashes())}")
    return size, sorted(set(hashes))


def _check_out(out: str, n_chunks: int) -> None:
    """Refuses an output that holds something other than this converter's files, or more chunks than planned."""
    if not is_remote(out) and os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"--out {out} is a file; give a folder (or an s3:// URL)")
    names = list_names(out)
    foreign = [n for n in names if not n.startswith(CHUNK_PREFIX) and n not in (INDEX_NAME, MANIFEST_NAME)]
    if foreign:
        raise ConversionError(
            f"--out {out} is not empty and was not written by this converter (it holds {foreign[:5]}); "
            f"choose an empty folder or prefix"
        )
    extra = [n for n in names if n.startswith(CHUNK_PREFIX) and n >= _chunk_name(n_chunks)]
    if extra:
        raise ConversionError(
            f"--out {out} holds {extra[:3]} from a conversion of a different source or --chunk-files; "
            f"delete --out to start over"
        )


def _check_marker(marker: dict | None, fingerprint: str, where: str) -> bool:
    """Whether a chunk is finished; a marker from another listing or other options is an error."""
    if marker is None:
        return False
    if marker.get("fingerprint") != fingerprint:
        raise ConversionError(
            f"{where} was written from a different source listing or with different options; rerun with the "
            f"original options, or delete --out to start over"
        )
    return True


def _write_chunk(
    folder: Path,
    jobs: list[tuple[str, int | None, int]],
    files: Sequence[tuple[str, int]],
    start: int,
    encode: Callable[[Iterable], Iterator],
    n_classes: int,
    writer_kwargs: dict,
    skip_bad: bool,
    pbar: tqdm,
) -> dict:
    """Writes one chunk folder with its own ``MDSWriter``; returns the chunk's marker (without fingerprint)."""
    from streaming import MDSWriter

    if folder.exists():
        shutil.rmtree(folder)
    counts = [0] * n_classes
    skipped, reencoded = [], 0
    try:
        writer = MDSWriter(out=str(folder), columns=COLUMNS, **writer_kwargs)
        for offset, ((rel, label), (data, was_reencoded, error)) in enumerate(zip(files, encode(jobs))):
            pbar.update(1)
            if error is not None:
                if not skip_bad:
                    raise BadImageError(f"{error}; pass --skip-bad (skip_bad=True) to skip unreadable files")
                skipped.append({"path": rel, "error": error})
                tqdm.write(f"skipped unreadable image: {error}", file=sys.stderr)
                continue
            writer.write({"x": data, "y": label, "i": start + offset})
            counts[label] += 1
            reencoded += int(was_reencoded)
        writer.finish()
        index = json.loads((folder / INDEX_NAME).read_text())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"samples": sum(counts), "class_counts": counts, "reencoded": reencoded, "skipped": skipped, "index": index}


def _upload_chunk(folder: Path, remote: str, marker: bytes, keep_staging: bool) -> None:
    """Uploads a finished chunk: shards, then its index, then the done marker; drops the staged copy."""
    from magma_composer.data.storage import s3_client, upload_file

    client = s3_client()
    names = sorted(n for n in os.listdir(folder) if n not in (INDEX_NAME, DONE_NAME))
    for name in names + [INDEX_NAME]:
        upload_file(str(folder / name), join_url(remote, name), client=client)
    write_bytes(join_url(remote, DONE_NAME), marker, client=client)
    if not keep_staging:
        shutil.rmtree(folder, ignore_errors=True)


def _merged_index(markers: Sequence[dict]) -> dict:
    """The top-level index: every chunk's shards, their file names prefixed with the chunk folder."""
    shards = []
    for k, marker in enumerate(markers):
        for shard in marker["index"]["shards"]:
            shard = json.loads(json.dumps(shard))
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{_chunk_name(k)}/{shard[key]['basename']}"
            shards.append(shard)
    return {"version": 2, "shards": shards}


def convert_image_folder(
    src: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    workers: int = 1,
    resize: int | None = None,
    quality: int = 90,
    shard_size: Union[int, str] = "64mb",
    compression: str | None = None,
    hashes: Sequence[str] = DEFAULT_HASHES,
    chunk_files: int = 10000,
    skip_bad: bool = False,
    allow_empty_classes: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    staging: Union[str, os.PathLike] | None = None,
    keep_staging: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Converts ``src/<class>/<image>`` files to MDS shards in ``out`` (a folder or ``s3://bucket/prefix``).

    See the module docstring for the layout, the image handling, resuming and remote output.

    Args:
        src: the ImageFolder tree.
        out: the output folder or ``s3://`` prefix (``S3_ENDPOINT_URL`` selects an S3-compatible store).
        workers: processes that decode and encode images (``1``: in this process).
        resize: scale images so the shorter side is this many pixels (re-encodes every image).
        quality: JPEG quality of re-encoded images, 1 to 95.
        shard_size: the shard size limit, in bytes or as text (``'64mb'``).
        compression: shard compression (``'zstd'``, ``'zstd:7'``, ...); JPEG bytes gain little from it.
        hashes: hash algorithms written for every shard.
        chunk_files: files per resumable chunk.
        skip_bad: skip unreadable images (listed in the manifest) instead of failing.
        allow_empty_classes: keep class folders without images as classes with zero images.
        extensions: file extensions taken as images.
        staging: local folder for chunks on their way to a remote ``out`` (default: a temporary folder).
        keep_staging: keep staged chunks after their upload.
        progress: show a progress bar.

    Returns:
        The manifest, also written to ``out/manifest.json``.

    Raises:
        ConversionError: bad options or source tree, or an ``out`` that holds something else.
        BadImageError: an unreadable image (without ``skip_bad``).
        RemoteDataError: the remote store cannot be reached or written.
    """
    out = str(out)
    if is_remote(out) and not out.startswith("s3://"):
        raise ConversionError(f"--out {out!r}: the converter writes to local folders and s3:// URLs only")
    if staging is not None and not is_remote(out):
        raise ConversionError(
            "--staging is only used with a remote --out (s3://...); a local --out is written directly"
        )
    if not isinstance(workers, int) or workers < 1:
        raise ConversionError(f"--workers must be a positive integer, got {workers!r}")
    if not isinstance(chunk_files, int) or chunk_files < 1:
        raise ConversionError(f"--chunk-files must be a positive integer, got {chunk_files!r}")
    size_limit, hashes = _validate_options(resize, quality, shard_size, compression, hashes)
    listing = list_image_folder(src, extensions, allow_empty_classes)
    options = {
        "resize": resize,
        "quality": quality,
        "shard_size": size_limit,
        "compression": compression,
        "hashes": hashes,
        "chunk_files": chunk_files,
        "extensions": sorted(extensions),
    }  # what the shards depend on: a chunk written with other options is not reused
    writer_kwargs = {"compression": compression, "hashes": hashes, "size_limit": size_limit}
    starts = list(range(0, len(listing.files), chunk_files))
    remote = is_remote(out)
    _check_out(out, len(starts))
    if remote:
        staging_root = Path(staging) if staging is not None else Path(tempfile.mkdtemp(prefix="mds-staging-"))
        own_staging = staging is None
    else:
        staging_root, own_staging = Path(out), False
    staging_root.mkdir(parents=True, exist_ok=True)

    # Fork (where the platform has it) needs no `if __name__ == "__main__"` guard in the caller's script; the pool
    # starts here, before this function starts any thread, and its workers only run PIL.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, _pool_worker_init) if workers > 1 else None
    uploads: list[concurrent.futures.Future] = []
    uploader = concurrent.futures.ThreadPoolExecutor(max_workers=1) if remote else None

    def encode(jobs: Iterable) -> Iterator:
        return pool.imap(_encode_job, jobs, chunksize=8) if pool is not None else map(_encode_job, jobs)

    markers: list[dict] = []
    interrupted = failed = False
    pbar = tqdm(total=len(listing.files), unit="img", desc="convert", disable=not progress, dynamic_ncols=True)
    try:
        for k, start in enumerate(starts):
            files = listing.files[start : start + chunk_files]
            fingerprint = _fingerprint(listing, start, files, options)
            name = _chunk_name(k)
            marker = read_json(join_url(out, name, DONE_NAME))
            if _check_marker(marker, fingerprint, join_url(out, name)):
                markers.append(marker)
                pbar.update(len(files))
                if remote and not keep_staging:
                    shutil.rmtree(staging_root / name, ignore_errors=True)  # a stale staged copy
                continue
            folder = staging_root / name
            local_marker = read_json(str(folder / DONE_NAME)) if remote else None
            if remote and local_marker is not None and local_marker.get("fingerprint") == fingerprint:
                marker = local_marker  # staged by an earlier run, never uploaded
                pbar.update(len(files))
            else:
                jobs = [(str(listing.root / rel), resize, quality) for rel, _ in files]
                n_classes = len(listing.classes)
                marker = _write_chunk(folder, jobs, files, start, encode, n_classes, writer_kwargs, skip_bad, pbar)
                marker = {"fingerprint": fingerprint, "start": start, "files": len(files), **marker}
                write_bytes(str(folder / DONE_NAME), json.dumps(marker).encode())
            markers.append(marker)
            if remote:
                for future in [f for f in uploads if f.done()]:
                    future.result()  # re-raise an upload failure now rather than after the last chunk
                pending = [f for f in uploads if not f.done()]
                if len(pending) >= 2:  # at most two finished chunks wait on disk for their upload
                    concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                payload = json.dumps(marker).encode()
                uploads.append(uploader.submit(_upload_chunk, folder, join_url(out, name), payload, keep_staging))
        for future in uploads:
            future.result()
    except BaseException as error:
        interrupted, failed = isinstance(error, KeyboardInterrupt), True
        raise
    finally:
        pbar.close()
        if pool is not None:
            if failed:
                pool.terminate()  # workers may be mid-task; their signal handlers are the defaults (see init)
            else:
                pool.close()  # every task is done: the workers leave on their own
            pool.join()
        if uploader is not None:  # finish the uploads of finished chunks, unless interrupted by the user
            uploader.shutdown(wait=True, cancel_futures=interrupted)
        if own_staging:
            shutil.rmtree(staging_root, ignore_errors=True)

    counts = [sum(m["class_counts"][c] for m in markers) for c in range(len(listing.classes))]
    skipped = [s for m in markers for s in m["skipped"]]
    if sum(counts) == 0:
        raise ConversionError(f"no readable images in {src}: all {len(skipped)} image files were skipped")
    manifest = {
        "format": _FORMAT,
        "source": str(Path(src).resolve()),
        "out": out,
        "columns": COLUMNS,
        "classes": listing.classes,
        "class_counts": dict(zip(listing.classes, counts)),
        "samples": sum(counts),
        "listed_files": len(listing.files),
        "reencoded": sum(m["reencoded"] for m in markers),
        "skipped": skipped,
        "num_skipped": len(skipped),
        "ignored_files": listing.ignored,
        "empty_classes": listing.empty_classes,
        "chunks": len(markers),
        "options": {**options, "skip_bad": skip_bad, "allow_empty_classes": allow_empty_classes},
    }
    write_bytes(join_url(out, INDEX_NAME), json.dumps(_merged_index(markers), sort_keys=True).encode())
    write_bytes(join_url(out, MANIFEST_NAME), json.dumps(manifest, indent=2).encode())
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m magma_composer.data.convert",
        description="Convert an ImageFolder tree (SRC/<class>/<image>, ImageNet's layout) to MDS shards "
        "(columns x: JPEG bytes, y: class index, i: sample id) for StreamingImageDataset.",
        epilog=__doc__[__doc__.index("Input:") :].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="the ImageFolder tree: SRC/<class>/<image>")
    parser.add_argument("--out", required=True, help="output folder, or s3://bucket/prefix (set S3_ENDPOINT_URL)")
    parser.add_argument("--workers", type=int, default=1, help="processes that decode/encode images (default 1)")
    parser.add_argument("--resize", type=int, default=None, help="scale the shorter side to this many pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    parser.add_argument("--shard-size", default="64mb", help="shard size limit: bytes or '64mb' (default 64mb)")
    parser.add_argument("--compression", default=None, help="shard compression, e.g. zstd (default none)")
    parser.add_argument(
        "--hashes", default=",".join(DEFAULT_HASHES), help="comma-separated shard hashes (default sha1,xxh64)"
    )
    parser.add_argument("--chunk-files", type=int, default=10000, help="files per resumable chunk (default 10000)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images, listing them in the manifest")
    parser.add_argument(
        "--allow-empty-classes", action="store_true", help="keep class folders without images as empty classes"
    )
    parser.add_argument("--staging", default=None, help="local staging folder for a remote --out (default: temp)")
    parser.add_argument("--keep-staging", action="store_true", help="keep staged chunks after uploading them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input, 1 for unreadable images or storage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        manifest = convert_image_folder(
            args.src,
            args.out,
            workers=args.workers,
            resize=args.resize,
            quality=args.quality,
            shard_size=args.shard_size,
            compression=args.compression,
            hashes=[h.strip() for h in args.hashes.split(",") if h.strip()],
            chunk_files=args.chunk_files,
            skip_bad=args.skip_bad,
            allow_empty_classes=args.allow_empty_classes,
            staging=args.staging,
            keep_staging=args.keep_staging,
            progress=not args.no_progress,
        )
    except ConversionError as error:
        parser.error(str(error))  # exits with code 2
    except (BadImageError, RemoteDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for item in manifest["skipped"]:
        print(f"skipped: {item['path']}: {item['error']}")
    print(
        f"wrote {manifest['samples']} images in {len(manifest['classes'])} classes to {args.out} "
        f"({manifest['reencoded']} re-encoded, {manifest['num_skipped']} skipped); "
        f"manifest: {join_url(args.out, MANIFEST_NAME)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
