"""The converter loses nothing and mixes nothing up: resume checks the source files, links stay inside --src,
images outside class folders are reported, errors name paths plainly, and every bad command line is one clean
error with nothing overwritten."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streaming import StreamingDataset

import magma_composer.data.convert as convert
from magma_composer.data.convert import BadImageError, ConversionError, convert_image_folder, encode_image, main
from tests.conftest import REPO
from tests.s3_server import write_synthetic_tree

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
#: what a Python object's repr looks like inside a message
REPR = re.compile(r"object at 0x|<_io\.|PosixPath\(|WindowsPath\(|<[A-Za-z_.]+ ")


def _samples(folder: Path) -> dict[int, dict]:
    dataset = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    return {int(s["i"]): s for s in (dataset[k] for k in range(dataset.num_samples))}


def _noise_png(path: Path, seed: int, size: int = 20) -> None:
    """An uncompressed PNG: its file size depends on the image size only, not on the pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=0)


def _png_tree(root: Path, per_class: int = 4) -> None:
    for c, name in enumerate(("ant", "bee", "cat")):
        for j in range(per_class):
            _noise_png(root / name / f"img_{j}.png", seed=10 * c + j)


def _record_writes(monkeypatch) -> list[str]:
    written: list[str] = []
    original = convert._write_chunk
    monkeypatch.setattr(
        convert, "_write_chunk", lambda folder, *a, **k: written.append(folder.name) or original(folder, *a, **k)
    )
    return written


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("change", ["content_and_mtime", "size_only"])
def test_resume_rewrites_a_chunk_whose_source_files_changed(tmp_path, monkeypatch, change):
    """Same names, other files: the chunk holding them is rewritten and the data set holds the new pixels."""
    _png_tree(tmp_path / "src")
    out = tmp_path / "out"
    convert_image_folder(tmp_path / "src", out, chunk_files=4, progress=False)
    target = tmp_path / "src" / "bee" / "img_1.png"  # sample 5, in chunk-00001
    old_bytes = _samples(out)[5]["x"]
    assert old_bytes == encode_image(target)[0]
    before = target.stat()
    if change == "content_and_mtime":  # the same size (uncompressed PNG of the same shape), new pixels
        _noise_png(target, seed=999)
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
        assert target.stat().st_size == before.st_size
    else:  # other pixels and another size, the modification time put back
        _noise_png(target, seed=999, size=24)
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert target.stat().st_size != before.st_size
    untouched = {p: p.stat().st_mtime_ns for p in out.glob("chunk-0000[02]/shard.*")}

    written = _record_writes(monkeypatch)
    manifest = convert_image_folder(tmp_path / "src", out, chunk_files=4, progress=False)
    assert written == ["chunk-00001"]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the unchanged chunks were reused
    assert _samples(out)[5]["x"] == encode_image(target)[0] != old_bytes  # the new file's pixels, encoded
    assert manifest["samples"] == 12 and json.loads((out / "manifest.json").read_text()) == manifest


def test_resume_after_files_added_and_removed(tmp_path, monkeypatch):
    """A class gains a file and another loses two: the chunks whose files moved are rewritten, chunks past the new
    end are removed, and the result equals a fresh conversion."""
    _png_tree(tmp_path / "src")
    out = tmp_path / "out"
    convert_image_folder(tmp_path / "src", out, chunk_files=4, progress=False)
    (tmp_path / "src" / "cat" / "img_2.png").unlink()
    (tmp_path / "src" / "cat" / "img_3.png").unlink()
    _noise_png(tmp_path / "src" / "bee" / "img_9.png", seed=77)  # bee's 5th file: chunk-00002 is bee/img_9, cat 0-1
    written = _record_writes(monkeypatch)
    manifest = convert_image_folder(tmp_path / "src", out, chunk_files=4, progress=False)
    assert written == ["chunk-00002"] and manifest["samples"] == 11
    convert_image_folder(tmp_path / "src", tmp_path / "fresh", chunk_files=4, progress=False)
    assert {i: s["x"] for i, s in _samples(out).items()} == {i: s["x"] for i, s in _samples(tmp_path / "fresh").items()}

    (tmp_path / "src" / "ant" / "img_0.png").unlink()
    (tmp_path / "src" / "ant" / "img_1.png").unlink()
    (tmp_path / "src" / "ant" / "img_2.png").unlink()  # 8 files: chunk-00002 is now beyond the listing
    convert_image_folder(tmp_path / "src", out, chunk_files=4, progress=False)
    assert sorted(p.name for p in out.glob("chunk-*")) == ["chunk-00000", "chunk-00001"]
    assert sorted(_samples(out)) == list(range(8))


