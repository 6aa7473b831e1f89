"""Converts an ImageFolder tree of images (ImageNet's layout) to MDS shards for ``StreamingImageDataset``.

Usage::

    python -m magma_composer.data.convert --src /data/imagenet/train --out /data/mds/imagenet/train --workers 8
    python -m magma_composer.data.convert --src /data/imagenet/train --out s3://bucket/imagenet/train \\
        --staging /scratch/mds-staging --workers 16      # S3-compatible stores: set S3_ENDPOINT_URL

Input: ``SRC/<class>/<image>`` (images may sit in sub-folders of a class folder). Classes are the sorted
sub-folder names of ``SRC`` (hidden ones, starting with ``.``, are skipped) and a class's index is its position
in that order, as in torchvision's ``ImageFolder`` (so ImageNet's synset folders give the usual indices). Files
are found recursively and taken in torchvision's order when their extension (any case) is one of
``IMAGE_EXTENSIONS`` (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp); other files (and anything that is not a
regular file) are not converted and are counted in the manifest (``ignored_files``).

* An image file at the top of ``SRC`` (outside any class folder) has no class: it stops the conversion with an
  error naming it; with ``--skip-bad`` it is left out and listed in the manifest (``outside_classes``).
* Unlabelled images (self-supervised pre-training): ``--unlabelled`` takes every image file under ``SRC``, at
  its top and in any sub-folder, in the same order, without a class: the shards then have no ``y`` column
  (``StreamingImageDataset`` yields label ``-1`` and ``has_labels`` is false, so label-needing callbacks and
  evaluation protocols refuse the data set with a message). A folder that holds images but no sub-folder is
  refused without ``--unlabelled``, with a message that says what was found.
* Symbolic links are followed only while they stay inside ``SRC``. A link that points outside ``SRC``, a link
  that points to nothing, and a link to one of its own ancestor folders (a loop) stop the conversion with an
  error naming each link and its target, before anything is written: pass the real folder as ``--src``, or
  copy the files in.

Output: MDS shards with the columns ``x`` (``bytes``: JPEG), ``y`` (``int``: class index; absent with
``--unlabelled``) and ``i`` (``int``: the file's position in the sorted listing of all image files, a stable sample
id; readers that only know ``x`` and ``y`` ignore it), a top-level ``index.json``, and ``manifest.json`` (classes,
images per class, whether the data set is labelled, the source, the options, the skipped files). Every shard
carries ``sha1`` and ``xxh64`` hashes, so readers can pass ``validate_hash='xxh64'``.

Other sources: :func:`write_listing` writes any :class:`SourceListing` the same way (chunks, resumption, remote
output, manifest), including one whose images are pixel arrays rather than files (``SourceListing.images``,
stored as PNG or JPEG); ``python -m magma_composer.data.prepare`` uses it for data sets distributed as pickles,
binaries and ``.npz`` files.

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

The output is checked before the work: ``--out`` (and ``--staging``) must be empty or hold this converter's
files for the same ``--src`` and options, recorded in ``conversion.json`` once ``--src`` is listed. Anything
else (other files, a conversion of another source or with other options, a file, a place that cannot be
written, a folder inside ``--src``) is refused with an error naming what is there; nothing is overwritten that
this converter did not write for this source.

Resuming: files are written in chunks of ``--chunk-files`` (in listing order), each an MDS folder
``chunk-NNNNN/`` closed by a ``done.json`` marker that records a fingerprint of its source files (relative path,
class, size and modification time in nanoseconds of each) and the options. Run the same command again after an
interruption (Ctrl-C exits with code 130 and keeps the finished chunks): a finished chunk is reused only when
its files are unchanged; a chunk whose files changed (or moved, appeared, disappeared) or that is unfinished is
rewritten, and chunks beyond the current listing are removed. A file changed in place that keeps its size and
modification time (``touch -r``) is not noticed. The top-level ``index.json`` (the chunks' shards, merged) and
``manifest.json`` come last (and are removed before any chunk is rewritten), so a data set is readable only
once it is complete.

Workers: ``--workers N`` decodes and encodes images in N processes, in order, feeding one ``MDSWriter`` per
chunk in the main process: the output is the same for every N.

Remote output (``--out s3://bucket/prefix``): each chunk is written under ``--staging`` (a temporary folder by
default), uploaded in a background thread while the next chunk is encoded (shards, then the chunk index, then
the marker), and its staged copy deleted (``--keep-staging`` keeps it). Every S3 request waits at most
``--timeout`` seconds (default 60) to connect and as long for an answer, three attempts in all: an endpoint that
accepts connections and never answers ends the conversion with an error naming it and the limit.

Exit codes: 0 done; 1 an unreadable image or a storage error; 2 bad command-line input or source tree;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from magma_composer.data.storage import (
    RemoteDataError,
    is_remote,
    is_timeout,
    join_url,
    list_names,
    read_json,
    remove,
    s3_client,
    upload_file,
    write_bytes,
)

__all__ = [
    "ARRAY_FORMATS",
    "COLUMNS",
    "DEFAULT_HASHES",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ConversionError",
    "SourceListing",
    "convert_image_folder",
    "encode_array",
    "encode_image",
    "list_image_folder",
    "main",
    "write_listing",
]

#: File extensions taken as images (compared in lower case), as torchvision's ``ImageFolder`` does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: MDS columns written by the converter (``y`` only for labelled images).
COLUMNS = {"x": "bytes", "y": "int", "i": "int"}
#: How images held as pixel arrays (``SourceListing.images``) are stored: PNG (lossless) or JPEG.
ARRAY_FORMATS = ("png", "jpeg")
#: Shard hashes written by default (sorted, as ``MDSWriter`` requires).
DEFAULT_HASHES = ("sha1", "xxh64")

INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.json"
RECORD_NAME = "conversion.json"
DONE_NAME = "done.json"
CHUNK_PREFIX = "chunk-"
PROG = "python -m magma_composer.data.convert"
_FORMAT = "magma_composer.convert/2"
_OWN_NAMES = (INDEX_NAME, MANIFEST_NAME, RECORD_NAME)
_S3_ATTEMPTS = 3  # attempts per S3 request, each bounded by --timeout
_SHOWN = 10  # offending entries named in one error message


class ConversionError(ValueError):
    """Bad input to the converter: options, the source tree, or an output that holds something else."""


class BadImageError(RuntimeError):
    """An image file cannot be read or decoded; the message names it."""


@dataclass
class SourceListing:
    """The images of a source, in conversion order: an ImageFolder tree, or pixel arrays read from data files.

    Attributes:
        root: the source folder (for ``images``: the data file they come from).
        classes: class names (sorted folder names); a class's index is its position here. Empty when unlabelled.
        files: ``(path relative to root, class index)`` per image, in order; a file's position is its ``i``. The
            class index is ``-1`` when unlabelled. For ``images``, the path is a name for messages
            (``'train[17]'``).
        stats: ``(size in bytes, modification time in ns)`` per image, in the order of ``files`` (for ``images``:
            those of the data file): what a chunk's resumption fingerprint checks.
        ignored: number of files not taken as images (other extensions, not regular files).
        empty_classes: class folders without any image file.
        outside_classes: image files at the top of ``root``, outside any class folder (left out).
        labelled: ``False``: the images have no class, the shards get no ``y`` column.
        images: ``None`` for image files; else ``images[k]`` is the ``H x W x 3`` (or ``H x W``) uint8 array of the
            ``k``-th image (a NumPy array or memory map: read one image at a time).
    """

    root: Path
    classes: list[str]
    files: list[tuple[str, int]]
    stats: list[tuple[int, int]] = field(default_factory=list)
    ignored: int = 0
    empty_classes: list[str] = field(default_factory=list)
    outside_classes: list[str] = field(default_factory=list)
    labelled: bool = True
    images: Any = None


def _plain(text: str) -> str:
    """``text`` without Python object reprs (``<_io.BytesIO object at 0x..>``, ``PosixPath('x')``)."""
    text = re.sub(r"\s*<[^<>]* (?:object )?at 0x[0-9a-fA-F]+>", "", text)
    return re.sub(r"\b(?:Posix|Windows|Pure\w*)?Path\('([^']*)'\)", r"\1", text)


def _os_error_text(error: OSError) -> str:
    """``'Permission denied: /some/path'``: an OS error's reason and file as plain text."""
    if error.strerror and error.filename is not None:
        return f"{error.strerror}: {os.fsdecode(error.filename)}"
    return error.strerror or _plain(str(error)) or type(error).__name__


