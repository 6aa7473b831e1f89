"""A run's checkpoints belong to it: output paths checked first, run records, hashes beside checkpoints.

Real Composer Trainer runs of a tiny ComposerMAE (2-4 CPU steps) write real checkpoints; the tests then damage
or reuse them as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.checkpoints import (
    HASH_SUFFIX,
    LATEST_CHECKPOINT,
    RUN_RECORD,
    CheckpointError,
    CheckpointHashes,
    RunRecord,
    check_output_file,
    check_output_folder,
    export_encoder,
    guard_run,
    resolve_run_name,
    verify_checkpoint,
    write_atomic,
    write_with_hash,
)
from magma_composer.models import ComposerMAE
from tests.conftest import REPO, TINY_MODEL, quick_trainer, tiny_recipe


def tiny_model(**overrides) -> ComposerMAE:
    return ComposerMAE(**{**TINY_MODEL, **overrides}, mask_seed=0)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=generator)
    return DataLoader(TensorDataset(images, torch.arange(16) % 10), batch_size=4)


def run(folder, run_name, model=None, autoresume=False, save_overwrite=False, guard=True, **kwargs):
    """guard_run (as train.py does before building the Trainer), then a real Trainer run that saves checkpoints."""
    model = model or tiny_model()
    if guard:
        guard_run(str(folder), run_name, autoresume, save_overwrite, model)
    kwargs.setdefault("max_duration", "2ba")
    kwargs.setdefault("save_interval", "1ba")
    trainer, _ = quick_trainer(
        model,
        [],
        loader(),
        callbacks=[CheckpointHashes()],
        save_folder=str(folder),
        run_name=run_name,
        autoresume=autoresume,
        save_overwrite=save_overwrite,
        **kwargs,
    )
    trainer.fit()
    trainer.close()
    return trainer


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry of ``folder``: a link's target, a file's bytes hash and mtime."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[p.name] = ("link", os.readlink(p))
        elif p.is_file():
            out[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A folder written by run 'run-a': run.json and two checkpoints (ba1, ba2), each with its hash."""
    folder = tmp_path_factory.mktemp("run-a") / "checkpoints"
    run(folder, "run-a")
    return folder