def test_out_with_another_sources_conversion_is_refused(tmp_path):
    """Two trees with the same names: converting the second into the first's --out is refused, not mixed."""
    _png_tree(tmp_path / "a")
    _png_tree(tmp_path / "b")
    out = tmp_path / "out"
    convert_image_folder(tmp_path / "a", out, chunk_files=4, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConversionError, match=f"holds a finished conversion of --src {tmp_path / 'a'}"):
        convert_image_folder(tmp_path / "b", out, chunk_files=4, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # an unfinished one (interrupted after its first chunk) is refused too, and its chunk kept
    (out / "index.json").unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(ConversionError, match="holds an unfinished conversion of --src"):
        convert_image_folder(tmp_path / "b", out, chunk_files=4, progress=False)
    assert (out / "chunk-00000" / "done.json").read_bytes() == before[out / "chunk-00000" / "done.json"]


# ---------------------------------------------------------------------------------------------- links


def test_symlink_out_of_src_is_an_error(tmp_path):
    write_synthetic_tree(tmp_path / "src", per_class=2)
    outside = tmp_path / "elsewhere"
    _noise_png(outside / "secret.png", seed=1)
    link = tmp_path / "src" / "cat" / "linked.png"
    link.symlink_to(outside / "secret.png")
    folder_link = tmp_path / "src" / "dog"
    folder_link.symlink_to(outside, target_is_directory=True)

    with pytest.raises(ConversionError) as error:
        convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)
    message = str(error.value)
    assert f"{link} -> {outside / 'secret.png'} (outside --src)" in message
    assert f"{folder_link} -> {outside} (outside --src)" in message
    assert not (tmp_path / "out").exists()


def test_symlinks_inside_src_are_followed(tmp_path):
    write_synthetic_tree(tmp_path / "src", per_class=2)
    (tmp_path / "src" / "bee" / "again.jpg").symlink_to(tmp_path / "src" / "ant" / "img_000.jpg")
    manifest = convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert manifest["class_counts"] == {"ant": 2, "bee": 3, "cat": 2}


@pytest.mark.parametrize("target", ["src", "class", "sub"])
def test_symlink_loop_is_an_error(tmp_path, target):
    """A link to an ancestor folder would list the same files forever (or until paths get too long)."""
    write_synthetic_tree(tmp_path / "src", per_class=4)
    folder = {"src": tmp_path / "src", "class": tmp_path / "src" / "bee", "sub": tmp_path / "src" / "bee" / "zz_more"}
    link = tmp_path / "src" / "bee" / "zz_more" / "loop"
    link.symlink_to(folder[target], target_is_directory=True)
    with pytest.raises(ConversionError, match="a link to its own ancestor folder: a loop") as error:
        convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert str(link) in str(error.value)


def test_dangling_symlink_is_an_error(tmp_path):
    write_synthetic_tree(tmp_path / "src", per_class=2)
    link = tmp_path / "src" / "ant" / "gone.jpg"
    link.symlink_to(tmp_path / "src" / "ant" / "never-there.jpg")
    with pytest.raises(ConversionError, match=re.escape(f"{link} -> {link.parent / 'never-there.jpg'} (points to")):
        convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)


def test_fifo_with_an_image_name_is_not_read(tmp_path):
    """Opening a FIFO blocks until a writer comes: it is not a regular file, so it is counted, never opened."""
    write_synthetic_tree(tmp_path / "src", per_class=2)
    os.mkfifo(tmp_path / "src" / "ant" / "pipe.jpg")
    manifest = convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert manifest["samples"] == 6 and manifest["ignored_files"] == 3 + 1


# ---------------------------------------------------------------------------------------------- top-level images


