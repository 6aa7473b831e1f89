"""Shared fixtures: small real data sets (the demo shapes, CIFAR-10 JPEGs) and tiny recipes."""

from __future__ import annotations

import copy
import functools
import json
import socket
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_TARBALL = SHARED_DATA / "cifar10-jpeg.tar.gz"
#: reference values for the regularisers, committed with the tests so a plain clone can check itself
GOLDEN_FILE = REPO / "tests" / "data" / "golden_vectors_v1.json"

# one intra-op thread: on 2 shared cores, with loader workers and launcher ranks beside the test, more
# threads oversubscribe the CPU and tiny steps get 5-25x slower
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _release_streaming_datasets(monkeypatch):
    """Frees each test's streaming shared memory when it ends: streaming keeps it until the process exits and every
    new data set opens all earlier ones, so a whole suite in one process would run out of file descriptors."""
    from magma_composer.data.checked_streaming import CheckedStreamingDataset

    made = []
    original = CheckedStreamingDataset.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(CheckedStreamingDataset, "__init__", init)
    yield
    for dataset in made:
        dataset.release()


#: a model small enough for a few CPU steps in a test
TINY_MODEL = {
    "encoder": {"embed_dim": 32, "depth": 4, "num_heads": 2},
    "img_size": 32,
    "patch_size": 8,
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def is_evidence_settings(path: Path) -> bool:
    """yamls/evidence/<preset>/{eval,matrix}.yaml: the evidence matrix's evaluation settings and seeds, not recipes
    (checked by tests/test_evidence.py)."""
    return path.parent.parent.name == "evidence" and path.name in ("eval.yaml", "matrix.yaml")


def load_script(path: Path):
    """Imports a script that is not in a package (``experiments/*.py``) as the module named after its file."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def run_module(module: str, *args: str, cwd=REPO, env: dict | None = None, timeout: float = 300, **kwargs):
    """Runs ``python -m module args`` as a new user would (one torch thread, no launcher variables inherited)."""
    import os
    import subprocess
    import sys

    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    base = {k: v for k, v in os.environ.items() if k not in launcher}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def golden() -> dict:
    """The golden vectors: ``{"magma", "uniformity", "pc_mask", "pmae_loss"}`` -> lists of cases."""
    return json.loads(GOLDEN_FILE.read_text())


@pytest.fixture(scope="session")
def demo_mds(tmp_path_factory) -> Path:
    """A small demo data set (160 train, 80 test images) as MDS shards."""
    from magma_composer.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=160, num_test=80, progress=False)


def extract_cifar(dest: Path, per_class: int, splits=("train", "test")) -> Path:
    """Extracts the first ``per_class`` JPEGs of each class of the shared CIFAR-10 tarball."""
    if not CIFAR_TARBALL.exists():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {CIFAR_TARBALL} (../shared/data beside the repo)")
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TARBALL) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            parts = Path(member.name).parts
            try:
                i = next(i for i, p in enumerate(parts) if p in splits)
            except StopIteration:
                continue
            split, cls = parts[i], parts[i + 1]
            if counts.get((split, cls), 0) >= per_class:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            target = dest / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:
                target.write_bytes(src.read())
    return dest


@pytest.fixture(scope="session")
def cifar_jpegs(tmp_path_factory) -> Path:
    """``train/<class>/*.jpg`` and ``test/<class>/*.jpg``: 20 real CIFAR-10 JPEGs per class and split."""
    return extract_cifar(tmp_path_factory.mktemp("cifar"), per_class=20)


def tiny_recipe(remote: Path, **overrides) -> dict:
    """A recipe dict for a few CPU steps on an MDS folder with ``train``/``test`` splits."""
    recipe = {
        "run_name": "tiny",
        "seed": 3,
        "model": copy.deepcopy(TINY_MODEL),
        "train_data": {"remote": str(remote), "split": "train", "batch_size": 16, "num_workers": 0},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"warmup": "1ba"},
        "max_duration": "4ba",
        "progress_bar": False,
    }
    recipe.update(overrides)
    return recipe


def quick_trainer(model, algorithms, loader, max_duration="2ba", callbacks=(), **kwargs):
    """A CPU Trainer with SGD and an in-memory logger, for a few steps of an algorithm test."""
    from composer import Trainer
    from composer.loggers import InMemoryLogger

    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=max_duration,
        algorithms=algorithms,
        callbacks=list(callbacks),
        loggers=[logger],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
        progress_bar=False,
        log_to_console=False,
        device="cpu",
        seed=0,
        **kwargs,
    )
    return trainer, logger