def _shown(items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _entry_kind(entry: os.DirEntry, root_real: str, ancestors: tuple, problems: list[str]) -> os.stat_result | None:
    """The ``stat`` of what ``entry`` names, following a link only inside ``root_real``; ``None`` (and a line in
    ``problems``) for a link out of the tree, a dangling link, a link to an ancestor folder, or an unreadable entry.
    """
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if not _inside(target, root_real):
            problems.append(f"{entry.path} -> {target} (outside --src)")
            return None
        if not os.path.exists(target):
            problems.append(f"{entry.path} -> {os.readlink(entry.path)} (points to nothing)")
            return None
    try:
        info = entry.stat()
    except OSError as error:
        problems.append(f"{entry.path} ({_os_error_text(error)})")
        return None
    if stat.S_ISDIR(info.st_mode) and (info.st_dev, info.st_ino) in ancestors:
        problems.append(f"{entry.path} -> {os.path.realpath(entry.path)} (a link to its own ancestor folder: a loop)")
        return None
    return info


def _scandir(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise ConversionError(f"cannot list the folder {folder}: {_os_error_text(error)}") from error


def _walk_class(
    top: str, root_real: str, ancestors: tuple, extensions: tuple[str, ...], problems: list[str]
) -> tuple[list[tuple[str, os.stat_result]], int]:
    """Image files under ``top`` in torchvision's order (folders by path, then names), and the count ignored."""
    folders, ignored = [], 0
    stack = [(top, ancestors)]
    while stack:
        folder, chain = stack.pop()
        info = os.stat(folder)
        chain = chain + ((info.st_dev, info.st_ino),)
        files = []
        for entry in _scandir(folder):
            info = _entry_kind(entry, root_real, chain, problems)
            if info is None:
                continue
            if stat.S_ISDIR(info.st_mode):
                stack.append((entry.path, chain))
            elif stat.S_ISREG(info.st_mode) and entry.name.lower().endswith(extensions):
                files.append((entry.name, info))
            else:  # another extension, or a FIFO / socket / device, which reading could block on
                ignored += 1
        folders.append((folder, sorted(files, key=lambda f: f[0])))
    ordered = sorted(folders, key=lambda f: f[0])
    return [(os.path.join(folder, name), info) for folder, files in ordered for name, info in files], ignored


def list_image_folder(
    src: Union[str, os.PathLike],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    allow_empty_classes: bool = False,
    skip_outside: bool = False,
    classes: Sequence[str] | None = None,
    unlabelled: bool = False,
) -> SourceListing:
    """Lists the images of ``src/<class>/...`` in torchvision's order (see the module docstring).

    Args:
        src: the source folder; its sub-folders are the classes (hidden ones, starting with ``.``, are skipped).
        extensions: image file extensions, compared in lower case.
        allow_empty_classes: keep class folders without images (as classes with zero images) instead of failing.
        skip_outside: leave image files at the top of ``src`` out (listed in ``outside_classes``) instead of
            failing.
        classes: only these class folders, in this order (a class's index is its position here); other
            sub-folders are not listed. Default: every sub-folder, sorted.
        unlabelled: list every image under ``src`` (its top first, then each sub-folder in sorted order) without a
            class: ``classes`` is empty, every label ``-1`` and ``labelled`` false.

    Raises:
        ConversionError: ``src`` is not a folder or cannot be listed, has no class folders, lacks one of
            ``classes``, holds symbolic links out of itself, dangling or looping, holds images outside class
            folders (without ``skip_outside``), or (without ``allow_empty_classes``) a class folder holds no image
            file.
    """
    root = Path(src)
    if not root.is_dir():
        raise ConversionError(f"--src {os.fspath(src)} is not a folder (expected SRC/<class>/<image> files)")
    if unlabelled and classes is not None:
        raise ConversionError("classes and unlabelled exclude each other: unlabelled images have no classes")
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    root_real = os.path.realpath(root)
    info = os.stat(root)
    top_chain = ((info.st_dev, info.st_ino),)
    problems: list[str] = []
    folders, outside, ignored = [], [], 0
    outside_stats = {}
    for entry in _scandir(str(root)):
        if entry.name.startswith("."):
            continue
        info = _entry_kind(entry, root_real, top_chain, problems)
        if info is None:
            continue
        if stat.S_ISDIR(info.st_mode):
            folders.append(entry.name)
        elif stat.S_ISREG(info.st_mode) and entry.name.lower().endswith(extensions):
            outside.append(entry.name)
            outside_stats[entry.name] = (info.st_size, info.st_mtime_ns)
        else:
            ignored += 1
    folders.sort()
    outside.sort()
    if unlabelled:
        return _list_unlabelled(root, folders, outside, outside_stats, ignored, root_real, top_chain, extensions)
    if classes is None:
        classes = folders
    else:
        classes = list(classes)
        missing = sorted(set(classes) - set(folders))
        if missing:
            raise ConversionError(
                f"--src {root} lacks {len(missing)} of the {len(classes)} class folders it must hold: {_shown(missing)}"
            )
    files: list[tuple[str, int]] = []
    stats: list[tuple[int, int]] = []
    empty = []
    for label, name in enumerate(classes):
        found, skipped = _walk_class(str(root / name), root_real, top_chain, extensions, problems)
        ignored += skipped
        for path, info in found:
            files.append((os.path.relpath(path, root), label))
            stats.append((info.st_size, info.st_mtime_ns))
        if not found:
            empty.append(name)
    _refuse_links(root, problems)
    if outside and not skip_outside:
        hint = (
            f"; --src has no sub-folders at all: to use these {len(outside)} images without labels "
            f"(self-supervised pre-training), pass --unlabelled (unlabelled=True)"
            if not folders
            else ""
        )
        raise ConversionError(
            f"image file(s) at the top of --src {root}, outside any class folder: {_shown(outside)}; images "
            f"must sit in SRC/<class>/ (move them into their class folder, or pass --skip-bad (skip_bad=True) "
            f"to leave them out, listed in the manifest){hint}"
        )
    if not classes:
        raise ConversionError(
            f"--src {root} has no class folders: expected one sub-folder per class holding its images "
            f"(ImageNet's layout, SRC/<class>/<image>)"
            + (
                f"; to use its {len(outside)} images without labels, pass --unlabelled (unlabelled=True)"
                if outside
                else ""
            )
        )
    if empty and not allow_empty_classes:
        raise ConversionError(
            f"class folder(s) without images ({', '.join(extensions)}): "
            f"{_shown([str(root / n) for n in empty])}; remove them, or pass --allow-empty-classes "
            f"(allow_empty_classes=True) to keep them as classes with zero images so that class indices still match"
        )
    if not files:
        raise ConversionError(f"--src {root} holds no image files ({', '.join(extensions)})")
    return SourceListing(root, classes, files, stats, ignored, empty, outside)


def _refuse_links(root: Path, problems: list[str]) -> None:
    if problems:
        raise ConversionError(
            f"--src {root} holds symbolic links the converter does not follow (it stays inside --src and "
            f"does not loop): {_shown(problems)}; pass the real folder as --src, copy the files in, or remove "
            f"the links"
        )


def _list_unlabelled(
    root: Path,
    folders: list[str],
    outside: list[str],
    outside_stats: dict[str, tuple[int, int]],
    ignored: int,
    root_real: str,
    top_chain: tuple,
    extensions: tuple[str, ...],
) -> SourceListing:
    """Every image under ``root`` without a class: the top's files first, then each sub-folder's (sorted)."""
    problems: list[str] = []
    files = [(name, -1) for name in outside]
    stats = [outside_stats[name] for name in outside]
    for name in folders:
        found, skipped = _walk_class(str(root / name), root_real, top_chain, extensions, problems)
        ignored += skipped
        for path, info in found:
            files.append((os.path.relpath(path, root), -1))
            stats.append((info.st_size, info.st_mtime_ns))
    _refuse_links(root, problems)
    if not files:
        raise ConversionError(f"--src {root} holds no image files ({', '.join(extensions)}), at its top or below")
    return SourceListing(root, [], files, stats, ignored, labelled=False)


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new = (size, max(1, round(height * scale))) if width <= height else (max(1, round(width * scale)), size)
    return image if new == image.size else image.resize(new, Image.Resampling.BICUBIC)


def _image_error_text(error: BaseException) -> str:
    """Why an image could not be read, in words (PIL's messages name the in-memory buffer, not the file)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image format PIL can read (unknown format, or a corrupt header)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _plain(str(error)) or type(error).__name__


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
        BadImageError: the file cannot be read or decoded, naming ``path`` as a plain path.
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
        raise BadImageError(f"cannot read image {os.fspath(path)}: {_image_error_text(error)}") from error


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


def encode_array(pixels: Any, image_format: str = "png", resize: int | None = None, quality: int = 90) -> bytes:
    """Encodes one ``H x W x 3`` (RGB) or ``H x W`` (grey) uint8 array as PNG or JPEG bytes for the ``x`` column.

    PNG keeps every pixel exactly; JPEG at ``quality`` is smaller. ``resize`` scales the shorter side first
    (bicubic), as for image files.

    Raises:
        ValueError: not a uint8 array of that shape, or an unknown ``image_format``.
    """
    import numpy as np

    if image_format not in ARRAY_FORMATS:
        raise ValueError(f"image format {image_format!r} is not one of {', '.join(ARRAY_FORMATS)}")
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"expected an H x W x 3 or H x W uint8 array, got {pixels.dtype} {tuple(pixels.shape)}")
    image = Image.fromarray(pixels)  # uint8 H x W x 3: RGB; H x W: L
    if resize is not None:
        image = _resize_shorter_side(image, resize)
    out = io.BytesIO()
    if image_format == "png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _encode_array_job(job: tuple[Any, str, str, int | None, int]) -> tuple[bytes | None, bool, str | None]:
    """Pool task for a pixel array: ``(bytes, True, None)`` or ``(None, False, error message)``."""
    pixels, name, image_format, resize, quality = job
    try:
        return encode_array(pixels, image_format, resize, quality), True, None
    except ValueError as error:
        return None, False, f"cannot encode image {name}: {error}"


def _chunk_name(k: int) -> str:
    return f"{CHUNK_PREFIX}{k:05d}"


def _chunk_number(name: str) -> int | None:
    digits = name[len(CHUNK_PREFIX) :]
    return int(digits) if name.startswith(CHUNK_PREFIX) and digits.isdigit() else None


def _fingerprint(listing: SourceListing, start: int, count: int, options: dict) -> str:
    """A chunk's identity: its files (relative path, class, size, modification time in ns), classes and options."""
    files = [
        [rel, label, size, mtime]
        for (rel, label), (size, mtime) in zip(
            listing.files[start : start + count], listing.stats[start : start + count]
        )
    ]
    payload = {"format": _FORMAT, "classes": listing.classes, "start": start, "files": files, "options": options}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _validate_options(
    resize: int | None, quality: int, shard_size: Union[int, str], compression: str | None, hashes: Sequence[str]
) -> tuple[int, list[str]]:
    from streaming.base.compression import get_compressions, is_compression
    from streaming.base.hashing import get_hashes, is_hash
    from streaming.base.util import bytes_to_int

    if resize is not None and (not isinstance(resize, int) or isinstance(resize, bool) or resize < 1):
        raise ConversionError(f"--resize must be a positive number of pixels (the shorter side), got {resize!r}")
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 95:
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
        families = ", ".join(sorted({c.split(":")[0] for c in get_compressions()}))
        raise ConversionError(
            f"--compression {compression!r} is not valid; choose one of {families}, optionally with a level "
            f"(zstd:7; levels as the library allows)"
        )
    bad = [h for h in hashes if not is_hash(h)]
    if bad:
        raise ConversionError(f"--hashes {', '.join(bad)} not supported; choose from {', '.join(sorted(get_hashes()))}")
    return size, sorted(set(hashes))


def _check_location(path: str, flag: str, src_real: str) -> None:
    """Refuses an output location that is empty, a URL of another scheme, an s3:// URL without a bucket, a file,
    or a folder that overlaps ``--src``."""
    if not path:
        raise ConversionError(f"{flag} is empty; give a folder (or an s3://bucket/prefix URL)")
    if is_remote(path):
        parsed = urllib.parse.urlparse(path)
        if parsed.scheme != "s3" or not path.startswith("s3://"):
            raise ConversionError(
                f"{flag} {path}: the converter writes to local folders and s3:// URLs only (lower-case s3://; "
                f"for gs:// or other stores, convert to a local folder and copy it)"
            )
        if not parsed.netloc:
            raise ConversionError(f"{flag} {path} names no bucket; expected s3://bucket/prefix")
        return
    if urllib.parse.urlparse(path).scheme == "file":
        raise ConversionError(f"{flag} {path}: give a plain path, not a file:// URL")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"{flag} {path} is a file; give a folder (or an s3:// URL)")
    real = os.path.realpath(path)
    if _inside(real, src_real):
        raise ConversionError(
            f"{flag} {path} lies inside --src {src_real}: its files would be listed as images of a class; "
            f"choose a folder outside --src"
        )
    if _inside(src_real, real):
        raise ConversionError(f"--src {src_real} lies inside {flag} {path}; choose an {flag} apart from --src")


def _check_writable(path: str, flag: str) -> None:
    """Creates and removes an empty folder in ``path`` (or its nearest existing parent), which proves that the
    output can be written there even where permission bits do not tell (root, read-only mounts)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConversionError(f"{flag} {path} cannot be created: {probe} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".convert-probe-", dir=probe))
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConversionError(f"cannot write {flag} {path}: {probe} is not writable ({reason})") from error


def _check_claim(where: str, record: dict, flag: str, client: Any) -> list[str]:
    """Checks that ``where`` is empty or holds this conversion (the same ``record``: source and options).

    Returns:
        the names ``where`` holds.

    Raises:
        ConversionError: ``where`` holds other files, or a conversion of another source or with other options.
    """
    names = list_names(where, client)
    ours = [n for n in names if n in _OWN_NAMES or _chunk_number(n) is not None]
    foreign = [n for n in names if n not in ours and not (n.endswith(".tmp") and n[:-4] in _OWN_NAMES)]
    if foreign:
        raise ConversionError(
            f"{flag} {where} is not empty and was not written by this converter (it holds {_shown(foreign)}); "
            f"choose an empty folder or prefix"
        )
    try:
        existing = read_json(join_url(where, RECORD_NAME), client)
    except ValueError as error:
        raise ConversionError(f"{join_url(where, RECORD_NAME)} is not valid JSON ({error}); delete {where}") from error
    started = [n for n in ours if n != RECORD_NAME]
    if started and not isinstance(existing, dict):
        raise ConversionError(
            f"{flag} {where} holds {_shown(started)} but no {RECORD_NAME}: not a conversion this converter can "
            f"resume (an older version's?); delete {where} to start over, or choose another {flag}"
        )
    if started and existing != record:
        finished = "a finished conversion" if MANIFEST_NAME in names else "an unfinished conversion"
        if existing.get("source") != record["source"] or existing.get("out") != record.get("out"):
            raise ConversionError(
                f"{flag} {where} holds {finished} of --src {existing.get('source')}"
                + (f" for --out {existing.get('out')}" if "out" in existing else "")
                + f", not of --src {record['source']}: choose another {flag}, or delete {where} to start over"
            )
        theirs, now = existing.get("options") or {}, record["options"]
        keys = sorted(set(theirs) | set(now))
        changed = [f"{k}: {theirs.get(k)!r} there, {now.get(k)!r} now" for k in keys if theirs.get(k) != now.get(k)]
        raise ConversionError(
            f"{flag} {where} holds {finished} of the same --src written with different options "
            f"({'; '.join(changed) or existing.get('format')}); rerun with the original options, or delete "
            f"{where} to start over"
        )
    return names


def _read_marker(url: str, client: Any) -> dict | None:
    """A chunk's ``done.json``; ``None`` when missing or unreadable (the chunk is then rewritten)."""
    try:
        marker = read_json(url, client)
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def _write_chunk(
    folder: Path,
    jobs: list[tuple[str, int | None, int]],
    files: Sequence[tuple[str, int]],
    start: int,
    encode: Callable[[Iterable], Iterator],
    n_classes: int | None,
    writer_kwargs: dict,
    skip_bad: bool,
    pbar: tqdm,
) -> dict:
    """Writes one chunk folder with its own ``MDSWriter``; returns the chunk's marker (without fingerprint).

    ``n_classes`` is ``None`` for unlabelled images: no ``y`` column.
    """
    from streaming import MDSWriter

    if folder.exists():
        shutil.rmtree(folder)
    labelled = n_classes is not None
    counts = [0] * (n_classes or 0)
    samples = 0
    skipped, reencoded = [], 0
    columns = COLUMNS if labelled else {k: v for k, v in COLUMNS.items() if k != "y"}
    try:
        writer = MDSWriter(out=str(folder), columns=columns, **writer_kwargs)
        for offset, ((rel, label), (data, was_reencoded, error)) in enumerate(zip(files, encode(jobs))):
            pbar.update(1)
            if error is not None:
                if not skip_bad:
                    raise BadImageError(f"{error}; pass --skip-bad (skip_bad=True) to skip unreadable files")
                skipped.append({"path": rel, "error": error})
                tqdm.write(f"skipped unreadable image: {error}", file=sys.stderr)
                continue
            if labelled:
                writer.write({"x": data, "y": label, "i": start + offset})
                counts[label] += 1
            else:
                writer.write({"x": data, "i": start + offset})
            samples += 1
            reencoded += int(was_reencoded)
        writer.finish()
        index = json.loads((folder / INDEX_NAME).read_text())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"samples": samples, "class_counts": counts, "reencoded": reencoded, "skipped": skipped, "index": index}


