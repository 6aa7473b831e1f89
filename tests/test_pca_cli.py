"""``python -m magma_composer.pca`` as a user runs it: every bad input is one ``error:`` line, nothing is lost."""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter

from magma_composer.pca import fit_basis, fit_pca, load_basis, load_pixel_stats, save_basis
from magma_composer.pca.__main__ import main as pca_main
from tests.conftest import free_port, run_module

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m magma_composer.pca"


def run_cli(*args: str, cwd: Path, env: dict | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    env = {"PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return run_module("magma_composer.pca", *args, cwd=cwd, env=env, timeout=240, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def mds(tmp_path_factory) -> Path:
    """12 small JPEGs as MDS shards under ``train/``."""
    root = tmp_path_factory.mktemp("cli_mds")
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(root / "train"), columns={"x": "bytes", "y": "int"}, size_limit=2048) as writer:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="JPEG")
            writer.write({"x": buf.getvalue(), "y": i % 2})
    return root


@pytest.fixture(scope="module")
def basis_file(tmp_path_factory) -> Path:
    x = torch.rand(30, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return Path(
        save_basis(
            fit_pca(lambda: x.split(10), 4, components=5, progress=False), tmp_path_factory.mktemp("b") / "b.pt"
        ).path
    )


def _setup(case: str, tmp: Path, mds: Path, basis_file: Path) -> tuple[list[str], dict]:
    """The command line (and environment) of ``case``; ``{mds}``, ``{tmp}``, ``{basis}`` are filled in."""
    env: dict = {}
    if case == "out-parent-is-a-file":
        (tmp / "afile").write_text("x")
    elif case in ("out-exists", "stats-out-exists"):
        (tmp / "exists.pt").write_bytes(b"precious")
    elif case == "out-unwritable":
        if os.geteuid() != 0:
            (tmp / "ro").mkdir()
            (tmp / "ro").chmod(0o555)
    elif case == "data-not-mds":
        (tmp / "notmds").mkdir()
        (tmp / "notmds" / "a.txt").write_text("x")
    elif case == "data-is-a-file":
        (tmp / "afile").write_text("x")
    elif case == "data-unreachable":
        env = {
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
        }
    elif case == "info-not-a-basis":
        torch.save({"weights": torch.zeros(3)}, tmp / "other.pt")
    elif case == "info-text-file":
        (tmp / "notes.txt").write_text("hello\n")
    elif case == "info-truncated":
        data = basis_file.read_bytes()
        (tmp / "cut.pt").write_bytes(data[: len(data) - 7])
    elif case == "info-one-byte-altered":
        data = bytearray(basis_file.read_bytes())
        data[len(data) // 2] ^= 0x20
        (tmp / "edited.pt").write_bytes(bytes(data))
    return env


FIT = ["fit", "--data", "{mds}", "--split", "train", "--image-size", "8", "--out", "{tmp}/b.pt", "--no-progress"]
STATS = ["stats", *FIT[1:]]

#: (case, arguments, exit status, phrase of the message), each run as a user runs it, in a new process
CASES = [
    ("image-size-0", FIT + ["--image-size", "0"], 2, "--image-size: must be >= 1, got 0"),
    ("image-size-negative", FIT + ["--image-size", "-3"], 2, "--image-size: must be >= 1, got -3"),
    ("components-0", FIT + ["--components", "0"], 2, "--components: must be >= 1, got 0"),
    (
        "components-above-D",
        FIT + ["--components", "193"],
        2,
        "--components: must be at most D = channels x image_size^2 = 192",
    ),
    ("batch-size-0", FIT + ["--batch-size", "0"], 2, "--batch-size: must be >= 1, got 0"),
    ("max-images-1", FIT + ["--max-images", "1"], 2, "--max-images: must be >= 2, got 1"),
    ("power-iters-negative", FIT + ["--power-iters", "-1"], 2, "--power-iters: must be >= 0, got -1"),
    ("oversample-negative", FIT + ["--oversample", "-1"], 2, "--oversample: must be >= 0, got -1"),
    ("num-workers-negative", FIT + ["--num-workers", "-1"], 2, "--num-workers: must be >= 0, got -1"),
    ("method-bogus", FIT + ["--method", "bogus"], 2, "--method: 'bogus' is not valid; choose one of 'auto', 'exact'"),
    ("device-bogus", FIT + ["--device", "bogus"], 2, "--device: 'bogus' is not a device"),
    ("device-cuda-without-gpu", FIT + ["--device", "cuda"], 2, "--device: 'cuda': no CUDA GPU is available here"),
    ("data-missing", FIT + ["--data", "{tmp}/nothing"], 2, "--data: no MDS data set at"),
    (
        "data-not-mds",
        FIT + ["--data", "{tmp}/notmds", "--split", "."],
        2,
        "index.json is missing (the folder holds ['a.txt'])",
    ),
    (
        "data-unreachable",
        FIT + ["--data", "s3://bucket/set"],
        2,
        "--data: cannot read the MDS index s3://bucket/set/train/index.json",
    ),
    ("split-missing", FIT + ["--split", "validation"], 2, "--split: 'validation' is not a folder in"),
    ("out-is-a-directory", FIT + ["--out", "{tmp}"], 2, "--out: '{tmp}' is a directory"),
    ("out-parent-is-a-file", FIT + ["--out", "{tmp}/afile/b.pt"], 2, "'{tmp}/afile' is a file, not a folder"),
    ("out-unwritable", FIT + ["--out", "{unwritable}/b.pt"], 2, "is not writable"),
    ("out-exists", FIT + ["--out", "{tmp}/exists.pt"], 2, "--out: '{tmp}/exists.pt' already exists"),
    (
        "info-missing",
        ["info", "{tmp}/missing.pt"],
        2,
        "PCA basis or pixel statistics file '{tmp}/missing.pt' does not exist",
    ),
    ("info-not-a-basis", ["info", "{tmp}/other.pt"], 2, "'{tmp}/other.pt' is not a PCA basis or pixel statistics file"),
    (
        "info-truncated",
        ["info", "{tmp}/cut.pt"],
        2,
        "'{tmp}/cut.pt' is not a PCA basis or pixel statistics file written by magma_composer, or it is truncated",
    ),
    (
        "info-one-byte-altered",
        ["info", "{tmp}/edited.pt"],
        2,
        "PCA basis or pixel statistics file '{tmp}/edited.pt' is corrupted: its bytes hash to",
    ),
    ("stats-out-exists", STATS + ["--out", "{tmp}/exists.pt"], 2, "--out: '{tmp}/exists.pt' already exists"),
    ("stats-data-missing", STATS + ["--data", "{tmp}/nothing"], 2, "--data: no MDS data set at"),
]

#: more of the same kinds, run in this process through the same main()
MORE_CASES = [
    ("image-size-not-int", FIT + ["--image-size", "big"], 2, "argument --image-size: invalid int value: 'big'"),
    (
        "randomized-without-K",
        FIT + ["--method", "randomized"],
        2,
        "--components: is required for the randomized method",
    ),
    ("dist-timeout-0", FIT + ["--dist-timeout", "0"], 2, "--dist-timeout: must be > 0"),
    ("cache-gib-negative", FIT + ["--cache-gib", "-1"], 2, "--cache-gib: must be >= 0.0, got -1.0"),
    ("gram-without-K", FIT + ["--method", "gram"], 2, "--components: is required for the gram method"),
    ("gram-K-of-N", FIT + ["--method", "gram", "--components", "12"], 1, "at most N - 1 = 11 components"),
    ("data-is-a-file", FIT + ["--data", "{tmp}/afile"], 2, "--data: '{tmp}/afile' is a file"),
    (
        "data-unknown-scheme",
        FIT + ["--data", "nope://bucket/set"],
        2,
        "--data: cannot read the MDS index of nope://bucket/set",
    ),
    ("local-for-local-data", FIT + ["--local", "{tmp}/cache"], 2, "--local: is only for remote data"),
    ("info-directory", ["info", "{tmp}"], 2, "'{tmp}' is a directory, not a file"),
    ("info-text-file", ["info", "{tmp}/notes.txt"], 2, "'{tmp}/notes.txt' is not a PCA basis or pixel statistics"),
    ("stats-image-size-0", STATS + ["--image-size", "0"], 2, "--image-size: must be >= 1, got 0"),
    ("stats-batch-size-0", STATS + ["--batch-size", "0"], 2, "--batch-size: must be >= 1, got 0"),
    ("stats-max-images-1", STATS + ["--max-images", "1"], 2, "--max-images: must be >= 2, got 1"),
    ("stats-num-workers-negative", STATS + ["--num-workers", "-1"], 2, "--num-workers: must be >= 0, got -1"),
    ("stats-device-bogus", STATS + ["--device", "bogus"], 2, "--device: 'bogus' is not a device"),
    ("stats-dist-timeout-0", STATS + ["--dist-timeout", "0"], 2, "--dist-timeout: must be > 0"),
    ("stats-split-missing", STATS + ["--split", "validation"], 2, "--split: 'validation' is not a folder in"),
    ("stats-out-is-a-directory", STATS + ["--out", "{tmp}"], 2, "--out: '{tmp}' is a directory"),
    ("stats-no-components", STATS + ["--components", "4"], 2, "unrecognized arguments: --components 4"),
]


def _filler(tmp_path: Path, mds: Path) -> dict:
    unwritable = "/proc/magma-composer" if os.geteuid() == 0 else f"{tmp_path}/ro"  # root writes through 0555
    return {"{mds}": str(mds), "{tmp}": str(tmp_path), "{unwritable}": unwritable}


def _filled(text: str, fill: dict) -> str:
    for key, value in fill.items():
        text = text.replace(key, value)
    return text


def _check_refusal(case, args, status, phrase, tmp_path, fill, before, status_seen, out, err):
    assert status_seen == status, err
    assert "Traceback" not in err
    assert _filled(phrase, fill) in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG} {args[0]}: error: "), err
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary file left
    if case in ("out-exists", "stats-out-exists"):
        assert (tmp_path / "exists.pt").read_bytes() == b"precious"


@pytest.mark.parametrize("case, args, status, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(case, args, status, phrase, mds, basis_file, tmp_path, capsys, monkeypatch):
    """Every case through the command's ``main`` in this process (a new process per case costs the imports)."""
    if case == "device-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    env = _setup(case, tmp_path, mds, basis_file)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    fill = _filler(tmp_path, mds)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        status_seen = pca_main([_filled(a, fill) for a in args])
    except SystemExit as e:  # argparse's own refusals
        status_seen = e.code
    captured = capsys.readouterr()
    _check_refusal(case, args, status, phrase, tmp_path, fill, before, status_seen, captured.out, captured.err)


#: the same refusals from a new process, as a user meets them: an option, an existing output, unreachable storage
SUBPROCESS_CASES = ("method-bogus", "out-exists", "data-unreachable", "info-truncated")


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_from_the_command_line(case, mds, basis_file, tmp_path):
    _, args, status, phrase = next(c for c in CASES if c[0] == case)
    env = _setup(case, tmp_path, mds, basis_file)
    fill = _filler(tmp_path, mds)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(*[_filled(a, fill) for a in args], cwd=tmp_path, env=env)
    _check_refusal(case, args, status, phrase, tmp_path, fill, before, result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("case, args, status, phrase", MORE_CASES, ids=[c[0] for c in MORE_CASES])
def test_more_bad_input_in_process(case, args, status, phrase, mds, basis_file, tmp_path, capsys, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    _setup(case, tmp_path, mds, basis_file)
    argv = [a.replace("{mds}", str(mds)).replace("{tmp}", str(tmp_path)) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        status_seen = pca_main(argv)
    except SystemExit as e:  # argparse's own refusals (with its usage line)
        status_seen = e.code
    err = capsys.readouterr().err
    assert status_seen == status and phrase.replace("{tmp}", str(tmp_path)) in err, err
    if case not in ("image-size-not-int", "stats-no-components"):
        assert err.count("\n") == 1 and err.startswith(f"{PROG} {args[0]}: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_out_is_checked_before_any_shard_is_read(mds, tmp_path):
    """A data set whose shards are gone: the --out refusal comes first, so no work was done before it."""
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "train" / "index.json").write_bytes((mds / "train" / "index.json").read_bytes())
    (tmp_path / "exists.pt").write_bytes(b"precious")
    args = ["fit", "--data", str(broken), "--split", "train", "--image-size", "8", "--no-progress"]
    refused = run_cli(*args, "--out", str(tmp_path / "exists.pt"), cwd=tmp_path)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    # with --overwrite the fit starts and fails on the missing shards: the work error is exit status 1
    failed = run_cli(*args, "--out", str(tmp_path / "exists.pt"), "--overwrite", cwd=tmp_path)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.startswith(f"{PROG} fit: error: ") and len(failed.stderr.strip().splitlines()) == 1
    assert (tmp_path / "exists.pt").read_bytes() == b"precious"


def test_overwrite_replaces_and_info_reads_it(mds, tmp_path):
    out = tmp_path / "sub" / "b.pt"
    args = ["fit", "--data", str(mds), "--split", "train", "--image-size", "8", "--out", str(out), "--no-progress"]
    first = run_cli(*args, "--components", "4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"{out}: PCA basis: 3x8x8 (D=192), K=4" in first.stdout
    again = run_cli(*args, "--components", "6", cwd=tmp_path)
    assert again.returncode == 2 and load_basis(out).num_components == 4
    replaced = run_cli(*args, "--components", "6", "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert load_basis(out).num_components == 6
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.pt"]
    info = run_cli("info", str(out), cwd=tmp_path)
    assert info.returncode == 0 and "K=6 components (exact) from 12 images" in info.stdout


def test_stats_writes_a_statistics_file_that_info_and_load_read(mds, tmp_path):
    out = tmp_path / "s.pt"
    args = ["stats", "--data", str(mds), "--split", "train", "--image-size", "8", "--out", str(out), "--no-progress"]
    made = run_cli(*args, "--max-images", "10", cwd=tmp_path)
    assert made.returncode == 0 and made.stderr == "", made.stderr
    assert f"{out}: Pixel statistics: 3x8x8 (D=192) from 10 images" in made.stdout
    stats = load_pixel_stats(out)
    basis = fit_basis(
        str(mds), split="train", image_size=8, max_images=10, components=2, method="randomized", progress=False
    )
    assert torch.equal(stats.mean, basis.mean) and torch.equal(stats.std, basis.std)  # the fit's first pass
    assert run_cli(*args, cwd=tmp_path).returncode == 2  # exists, kept
    info = run_cli("info", str(out), cwd=tmp_path)
    assert info.returncode == 0 and info.stdout.startswith("Pixel statistics: 3x8x8 (D=192) from 10 images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def _small_file_limit() -> None:
    """In the child: files may not grow past 4 KiB (a full disk, as the writer sees it)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_failed_write_leaves_nothing_behind(mds, tmp_path):
    out = tmp_path / "b.pt"
    args = ["fit", "--data", str(mds), "--split", "train", "--image-size", "8", "--out", str(out), "--no-progress"]
    result = run_cli(*args, cwd=tmp_path, preexec_fn=_small_file_limit)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "File too large" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the basis nor its temporary file
    # replacing an existing file: the old one survives a failed write untouched
    out.write_bytes(b"old basis")
    result = run_cli(*args, "--overwrite", cwd=tmp_path, preexec_fn=_small_file_limit)
    assert result.returncode == 1 and out.read_bytes() == b"old basis"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]


@pytest.mark.parametrize(
    "failure, command", [("out-exists", "fit"), ("write-fails-on-rank-0", "fit"), ("write-fails-on-rank-0", "stats")]
)
def test_two_ranks_fail_together_and_exit(failure, command, mds, tmp_path):
    """A failure that only rank 0 sees (it alone checks and writes --out) ends both ranks, none waits forever."""
    out = tmp_path / "b.pt"
    if failure == "out-exists":
        out.write_bytes(b"precious")
    port = str(free_port())
    cmd = [sys.executable, "-m", "magma_composer.pca", command, "--data", str(mds), "--split", "train"]
    cmd += ["--image-size", "8", "--out", str(out), "--device", "cpu", "--no-progress", "--dist-timeout", "60"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": str(rank)}
        env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        limit = _small_file_limit if failure == "write-fails-on-rank-0" and rank == 0 else None
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=limit))
    try:
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all("Traceback" not in e for e in errs), errs
    if failure == "out-exists":
        assert [p.returncode for p in procs] == [2, 2], errs
        assert "--out:" in errs[0] and "already exists" in errs[0] and errs[1] == ""
        assert out.read_bytes() == b"precious"
    else:
        assert [p.returncode for p in procs] == [1, 1], errs
        assert "error (rank 0)" in errs[0] and "File too large" in errs[0]
        assert "error (rank 1): rank 0 failed: OSError" in errs[1]
        assert list(tmp_path.iterdir()) == []


def test_gram_method_from_the_command_line_is_the_exact_basis(mds, tmp_path, capsys):
    out = tmp_path / "g.pt"
    args = ["fit", "--data", str(mds), "--split", "train", "--image-size", "8", "--components", "4", "--no-progress"]
    assert pca_main([*args, "--method", "gram", "--out", str(out), "--cache-gib", "0.5", "--num-workers", "0"]) == 0
    assert f"{out}: PCA basis: 3x8x8 (D=192), K=4 components (gram) from 12 images" in capsys.readouterr().out
    gram = load_basis(out)
    exact = fit_basis(str(mds), split="train", image_size=8, components=4, method="exact", progress=False)
    cosines = torch.linalg.svdvals(exact.components.double().T @ gram.components.double())
    # largest angle below 1.5e-3 rad: these random images have close eigenvalues (float32 products)
    assert float(cosines.min()) > 1 - 1e-6 and torch.allclose(gram.eigenvalues, exact.eigenvalues, rtol=1e-5)