def test_images_outside_class_folders_are_reported(tmp_path, capsys):
    write_synthetic_tree(tmp_path / "src", per_class=2)
    _noise_png(tmp_path / "src" / "stray.png", seed=3)
    _noise_png(tmp_path / "src" / "Another.JPG.png", seed=4)
    (tmp_path / "src" / "README.txt").write_text("about the data")

    with pytest.raises(ConversionError) as error:
        convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)
    message = str(error.value)
    assert "outside any class folder: Another.JPG.png, stray.png" in message
    assert "images must sit in SRC/<class>/" in message and "--skip-bad" in message
    assert not (tmp_path / "out").exists()

    argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--skip-bad", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped (outside any class folder): stray.png" in captured.out
    assert f"skipped image outside any class folder: {tmp_path / 'src' / 'stray.png'}" in captured.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["outside_classes"] == ["Another.JPG.png", "stray.png"]
    assert manifest["samples"] == 6 and manifest["ignored_files"] == 3 + 1  # notes.txt per class, README.txt


# ---------------------------------------------------------------------------------------------- plain paths


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"this is not an image at all", "not an image format PIL can read"),
        (None, "truncated"),
        ("missing", "No such file or directory"),
        ("folder", "Is a directory"),
    ],
)
def test_bad_image_errors_name_the_path_plainly(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    if content == "missing":
        pass
    elif content == "folder":
        path.mkdir()
    elif content is None:
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(BadImageError) as error:
        encode_image(path)  # a Path, as callers pass it
    message = str(error.value)
    assert message.startswith(f"cannot read image {path}: ") and reason.lower() in message.lower()
    assert not REPR.search(message), message


def test_bad_image_in_a_run_names_the_path_plainly(tmp_path, capsys):
    write_synthetic_tree(tmp_path / "src", per_class=2)
    bad = tmp_path / "src" / "bee" / "img_000.jpg"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot read image {bad}: not an image format PIL can read" in err
    assert not REPR.search(err), err


# ---------------------------------------------------------------------------------------------- runpy


@pytest.mark.parametrize("module", ["magma_composer.data.convert", "magma_composer.data.demo"])
def test_no_runpy_warning(tmp_path, module):
    """Importing the package must not import the module that ``python -m`` is about to run."""
    for argv in (["--help"], None):
        if argv is None and module.endswith("convert"):
            write_synthetic_tree(tmp_path / "src", per_class=1)
            argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress"]
        elif argv is None:
            argv = ["--out", str(tmp_path / "demo"), "--train", "3", "--test", "2"]
        proc = subprocess.run(
            [sys.executable, "-W", "default", "-m", module, *argv],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "RuntimeWarning" not in proc.stderr and "found in sys.modules" not in proc.stderr, proc.stderr


def test_package_names_still_import():
    from magma_composer.data import CheckedStreamingDataset, StreamingImageDataset, convert_image_folder

    assert convert_image_folder is convert.convert_image_folder
    assert StreamingImageDataset.__mro__[1] is CheckedStreamingDataset
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        from magma_composer import data

        data.nothing_here  # noqa: B018


# ---------------------------------------------------------------------------------------------- command line


def _unwritable(tmp_path: Path) -> Path | None:
    """A folder this process cannot create entries in (root ignores permission bits: try read-only mounts)."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        return folder / "out"
    for candidate in ("/proc", "/sys/fs", "/sys"):
        probe = os.path.join(candidate, "magma-probe")
        try:
            os.mkdir(probe)
        except OSError:
            return Path(candidate) / "magma-out"
        os.rmdir(probe)
    return None


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Inputs for the command-line cases; the cases must leave every file here as it was."""
    tmp = tmp_path_factory.mktemp("cli")
    write_synthetic_tree(tmp / "src", per_class=2)
    write_synthetic_tree(tmp / "src2", per_class=2)
    (tmp / "afile").write_text("a file")
    (tmp / "other").mkdir()
    (tmp / "other" / "mine.txt").write_text("a user's file")
    (tmp / "nothing").mkdir()
    (tmp / "flat").mkdir()
    _noise_png(tmp / "flat" / "a.png", seed=1)
    write_synthetic_tree(tmp / "empty_class", per_class=1)
    (tmp / "empty_class" / "dog").mkdir()
    write_synthetic_tree(tmp / "linked", per_class=1)
    (tmp / "linked" / "cat" / "x.jpg").symlink_to(tmp / "src" / "cat" / "img_000.jpg")
    write_synthetic_tree(tmp / "looped", per_class=1)
    (tmp / "looped" / "cat" / "up").symlink_to(tmp / "looped", target_is_directory=True)
    write_synthetic_tree(tmp / "badimage", per_class=1)
    (tmp / "badimage" / "ant" / "img_000.jpg").write_bytes(b"not a jpeg")
    convert_image_folder(tmp / "src2", tmp / "done_src2", chunk_files=2, progress=False)
    convert_image_folder(tmp / "src", tmp / "done_src", chunk_files=2, progress=False)
    (tmp / "old_chunks" / "chunk-00000").mkdir(parents=True)  # chunks without a conversion.json
    return tmp


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file and link under ``root`` (folders' own times change when a
    probe entry is made and removed; what they hold is compared)."""
    found = {}
    for folder, dirs, files in os.walk(root):  # links to folders are not followed (one loops)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            info = os.lstat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (info.st_size, info.st_mtime_ns)
    return found


CLI_CASES = [
    # (argv, exit code, key phrase)
    ([], 2, "the following arguments are required: --src, --out"),
    (["--src", "{t}/missing", "--out", "{t}/o"], 2, "missing does not exist"),
    (["--src", "{t}/afile", "--out", "{t}/o"], 2, "afile is a file"),
    (["--src", "", "--out", "{t}/o"], 2, "--src is empty"),
    (["--src", "s3://bucket/images", "--out", "{t}/o"], 2, "is a URL; the converter reads a local folder"),
    (["--src", "{t}/nothing", "--out", "{t}/o"], 2, "has no class folders"),
    (["--src", "{t}/flat", "--out", "{t}/o"], 2, "outside any class folder: a.png"),
    (["--src", "{t}/empty_class", "--out", "{t}/o"], 2, "--allow-empty-classes"),
    (["--src", "{t}/linked", "--out", "{t}/o"], 2, "(outside --src)"),
    (["--src", "{t}/looped", "--out", "{t}/o"], 2, "a loop"),
    (["--src", "{t}/src", "--out", "{t}/src/mds"], 2, "lies inside --src"),
    (["--src", "{t}/src", "--out", "{t}/src"], 2, "lies inside --src"),
    (["--src", "{t}/src", "--out", "{t}"], 2, "lies inside --out"),
    (["--src", "{t}/src", "--out", "{t}/other"], 2, "holds mine.txt"),
    (["--src", "{t}/src", "--out", "{t}/afile"], 2, "afile is a file"),
    (["--src", "{t}/src", "--out", "{t}/afile/sub"], 2, "afile is a file"),
    (["--src", "{t}/src", "--out", "{unwritable}"], 2, "is not writable"),
    (["--src", "{t}/src", "--out", ""], 2, "--out is empty"),
    (["--src", "{t}/src", "--out", "{t}/done_src2", "--chunk-files", "2"], 2, "holds a finished conversion of --src"),
    (["--src", "{t}/src", "--out", "{t}/done_src", "--chunk-files", "3"], 2, "chunk_files: 2 there, 3 now"),
    (["--src", "{t}/src", "--out", "{t}/old_chunks"], 2, "but no conversion.json"),
    (["--src", "{t}/src", "--out", "{t}/o", "--workers", "0"], 2, "--workers must be a positive integer"),
    (["--src", "{t}/src", "--out", "{t}/o", "--workers", "-1"], 2, "--workers must be a positive integer"),
    (["--src", "{t}/src", "--out", "{t}/o", "--workers", "two"], 2, "invalid int value: 'two'"),
    (["--src", "{t}/src", "--out", "{t}/o", "--quality", "0"], 2, "--quality must be an integer from 1 to 95"),
    (["--src", "{t}/src", "--out", "{t}/o", "--quality", "101"], 2, "--quality must be an integer from 1 to 95"),
    (["--src", "{t}/src", "--out", "{t}/o", "--shard-size", "lots"], 2, "--shard-size 'lots' is not a size"),
    (["--src", "{t}/src", "--out", "{t}/o", "--shard-size", "0"], 2, "at least 1 byte"),
    (["--src", "{t}/src", "--out", "{t}/o", "--chunk-files", "0"], 2, "--chunk-files must be a positive integer"),
    (["--src", "{t}/src", "--out", "{t}/o", "--resize", "0"], 2, "--resize must be a positive number of pixels"),
    (["--src", "{t}/src", "--out", "{t}/o", "--resize", "big"], 2, "invalid int value: 'big'"),
    (["--src", "{t}/src", "--out", "{t}/o", "--compression", "zip9"], 2, "--compression 'zip9' is not valid"),
    (["--src", "{t}/src", "--out", "{t}/o", "--hashes", "md9"], 2, "--hashes md9 not supported"),
    (["--src", "{t}/src", "--out", "{t}/o", "--timeout", "0"], 2, "--timeout must be a positive, finite number"),
    (["--src", "{t}/src", "--out", "{t}/o", "--timeout", "inf"], 2, "--timeout must be a positive, finite number"),
    (["--src", "{t}/src", "--out", "{t}/o", "--timeout", "soon"], 2, "invalid float value: 'soon'"),
    (["--src", "{t}/src", "--out", "{t}/o", "--staging", "{t}/s"], 2, "only used with a remote --out"),
    (["--src", "{t}/src", "--out", "{t}/o", "--keep-staging"], 2, "only used with a remote --out"),
    (["--src", "{t}/src", "--out", "s3://b/x", "--staging", "{unwritable}"], 2, "cannot write --staging"),
    (["--src", "{t}/src", "--out", "s3://b/x", "--staging", "{t}/src/st"], 2, "--staging {t}/src/st lies inside"),
    (["--src", "{t}/src", "--out", "s3://b/x", "--staging", "{t}/other"], 2, "--staging {t}/other is not empty"),
    (["--src", "{t}/src", "--out", "s3://"], 2, "names no bucket"),
    (["--src", "{t}/src", "--out", "s3:///prefix"], 2, "names no bucket"),
    (["--src", "{t}/src", "--out", "gs://bucket/x"], 2, "local folders and s3:// URLs only"),
    (["--src", "{t}/src", "--out", "S3://bucket/x"], 2, "lower-case s3://"),
    (["--src", "{t}/src", "--out", "file://{t}/o"], 2, "give a plain path, not a file:// URL"),
    (["--src", "{t}/badimage", "--out", "{t}/o_bad"], 1, "cannot read image {t}/badimage/ant/img_000.jpg: not an"),
]


@pytest.mark.parametrize(
    "argv, code, phrase", CLI_CASES, ids=[" ".join(c[0]).replace("{t}/", "") or "none" for c in CLI_CASES]
)
def test_bad_command_line(tree, tmp_path, argv, code, phrase):
    unwritable = _unwritable(tmp_path)
    if any("{unwritable}" in a for a in argv) and unwritable is None:
        pytest.skip("no folder here that this process cannot write to")
    values = {"t": tree, "unwritable": unwritable}
    argv = [a.format(**values) for a in argv]
    before = _snapshot(tree)
    proc = subprocess.run(
        [sys.executable, "-m", "magma_composer.data.convert", *argv, "--no-progress"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("python -m magma_composer.data.convert: error: "), proc.stderr
    assert phrase.format(**values) in errors[0], errors[0]
    assert not REPR.search(errors[0]), errors[0]
    after = _snapshot(tree)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing there before was touched
    new = sorted(set(after) - set(before))
    assert all(Path(p).is_relative_to(tree / "o_bad") for p in new), new  # only the converter's own output


def test_ctrl_c_then_resume(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-run: exit 130, one line, finished chunks
    kept and the data set not published; the same command then finishes and writes only the missing chunks."""
    for c, name in enumerate(("ant", "bee")):
        for j in range(60):
            _noise_png(tmp_path / "src" / name / f"img_{j:03d}.png", seed=100 * c + j, size=16)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "magma_composer.data.convert", "--src", str(tmp_path / "src"), "--out", str(out)]
    cmd += ["--chunk-files", "10", "--resize", "384", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "chunk-00001" / "done.json").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the first two chunks never finished"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted; finished chunks are kept" in err
    assert not (out / "index.json").exists() and not (out / "manifest.json").exists()
    finished = sorted(p.parent.name for p in out.glob("chunk-*/done.json"))
    assert "chunk-00001" in finished and len(finished) < 12
    kept = {p: p.stat().st_mtime_ns for p in out.glob("chunk-*/shard.*") if p.parent.name in finished}

    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished chunks were reused
    assert sorted(_samples(out)) == list(range(120))