@pytest.fixture
def run_a(finished_run, tmp_path) -> Path:
    """A private copy of :func:`finished_run` (symlinks kept)."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(finished_run, folder, symlinks=True)
    return folder


# ------------------------------------------------------------------------------------------------ run folders
def test_finished_run_writes_its_record(finished_run):
    record = json.loads((finished_run / RUN_RECORD).read_text())
    model = tiny_model()
    assert record["run_name"] == "run-a"
    assert record["model_class"] == "magma_composer.models.mae.ComposerMAE"
    assert record["parameter_shapes"] == {n: list(p.shape) for n, p in model.named_parameters()}
    assert record["magma_composer_version"] and record["created"].endswith("+00:00")
    assert RunRecord.read(str(finished_run)).run_name == "run-a"


@pytest.mark.parametrize("save_overwrite", [False, True])
def test_another_runs_folder_refused(run_a, save_overwrite):
    before = snapshot(run_a)
    with pytest.raises(CheckpointError) as info:
        guard_run(str(run_a), "run-b", autoresume=False, save_overwrite=save_overwrite, model=tiny_model())
    message = str(info.value)
    assert str(run_a) in message and "'run-a'" in message and "'run-b'" in message
    assert "Pick another save_folder, or the same run_name" in message
    assert snapshot(run_a) == before  # nothing written, nothing removed


def test_a_record_without_checkpoints_is_taken_over(tmp_path):
    """A run that failed before its first checkpoint (bad data, say) does not lock its folder for the retry."""
    folder = tmp_path / "checkpoints"
    guard_run(str(folder), "generated-1", autoresume=False, save_overwrite=False, model=tiny_model())
    guard_run(str(folder), "generated-2", autoresume=False, save_overwrite=False, model=tiny_model())
    assert json.loads((folder / RUN_RECORD).read_text())["run_name"] == "generated-2"


def test_autoresume_with_other_run_name_refused_with_what_it_found(run_a):
    before = snapshot(run_a)
    with pytest.raises(CheckpointError) as info:
        guard_run(str(run_a), "run-b", autoresume=True, save_overwrite=False, model=tiny_model())
    created = json.loads((run_a / RUN_RECORD).read_text())["created"]
    assert f"belongs to run 'run-a' ({RUN_RECORD}, created {created})" in str(info.value)
    assert "not to this run 'run-b'" in str(info.value)
    assert snapshot(run_a) == before


def test_folder_without_run_record_refused_unless_empty(tmp_path):
    foreign = tmp_path / "foreign"
    run(foreign, "plain-composer", guard=False)  # a plain Composer run: checkpoints, no run.json
    with pytest.raises(CheckpointError, match=r"already holds ep0-ba1-rank0\.pt, ep0-ba2-rank0\.pt, latest-rank0\.pt"):
        guard_run(str(foreign), "mine", autoresume=False, save_overwrite=True, model=tiny_model())
    assert not (foreign / RUN_RECORD).exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    guard_run(str(empty), "mine", autoresume=False, save_overwrite=False, model=tiny_model())
    assert RunRecord.read(str(empty)).run_name == "mine"
    missing = tmp_path / "new" / "{run_name}" / "checkpoints"  # {run_name} is filled in as Composer does
    guard_run(str(missing), "mine", autoresume=False, save_overwrite=False, model=tiny_model())
    assert RunRecord.read(str(tmp_path / "new" / "mine" / "checkpoints")).run_name == "mine"


def test_same_run_without_autoresume_refused_unless_overwrite(run_a):
    before = snapshot(run_a)
    with pytest.raises(CheckpointError) as info:
        guard_run(str(run_a), "run-a", autoresume=False, save_overwrite=False, model=tiny_model())
    assert "set autoresume: true to continue this run, or choose another run_name/save_folder" in str(info.value)
    assert snapshot(run_a) == before
    # save_overwrite is the run's own choice to replace its checkpoints: accepted, and the run succeeds
    trainer = run(run_a, "run-a", save_overwrite=True)
    assert int(trainer.state.timestamp.batch) == 2


def test_autoresume_same_run_continues(run_a):
    record = (run_a / RUN_RECORD).read_text()
    trainer = run(run_a, "run-a", autoresume=True, max_duration="4ba")
    assert int(trainer.state.timestamp.batch) == 4
    assert (run_a / RUN_RECORD).read_text() == record  # the run's record stays as written
    for name in ("ep0-ba3-rank0.pt", "ep0-ba4-rank0.pt"):
        assert (run_a / name).is_file() and (run_a / (name + HASH_SUFFIX)).is_file()
    assert os.readlink(run_a / LATEST_CHECKPOINT) == "ep0-ba4-rank0.pt"


def test_model_shape_mismatch_on_autoresume_refused(run_a):
    other = tiny_model(decoder_dim=48)
    recorded = {n: list(p.shape) for n, p in tiny_model().named_parameters()}
    name, shape = next((n, list(p.shape)) for n, p in other.named_parameters() if recorded.get(n) != list(p.shape))
    with pytest.raises(CheckpointError) as info:
        guard_run(str(run_a), "run-a", autoresume=True, save_overwrite=False, model=other)
    message = str(info.value)
    assert f"parameter {name} has shape {recorded[name]} in the run's model but {shape} in this one" in message
    assert str(run_a) in message and "'run-a'" in message


# ------------------------------------------------------------------------------------------------ damaged checkpoints
def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped bit in the middle (the tensors' bytes): torch.load reads it without noticing
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_checkpoint_refused_by_its_hash(run_a, how):
    checkpoint = run_a / "ep0-ba2-rank0.pt"
    verify_checkpoint(str(checkpoint))  # intact: accepted
    damage(checkpoint, how)
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(str(checkpoint))
    assert str(checkpoint) in str(info.value)
    assert "truncated or altered: its sha256" in str(info.value)
    # through the symlink autoresume follows, and from guard_run before an autoresumed Trainer is built
    latest = run_a / LATEST_CHECKPOINT
    with pytest.raises(CheckpointError, match=re.escape(f"{latest} (-> {checkpoint.resolve()})")):
        verify_checkpoint(str(latest))
    with pytest.raises(CheckpointError, match="truncated or altered"):
        guard_run(str(run_a), "run-a", autoresume=True, save_overwrite=False, model=tiny_model())


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_checkpoint_without_hash_refused_by_its_structure(run_a, how):
    checkpoint = run_a / "ep0-ba1-rank0.pt"
    (run_a / ("ep0-ba1-rank0.pt" + HASH_SUFFIX)).unlink()
    verify_checkpoint(str(checkpoint))  # intact: accepted
    damage(checkpoint, how)
    if how == "truncated":  # what Composer's loading would say
        with pytest.raises(RuntimeError, match="failed finding central directory"):
            torch.load(checkpoint, weights_only=False)
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(str(checkpoint))
    assert str(checkpoint) in str(info.value)


def test_missing_checkpoint_named(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {tmp_path / 'nope.pt'} does not exist")):
        verify_checkpoint(str(tmp_path / "nope.pt"))


# ------------------------------------------------------------------------------------------------ hashes
def test_checkpoint_hashes_written_for_every_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    trainer, _ = quick_trainer(
        tiny_model(), [], loader(), "2ba", [CheckpointHashes()], save_folder=str(folder), save_interval="1ba"
    )
    trainer.fit()  # checked before close(): the last checkpoint is hashed during fit, at FIT_END at the latest
    checkpoints = sorted(folder.glob("ep*-rank0.pt"))
    assert [p.name for p in checkpoints] == ["ep0-ba1-rank0.pt", "ep0-ba2-rank0.pt"]
    assert sorted(folder.glob("*" + HASH_SUFFIX)) == [Path(str(p) + HASH_SUFFIX) for p in checkpoints]
    for checkpoint in checkpoints:
        expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        assert (folder / (checkpoint.name + HASH_SUFFIX)).read_text() == f"{expected}  {checkpoint.name}\n"
    trainer.close()


def test_checkpoint_hashes_follow_rotation(tmp_path):
    folder = tmp_path / "ckpt"
    run(folder, "rotated", max_duration="3ba", save_interval="1ba", save_num_checkpoints_to_keep=1)
    assert sorted(p.name for p in folder.iterdir()) == [
        "ep0-ba3-rank0.pt",
        "ep0-ba3-rank0.pt" + HASH_SUFFIX,
        LATEST_CHECKPOINT,
        RUN_RECORD,
    ]
    verify_checkpoint(str(folder / LATEST_CHECKPOINT))


def test_composer_formats_run_name_in_save_folder(tmp_path):
    run(tmp_path / "{run_name}" / "checkpoints", "named", max_duration="1ba")
    assert (tmp_path / "named" / "checkpoints" / "ep0-ba1-rank0.pt").is_file()
    assert (tmp_path / "named" / "checkpoints" / RUN_RECORD).is_file()


# ------------------------------------------------------------------------------------------------ output paths
def test_check_output_folder_refuses_a_file_and_a_path_under_a_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match=re.escape(f"save_folder: {a_file} is a file, not a folder")):
        check_output_folder(str(a_file), "save_folder")
    under = a_file / "checkpoints"
    with pytest.raises(CheckpointError, match=re.escape(f"save_folder: {under} cannot be created: {a_file} is a file")):
        check_output_folder(str(under), "save_folder")
    check_output_folder(str(tmp_path / "new" / "folder"), "save_folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created, the probe removed
    check_output_folder("s3://bucket/prefix", "save_folder")  # remote: not checked here


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_check_output_folder_refuses_an_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for path in (locked, locked / "sub"):
            with pytest.raises(CheckpointError, match=re.escape(f"save_folder: cannot write to {path}")):
                check_output_folder(str(path), "save_folder")
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_check_output_folder_refuses_an_unwritable_place_even_for_root():
    with pytest.raises(CheckpointError, match=re.escape("save_folder: cannot write to /proc/magma-runs")):
        check_output_folder("/proc/magma-runs", "save_folder")


def test_check_output_file(tmp_path):
    existing = tmp_path / "encoder.pt"
    existing.write_bytes(b"old")
    with pytest.raises(CheckpointError) as info:
        check_output_file(str(existing), "export_encoder", overwrite_option="--overwrite")
    assert str(info.value) == (
        f"export_encoder: {existing} already exists (3 bytes); choose another path, or set --overwrite to replace it"
    )
    check_output_file(str(existing), "export_encoder", overwrite=True)
    with pytest.raises(CheckpointError, match=re.escape(f"export_encoder: {tmp_path} is a folder")):
        check_output_file(str(tmp_path), "export_encoder", overwrite=True)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot be created: {existing} is a file")):
        check_output_file(str(existing / "encoder.pt"), "export_encoder")
    check_output_file(str(tmp_path / "sub" / "new.pt"), "export_encoder")
    assert existing.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt"]


def test_failed_write_leaves_no_tmp(tmp_path):
    target = tmp_path / "encoder.pt"
    unpicklable = {"weight": torch.zeros(1000), "fn": lambda: None}  # torch.save fails after writing bytes
    with pytest.raises(Exception, match="pickle"):
        write_atomic(target, lambda f: torch.save(unpicklable, f))
    assert list(tmp_path.iterdir()) == []
    # replacing an existing file (and its hash): a failure leaves both as they were
    digest = write_with_hash(target, lambda f: f.write(b"good"))
    before = snapshot(tmp_path)
    with pytest.raises(Exception, match="pickle"):
        write_with_hash(target, lambda f: torch.save(unpicklable, f))
    assert snapshot(tmp_path) == before and target.read_bytes() == b"good"
    assert (tmp_path / "encoder.pt.sha256").read_text() == f"{digest}  encoder.pt\n"


def test_export_encoder_writes_a_verified_timm_state_dict(tmp_path):
    model = tiny_model()
    path = tmp_path / "out" / "encoder.pt"
    digest = export_encoder(model, str(path))
    assert (tmp_path / "out" / "encoder.pt.sha256").read_text() == f"{digest}  encoder.pt\n"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    verify_checkpoint(str(path))
    fresh = tiny_model()
    fresh.encoder.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for a, b in zip(fresh.encoder.state_dict().values(), model.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="already exists"):
        check_output_file(str(path), "export_encoder")


# ------------------------------------------------------------------------------------------------ run names, demo
def test_resolve_run_name(monkeypatch):
    monkeypatch.delenv("COMPOSER_RUN_NAME", raising=False)
    monkeypatch.delenv("RUN_NAME", raising=False)
    assert resolve_run_name("given") == "given"
    first, second = resolve_run_name(None), resolve_run_name(None)
    assert first != second
    assert re.fullmatch(r"[A-Za-z0-9._-]+", first)
    monkeypatch.setenv("RUN_NAME", "from-env")
    assert resolve_run_name(None) == "from-env"


def test_demo_recipe_gives_each_run_its_own_folders():
    recipe = yaml.safe_load((REPO / "yamls" / "demo" / "mae.yaml").read_text())
    assert "run_name" not in recipe and not recipe.get("autoresume", False)
    outputs = [recipe["save_folder"], recipe["callbacks"]["reconstruction_images"]["folder"]]
    if recipe.get("export_encoder"):
        outputs.append(recipe["export_encoder"])
    for output in outputs:
        assert "{run_name}" in output, output
    names = resolve_run_name(None), resolve_run_name(None)
    assert len({output.format(run_name=name) for output in outputs for name in names}) == 2 * len(outputs)


def test_main_refuses_another_runs_folder(demo_mds, tmp_path, capsys):
    from magma_composer.train import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(demo_mds, max_duration="2ba")))
    folder = tmp_path / "shared-folder"
    main([str(recipe), f"save_folder={folder}", "run_name=first-run", "save_interval=2ba"])
    assert RunRecord.read(str(folder)).run_name == "first-run"
    before = snapshot(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(recipe), f"save_folder={folder}", "run_name=second-run", "save_interval=2ba"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'first-run'" in err and "'second-run'" in err
    assert snapshot(folder) == before


RANK_SCRIPT = """
import json, sys
from composer.utils import dist
from magma_composer.checkpoints import CheckpointError, guard_run, resolve_run_name
from magma_composer.models import ComposerMAE

