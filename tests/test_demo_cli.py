"""The demo data set command: bad input is one clean error, a folder it did not write is never touched, and
running it again keeps or finishes its own data set."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from streaming import StreamingDataset

from magma_composer.data.demo import DemoError, write_demo_dataset
from tests.conftest import run_module
from tests.test_convert_safety import REPR, _snapshot, _unwritable

PROG = "python -m magma_composer.data.demo"


def _demo(*argv: str) -> subprocess.CompletedProcess:
    return run_module("magma_composer.data.demo", *argv)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("demo_cli")
    (tmp / "afile").write_text("a file")
    (tmp / "mine" / "train").mkdir(parents=True)  # a user's own data set, with the demo's folder names
    (tmp / "mine" / "train" / "index.json").write_text('{"version": 2, "shards": []}')
    (tmp / "mine" / "test").mkdir()
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("a user's file")
    (tmp / "bad_manifest").mkdir()
    (tmp / "bad_manifest" / "manifest.json").write_text("{not json")
    return tmp


CASES = [
    ([], "the following arguments are required: --out"),
    (["--out", ""], "--out is empty"),
    (["--out", "{t}/afile"], "afile is a file"),
    (["--out", "{t}/afile/sub"], "cannot be created: {t}/afile is a file"),
    (["--out", "{unwritable}"], "cannot write --out"),
    (["--out", "s3://bucket/demo"], "written to a local folder, not a URL"),
    (["--out", "{t}/mine"], "holds test, train, not a demo data set"),
    (["--out", "{t}/other"], "holds notes.txt, not a demo data set"),
    (["--out", "{t}/bad_manifest"], "holds manifest.json, not a demo data set"),
    (["--out", "{t}/o", "--train", "0"], "--train must be an integer at least 1, got 0"),
    (["--out", "{t}/o", "--test", "-1"], "--test must be an integer at least 1, got -1"),
    (["--out", "{t}/o", "--train", "many"], "invalid int value: 'many'"),
    (["--out", "{t}/o", "--image-size", "0"], "--image-size must be an integer from 1 to 512, got 0"),
    (["--out", "{t}/o", "--image-size", "100000"], "--image-size must be an integer from 1 to 512"),
    (["--out", "{t}/o", "--seed", "-1"], "--seed must be an integer at least 0, got -1"),
]


@pytest.mark.parametrize("argv, phrase", CASES, ids=[" ".join(c[0]) or "none" for c in CASES])
def test_bad_command_line(tree, tmp_path, argv, phrase):
    unwritable = _unwritable(tmp_path)
    if any("{unwritable}" in a for a in argv) and unwritable is None:
        pytest.skip("no folder here that this process cannot write to")
    values = {"t": tree, "unwritable": unwritable}
    before = _snapshot(tree)
    proc = _demo(*[a.format(**values) for a in argv])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{PROG}: error: "), proc.stderr
    assert phrase.format(**values) in errors[0], errors[0]
    assert not REPR.search(errors[0])
    assert _snapshot(tree) == before
    assert not (tree / "o").exists()


def test_rerun_keeps_finishes_or_rewrites_its_own_data_set(tmp_path):
    out = tmp_path / "demo"
    first = _demo("--out", str(out), "--train", "20", "--test", "10")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["num_train"] == 20
    shards = {p: p.stat().st_mtime_ns for p in out.rglob("*.mds")}

    again = _demo("--out", str(out), "--train", "20", "--test", "10")
    assert again.returncode == 0 and "(same options): kept" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in shards} == shards

    # an interrupted run left its marker unfinished and a stray file in its own folder: the rerun rewrites both
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (out / "train" / "shard.99999.mds").write_bytes(b"half")
    assert _demo("--out", str(out), "--train", "20", "--test", "10").returncode == 0
    assert not (out / "train" / "shard.99999.mds").exists()
    assert json.loads((out / "manifest.json").read_text())["complete"] is True

    other = _demo("--out", str(out), "--train", "30", "--test", "10")  # other options: its own data, rewritten
    assert other.returncode == 0, other.stderr
    assert StreamingDataset(local=str(out / "train"), batch_size=1).num_samples == 30


def test_manifest_of_an_earlier_version_is_recognised(tmp_path):
    out = write_demo_dataset(tmp_path / "demo", num_train=4, num_test=2, progress=False)
    legacy = json.loads((out / "manifest.json").read_text())
    del legacy["format"], legacy["complete"]
    (out / "manifest.json").write_text(json.dumps(legacy))
    mtime = (out / "train" / "index.json").stat().st_mtime_ns
    write_demo_dataset(out, num_train=4, num_test=2, progress=False)
    assert (out / "train" / "index.json").stat().st_mtime_ns == mtime


def test_function_checks_its_own_options(tmp_path):
    with pytest.raises(DemoError, match="--image-size must be an integer from 1 to 512, got True"):
        write_demo_dataset(tmp_path / "d", image_size=True)
    with pytest.raises(DemoError, match="holds notes.txt"):
        (tmp_path / "user").mkdir()
        (tmp_path / "user" / "notes.txt").write_text("x")
        write_demo_dataset(tmp_path / "user")