def _upload_chunk(folder: Path, remote: str, marker: bytes, keep_staging: bool, replace: bool, client: Any) -> None:
    """Uploads a finished chunk: shards, then its index, then the done marker; drops the staged copy.

    ``replace`` first deletes what an earlier run left under ``remote`` (a chunk whose source files changed).
    """
    if replace:
        remove(remote, client)
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


def _positive_int(value: Any, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConversionError(f"{flag} must be a positive integer, got {value!r}")


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
    unlabelled: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    staging: Union[str, os.PathLike] | None = None,
    keep_staging: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Converts ``src/<class>/<image>`` files to MDS shards in ``out`` (a folder or ``s3://bucket/prefix``).

    See the module docstring for the layout, the image handling, the checks of the output, resuming and remote
    output.

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
        skip_bad: skip unreadable images and images outside class folders (listed in the manifest) instead of
            failing.
        allow_empty_classes: keep class folders without images as classes with zero images.
        unlabelled: take every image under ``src`` without a class (no ``y`` column), sub-folders or not.
        extensions: file extensions taken as images.
        staging: local folder for chunks on their way to a remote ``out`` (default: a temporary folder).
        keep_staging: keep staged chunks after their upload.
        timeout: seconds each S3 request may wait to connect, and again for an answer (3 attempts).
        progress: show a progress bar.

    Returns:
        The manifest, also written to ``out/manifest.json``.

    Raises:
        ConversionError: bad options or source tree, or an ``out`` (or ``staging``) that holds something else or
            cannot be written.
        BadImageError: an unreadable image (without ``skip_bad``).
        RemoteDataError: the remote store cannot be reached, does not answer within ``timeout``, or refuses.
        OSError: a local write fails after the checks (a full disk).
    """
    src, out = os.fspath(src), os.fspath(out)
    if not src:
        raise ConversionError("--src is empty; give the ImageFolder tree (SRC/<class>/<image>)")
    if is_remote(src):
        raise ConversionError(f"--src {src} is a URL; the converter reads a local folder (SRC/<class>/<image>)")
    if not os.path.isdir(src):
        what = "is a file" if os.path.exists(src) else "does not exist"
        raise ConversionError(f"--src {src} {what}; give a folder (expected SRC/<class>/<image> files)")
    if unlabelled and allow_empty_classes:
        raise ConversionError(
            "--allow-empty-classes has no effect with --unlabelled (unlabelled images have no classes)"
        )
    source_options: dict[str, Any] = {"extensions": sorted(extensions)}
    if unlabelled:  # only when set: the records of earlier conversions (without the key) stay valid for resuming
        source_options["unlabelled"] = True
    return write_listing(
        lambda: list_image_folder(src, extensions, allow_empty_classes, skip_outside=skip_bad, unlabelled=unlabelled),
        out,
        source=os.path.realpath(src),
        source_options=source_options,
        manifest_options={"allow_empty_classes": allow_empty_classes},
        workers=workers,
        resize=resize,
        quality=quality,
        shard_size=shard_size,
        compression=compression,
        hashes=hashes,
        chunk_files=chunk_files,
        skip_bad=skip_bad,
        staging=staging,
        keep_staging=keep_staging,
        timeout=timeout,
        progress=progress,
    )


def write_listing(
    listing: Union[SourceListing, Callable[[], SourceListing]],
    out: Union[str, os.PathLike],
    *,
    source: str,
    source_options: dict[str, Any] | None = None,
    manifest_options: dict[str, Any] | None = None,
    workers: int = 1,
    resize: int | None = None,
    quality: int = 90,
    image_format: str | None = None,
    shard_size: Union[int, str] = "64mb",
    compression: str | None = None,
    hashes: Sequence[str] = DEFAULT_HASHES,
    chunk_files: int = 10000,
    skip_bad: bool = False,
    staging: Union[str, os.PathLike] | None = None,
    keep_staging: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
    desc: str = "convert",
) -> dict[str, Any]:
    """Writes the images of a :class:`SourceListing` to MDS shards in ``out``, as the converter does.

    Chunks, resumption, the checks of ``out`` and remote output work as described in the module docstring. The
    options are checked and ``out`` is claimed before ``listing`` is called (listing a large source takes
    minutes).

    Args:
        listing: the images, or a function that lists them.
        out: the output folder or ``s3://`` prefix.
        source: the source's real path, recorded in ``conversion.json`` and the manifest: an ``out`` that holds a
            conversion of another source is refused.
        source_options: options the images depend on besides the ones below (recorded: a rerun with other values
            is refused rather than mixed in).
        manifest_options: further options recorded in the manifest only.
        workers: processes that decode and encode images (``1``: in this process).
        resize: scale images so the shorter side is this many pixels.
        quality: JPEG quality of (re-)encoded images, 1 to 95.
        image_format: how pixel arrays (``listing.images``) are stored: ``'png'`` or ``'jpeg'``; required for them,
            refused for image files.
        shard_size: the shard size limit, in bytes or as text (``'64mb'``).
        compression: shard compression (``'zstd'``, ...).
        hashes: hash algorithms written for every shard.
        chunk_files: images per resumable chunk.
        skip_bad: skip unreadable images (listed in the manifest) instead of failing.
        staging: local folder for chunks on their way to a remote ``out`` (default: a temporary folder).
        keep_staging: keep staged chunks after their upload.
        timeout: seconds each S3 request may wait to connect, and again for an answer (3 attempts).
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        The manifest, also written to ``out/manifest.json``.

    Raises:
        ConversionError: bad options or source, or an ``out`` (or ``staging``) that holds something else or
            cannot be written.
        BadImageError: an unreadable image (without ``skip_bad``).
        RemoteDataError: the remote store cannot be reached, does not answer within ``timeout``, or refuses.
        OSError: a local write fails after the checks (a full disk).
    """
    out = os.fspath(out)
    src_real = os.fspath(source)
    if image_format is not None and image_format not in ARRAY_FORMATS:
        raise ConversionError(f"--format {image_format!r} is not valid; choose {' or '.join(ARRAY_FORMATS)}")
    _positive_int(workers, "--workers")
    _positive_int(chunk_files, "--chunk-files")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConversionError(f"--timeout must be a positive, finite number of seconds, got {timeout!r}")
    _check_location(out, "--out", src_real)
    remote = is_remote(out)
    if not remote and (staging is not None or keep_staging):
        raise ConversionError(
            "--staging and --keep-staging are only used with a remote --out (s3://...); a local --out is "
            "written directly"
        )
    if staging is not None:
        _check_location(os.fspath(staging), "--staging", src_real)
        if is_remote(os.fspath(staging)):
            raise ConversionError(f"--staging {os.fspath(staging)} must be a local folder")
    size_limit, hashes = _validate_options(resize, quality, shard_size, compression, hashes)  # imports streaming
    options = {
        "resize": resize,
        "quality": quality,
        "shard_size": size_limit,
        "compression": compression,
        "hashes": hashes,
        "chunk_files": chunk_files,
        **({} if image_format is None else {"image_format": image_format}),
        **(source_options or {}),
    }  # what the shards depend on: a conversion with other options is not mixed in
    record = {"format": _FORMAT, "source": src_real, "options": options}
    out = out.rstrip("/") if remote else out  # s3://b/x/ and s3://b/x are one place
    client = s3_client(connect_timeout=timeout, read_timeout=timeout, max_attempts=_S3_ATTEMPTS) if remote else None
    # the outputs are checked before the listing, which takes minutes for ImageNet, and written after it
    places = [(out, record, "--out", client)]
    if staging is not None:  # staged chunks of this conversion only: the staging folder gets its own record
        places.insert(0, (os.fspath(staging), {**record, "out": out}, "--staging", None))
    for where, place_record, flag, place_client in places:  # read-only checks first, then a write probe
        names = _check_claim(where, place_record, flag, place_client)
        if not is_remote(where):
            _check_writable(where, flag)
    listing = listing() if callable(listing) else listing
    if (listing.images is None) != (image_format is None):
        raise ConversionError(
            "image_format is for pixel arrays only"
            if listing.images is None
            else "image_format (png or jpeg) is required for a listing of pixel arrays"
        )
    for where, place_record, _, place_client in places:
        write_bytes(join_url(where, RECORD_NAME), json.dumps(place_record, indent=2).encode(), client=place_client)
    for name in listing.outside_classes:
        tqdm.write(f"skipped image outside any class folder: {listing.root / name}", file=sys.stderr)
    writer_kwargs = {"compression": compression, "hashes": hashes, "size_limit": size_limit}
    starts = list(range(0, len(listing.files), chunk_files))
    published = [n for n in (INDEX_NAME, MANIFEST_NAME) if n in names]

    def unpublish() -> None:  # the data set stops being readable until it is complete again
        while published:
            remove(join_url(out, published.pop(0)), client)

    stale = [n for n in names if _chunk_number(n) is not None and _chunk_number(n) >= len(starts)]
    if stale:  # chunks of a longer listing of this same source (files were removed since)
        unpublish()
        for name in stale:
            remove(join_url(out, name), client)
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

    job_fn = _encode_job if listing.images is None else _encode_array_job

    def encode(jobs: Iterable) -> Iterator:
        return pool.imap(job_fn, jobs, chunksize=8) if pool is not None else map(job_fn, jobs)

    def chunk_jobs(start: int, files: Sequence[tuple[str, int]]) -> Iterable:
        if listing.images is None:
            return [(str(listing.root / rel), resize, quality) for rel, _ in files]
        # lazily, one image at a time: the pool's task queue feeds from a generator, so a chunk of a memory-mapped
        # file is never read into memory at once
        import numpy as np

        images = listing.images
        return ((np.asarray(images[start + j]), rel, image_format, resize, quality) for j, (rel, _) in enumerate(files))

    markers: list[dict] = []
    interrupted = failed = False
    pbar = tqdm(total=len(listing.files), unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for k, start in enumerate(starts):
            files = listing.files[start : start + chunk_files]
            fingerprint = _fingerprint(listing, start, len(files), options)
            name = _chunk_name(k)
            marker = _read_marker(join_url(out, name, DONE_NAME), client) if name in names else None
            if marker is not None and marker.get("fingerprint") == fingerprint:
                markers.append(marker)
                pbar.update(len(files))
                if remote and not keep_staging:
                    shutil.rmtree(staging_root / name, ignore_errors=True)  # a stale staged copy
                continue
            if marker is not None:
                note = f"{join_url(out, name)}: its source files changed since it was written; rewriting it"
                tqdm.write(note, file=sys.stderr)
            unpublish()
            folder = staging_root / name
            local_marker = _read_marker(str(folder / DONE_NAME), None) if remote else None
            if local_marker is not None and local_marker.get("fingerprint") == fingerprint:
                marker = local_marker  # staged by an earlier run, never uploaded
                pbar.update(len(files))
            else:
                jobs = chunk_jobs(start, files)
                n_classes = len(listing.classes) if listing.labelled else None
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
                target, replace = join_url(out, name), name in names
                uploads.append(uploader.submit(_upload_chunk, folder, target, payload, keep_staging, replace, client))
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
    samples = sum(m["samples"] for m in markers)
    if samples == 0:
        raise ConversionError(f"no readable images in {listing.root}: all {len(skipped)} image files were skipped")
    manifest = {
        "format": _FORMAT,
        "source": src_real,
        "out": out,
        "columns": COLUMNS if listing.labelled else {k: v for k, v in COLUMNS.items() if k != "y"},
        "labelled": listing.labelled,
        "classes": listing.classes,
        "class_counts": dict(zip(listing.classes, counts)),
        "samples": samples,
        "listed_files": len(listing.files),
        "reencoded": sum(m["reencoded"] for m in markers),
        "skipped": skipped,
        "num_skipped": len(skipped),
        "outside_classes": listing.outside_classes,
        "ignored_files": listing.ignored,
        "empty_classes": listing.empty_classes,
        "chunks": len(markers),
        "options": {**options, "skip_bad": skip_bad, **(manifest_options or {})},
    }
    write_bytes(join_url(out, INDEX_NAME), json.dumps(_merged_index(markers), sort_keys=True).encode(), client=client)
    write_bytes(join_url(out, MANIFEST_NAME), json.dumps(manifest, indent=2).encode(), client=client)
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an ImageFolder tree (SRC/<class>/<image>, ImageNet's layout) to MDS shards "
        "(columns x: JPEG bytes, y: class index, i: sample id) for StreamingImageDataset.",
        epilog=__doc__[__doc__.index("Input:") :].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="the ImageFolder tree: SRC/<class>/<image>")
    parser.add_argument("--out", required=True, help="output folder, or s3://bucket/prefix (set S3_ENDPOINT_URL)")
    parser.add_argument("--workers", type=int, default=1, help="processes that decode/encode images (default 1)")
    parser.add_argument("--resize", type=int, default=None, help="scale the shorter side to this many pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images, 1-95 (default 90)")
    parser.add_argument("--shard-size", default="64mb", help="shard size limit: bytes or '64mb' (default 64mb)")
    parser.add_argument("--compression", default=None, help="shard compression, e.g. zstd (default none)")
    parser.add_argument(
        "--hashes", default=",".join(DEFAULT_HASHES), help="comma-separated shard hashes (default sha1,xxh64)"
    )
    parser.add_argument("--chunk-files", type=int, default=10000, help="files per resumable chunk (default 10000)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable images and images outside class folders, listing them in the manifest",
    )
    parser.add_argument(
        "--allow-empty-classes", action="store_true", help="keep class folders without images as empty classes"
    )
    parser.add_argument(
        "--unlabelled",
        action="store_true",
        help="images without classes: every image under SRC (sub-folders or not), shards without a 'y' column",
    )
    parser.add_argument("--staging", default=None, help="local staging folder for a remote --out (default: temp)")
    parser.add_argument("--keep-staging", action="store_true", help="keep staged chunks after uploading them")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds an S3 request may wait to connect, and again for an answer; 3 attempts (default 60)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code.

    Returns:
        0 done, 1 an unreadable image or a storage error, 130 interrupted; bad input exits with 2 (argparse).
    """
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
            unlabelled=args.unlabelled,
            staging=args.staging,
            keep_staging=args.keep_staging,
            timeout=args.timeout,
            progress=not args.no_progress,
        )
    except ConversionError as error:
        parser.error(str(error))  # exits with code 2
    except (BadImageError, RemoteDataError, OSError) as error:
        message = _os_error_text(error) if isinstance(error, OSError) else str(error)
        if isinstance(error, RemoteDataError) and is_timeout(error.__cause__):
            message += f"; --timeout is {args.timeout:g} s: raise it if the store is only slow"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; finished chunks are kept in {args.out}: run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    for item in manifest["skipped"]:
        print(f"skipped: {item['path']}: {item['error']}")
    for name in manifest["outside_classes"]:
        print(f"skipped (outside any class folder): {name}")
    what = (
        f"{len(manifest['classes'])} classes"
        if manifest["labelled"]
        else "no classes (unlabelled: no 'y' column; label-needing callbacks and protocols will refuse it)"
    )
    print(
        f"wrote {manifest['samples']} images in {what} to {args.out} "
        f"({manifest['reencoded']} re-encoded, {manifest['num_skipped']} skipped); "
        f"manifest: {join_url(args.out, MANIFEST_NAME)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