dist.initialize_dist("cpu", timeout=60)
model = ComposerMAE(**json.loads(sys.argv[3]), mask_seed=0)
out = {"rank": dist.get_global_rank(), "generated": resolve_run_name(None)}
for key, folder in (("fresh", sys.argv[1]), ("foreign", sys.argv[2])):
    try:
        guard_run(folder, "run-b", autoresume=False, save_overwrite=False, model=model)
        out[key] = "ok"
    except CheckpointError as exc:
        out[key] = str(exc)
print("RESULT " + json.dumps(out), flush=True)
"""


def test_guard_run_on_two_ranks_decides_once(run_a, tmp_path):
    """Two gloo ranks: one generated run name, one run.json, the same refusal on every rank."""
    import subprocess

    from tests.conftest import free_port

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    fresh = tmp_path / "fresh"
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    base.update(LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name in ("COMPOSER_RUN_NAME", "RUN_NAME"):
        base.pop(name, None)
    args = [sys.executable, str(script), str(fresh), str(run_a), json.dumps(TINY_MODEL)]
    procs = [
        subprocess.Popen(args, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = []
    for proc in procs:
        try:
            stdout, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two ranks did not finish in 180 s (a hung collective?)")
        assert proc.returncode == 0, stdout
        results.append(json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT "))))
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["generated"] == results[1]["generated"]
    assert results[0]["fresh"] == results[1]["fresh"] == "ok"
    assert RunRecord.read(str(fresh)).run_name == "run-b" and sorted(p.name for p in fresh.iterdir()) == [RUN_RECORD]
    assert results[0]["foreign"] == results[1]["foreign"] and "belongs to run 'run-a'" in results[0]["foreign"]
