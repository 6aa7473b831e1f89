"""Frozen features: pooling as ComposerMAE pools, order and duplicates by index, the cache, and two CPU ranks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magma_composer.checkpoints import export_encoder
from magma_composer.evaluate.encoders import load_encoder
from magma_composer.evaluate.features import (
    FeatureOptions,
    cache_key,
    cached_features,
    cached_pooled_features,
    default_cache_dir,
    encode,
    encode_pools,
    extract_features,
    extract_pooled_features,
)
from magma_composer.models import ComposerMAE
from magma_composer.options import OptionError
from magma_composer.precision import default_precision
from tests.conftest import TINY_MODEL, free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSER = Path(sys.executable).parent / "composer"


@pytest.fixture(scope="module")
def model_and_encoder(tmp_path_factory):
    """A tiny ComposerMAE with non-trivial weights, and the same encoder through export_encoder + load_encoder."""
    torch.manual_seed(0)
    model = ComposerMAE(**TINY_MODEL, mask_seed=0).eval()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    export_encoder(model, str(path))
    return model, path


@pytest.fixture
def encoder(model_and_encoder):
    return load_encoder(str(model_and_encoder[1]))


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class Batches:
    """A loader: fixed batches of (images, labels, indices); counts how often it is iterated."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, batch: int = 4) -> None:
        self.parts = [(x[i : i + batch], y[i : i + batch], index[i : i + batch]) for i in range(0, len(x), batch)]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.parts)


# ------------------------------------------------------------------------------------------------ pooling
def test_encode_pools_as_composer_mae(model_and_encoder, encoder):
    model, _ = model_and_encoder
    x = images(5)
    with torch.no_grad():
        latent, _, _ = model.net.encode(x, 0.0)
        cls, mean = encode(encoder.vit, x, "cls"), encode(encoder.vit, x, "mean")
        torch.testing.assert_close(cls, model.extract_features(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cls, latent[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean, model.extract_features(x, pool="mean"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean, latent[:, 1:].mean(dim=1), rtol=1e-5, atol=1e-6)
    assert cls.shape == mean.shape == (5, 32) and not torch.allclose(cls, mean)
    with pytest.raises(OptionError, match="pool: 'max' is not valid"):
        model.extract_features(x, pool="max")
    with pytest.raises(OptionError, match="pool: 'max' is not valid"):
        encode(encoder.vit, x, "max")
    with pytest.raises(
        ValueError, match=r"the encoder takes B x 3 x 32 x 32 images, got \(2, 3, 64, 64\).*image_size to 32"
    ):
        encode(encoder.vit, torch.zeros(2, 3, 64, 64))


# ------------------------------------------------------------------------------------------------ extraction
def test_extract_features_sorts_and_deduplicates_by_index(model_and_encoder, encoder):
    model, _ = model_and_encoder
    x, y = images(10), torch.arange(10) % 3
    # out of order, with samples 2 and 7 repeated (a sampler's padding)
    order = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4, 2, 7])
    loader = Batches(x[order], y[order], order)
    for pool in ("cls", "mean"):
        f, labels = extract_features(encoder, loader, pool=pool, precision="fp32")  # as the float32 model below
        assert f.dtype == torch.float32 and labels.dtype == torch.int64 and f.shape == (10, 32)
        assert torch.equal(labels, y)
        torch.testing.assert_close(f, model.extract_features(x, pool=pool), rtol=1e-5, atol=1e-6)
    assert not encoder.vit.training and next(encoder.vit.parameters()).device.type == "cpu"


def test_several_poolings_from_one_pass(encoder):
    x, y = images(10), torch.arange(10) % 3
    order = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4, 2])
    loader = Batches(x[order], y[order], order)
    both = extract_pooled_features(encoder, loader, ["mean", "cls"], precision="fp32")
    assert loader.passes == 1 and list(both) == ["mean", "cls"]
    for pool in ("cls", "mean"):
        single = extract_features(encoder, loader, pool=pool, precision="fp32")
        assert torch.equal(both[pool][0], single[0]) and torch.equal(both[pool][1], single[1])
    with torch.no_grad():
        pooled = encode_pools(encoder.vit, x, ("cls", "mean"))
        assert torch.equal(pooled["cls"], encode(encoder.vit, x, "cls"))
    refusals = [
        (["cls", "cls"], "pools: names a pooling twice"),
        ([], "pools: expected a non-empty"),
        ("cls", "pools: expected a non-empty list"),
        (["max"], "pool: 'max' is not valid"),
    ]
    for bad, message in refusals:
        with pytest.raises(OptionError, match=message):
            extract_pooled_features(encoder, loader, bad)


def test_cached_poolings_share_the_single_pool_files(encoder, tmp_path):
    x, y = images(8), torch.arange(8) % 2
    loader = Batches(x, y, torch.arange(8))
    cls = cached_features(encoder, loader, DATA, pool="cls", cache_dir=tmp_path)
    assert loader.passes == 1
    # cls is cached: only mean is extracted, in one more pass; both come back in the order asked
    both = cached_pooled_features(encoder, loader, DATA, ["mean", "cls"], cache_dir=tmp_path)
    assert loader.passes == 2 and list(both) == ["mean", "cls"] and len(list(tmp_path.iterdir())) == 2
    assert torch.equal(both["cls"][0], cls[0])
    # and what it wrote is the file cached_features reads
    mean = cached_features(encoder, loader, DATA, pool="mean", cache_dir=tmp_path)
    assert loader.passes == 2 and torch.equal(mean[0], both["mean"][0])
    fresh = cached_pooled_features(encoder, loader, {**DATA, "n": 9}, ["cls", "mean"], cache_dir=tmp_path)
    assert loader.passes == 3 and torch.equal(fresh["mean"][0], mean[0]) and len(list(tmp_path.iterdir())) == 4


def test_extract_features_refuses_bad_loaders(encoder):
    x = images(4)
    with pytest.raises(ValueError, match=r"needs batches of \(images, labels, indices\), got a 2-tuple.*return_index"):
        extract_features(encoder, [(x, torch.zeros(4))])
    with pytest.raises(ValueError, match="test: the loader yielded no samples"):
        extract_features(encoder, [], desc="test")
    clash = Batches(torch.cat([x, x[:1]]), torch.tensor([0, 1, 2, 3, 5]), torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="sample index 0 came with two different labels"):
        extract_features(encoder, clash)
    with pytest.raises(ValueError, match="image_size to 32"):
        extract_features(encoder, [(torch.zeros(2, 3, 16, 16), torch.zeros(2), torch.arange(2))])
    with pytest.raises(OptionError, match="precision: 'fp64' is not valid"):
        extract_features(encoder, [], precision="fp64")


def test_bf16_autocast_returns_float32(model_and_encoder, encoder):
    model, _ = model_and_encoder
    x = images(6)
    f, _ = extract_features(
        encoder, Batches(x, torch.zeros(6, dtype=torch.long), torch.arange(6)), precision="amp_bf16"
    )
    exact = model.extract_features(x)
    assert f.dtype == torch.float32 and not torch.equal(f, exact)  # computed in bfloat16...
    torch.testing.assert_close(f, exact, rtol=0.1, atol=0.1)  # ...and close to the float32 features


def test_real_streaming_loader_with_indices(model_and_encoder, encoder, demo_mds):
    from magma_composer.data.dataset import StreamingImageDataset
    from magma_composer.data.loader import build_image_dataloader

    model, _ = model_and_encoder
    options = dict(remote=str(demo_mds), split="test", image_size=32)  # shuffled: the indices restore the order
    loader = build_image_dataloader(batch_size=8, num_workers=0, train=False, return_index=True, **options)
    f, y = extract_features(encoder, loader, precision="fp32")  # as the float32 model below
    loader.dataset.release()
    plain = StreamingImageDataset(**options, train=False, shuffle=False, batch_size=8)
    try:
        x = torch.stack([plain[i][0] for i in range(80)])
        labels = torch.tensor([plain[i][1] for i in range(80)])
    finally:
        plain.release()
    assert f.shape == (80, 32) and torch.equal(y, labels)
    torch.testing.assert_close(f, model.extract_features(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ cache
DATA = {"remote": "/data/demo", "split": "test", "image_size": 32, "normalize": "imagenet", "n": 8}


def test_cache_hit_mismatch_and_corruption(encoder, tmp_path, caplog):
    x, y = images(8), torch.arange(8) % 2
    loader = Batches(x, y, torch.arange(8))
    first = cached_features(encoder, loader, DATA, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert loader.passes == 1 and len(files) == 1 and files[0].suffix == ".pt"
    # the default precision is the machine's (amp_bf16 on a CPU with native bf16)
    assert torch.load(files[0], weights_only=True)["key"] == cache_key(encoder, "cls", default_precision("cpu"), DATA)

    # hit: the loader is not touched, the same tensors come back
    again = cached_features(encoder, loader, DATA, cache_dir=tmp_path)
    assert loader.passes == 1 and all(torch.equal(a, b) for a, b in zip(first, again))

    # another data description, another pool: other files, computed
    cached_features(encoder, loader, {**DATA, "split": "train"}, cache_dir=tmp_path)
    mean = cached_features(encoder, loader, DATA, pool="mean", cache_dir=tmp_path)
    assert loader.passes == 3 and len(list(tmp_path.iterdir())) == 3 and not torch.equal(mean[0], first[0])

    # a file at the right name that holds another key is not trusted
    payload = torch.load(files[0], weights_only=True)
    payload["key"] = {**payload["key"], "encoder_sha256": "0" * 64}
    payload["features"] = torch.zeros_like(payload["features"])
    torch.save(payload, files[0])
    with caplog.at_level(logging.WARNING):
        recomputed = cached_features(encoder, loader, DATA, cache_dir=tmp_path)
    assert loader.passes == 4 and torch.equal(recomputed[0], first[0]) and "holds another key" in caplog.text
    assert torch.equal(torch.load(files[0], weights_only=True)["features"], first[0])  # rewritten

    # a damaged file: recomputed and rewritten
    files[0].write_bytes(files[0].read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        recomputed = cached_features(encoder, loader, DATA, cache_dir=tmp_path)
    assert loader.passes == 5 and torch.equal(recomputed[0], first[0]) and "unreadable" in caplog.text
    cached_features(encoder, loader, DATA, cache_dir=tmp_path)
    assert loader.passes == 5

    # wrong content under the right key (labels of another type): recomputed
    payload = torch.load(files[0], weights_only=True)
    torch.save({**payload, "labels": payload["labels"].float()}, files[0])
    cached_features(encoder, loader, DATA, cache_dir=tmp_path)
    assert loader.passes == 6


def test_cache_key_tells_encoders_apart(model_and_encoder, encoder, tmp_path):
    _, path = model_and_encoder
    random = load_encoder(str(path), weights="random")
    loader = Batches(images(4), torch.zeros(4, dtype=torch.long), torch.arange(4))
    a = cached_features(encoder, loader, DATA, cache_dir=tmp_path)
    b = cached_features(random, loader, DATA, cache_dir=tmp_path)
    assert loader.passes == 2 and not torch.equal(a[0], b[0])
    with pytest.raises(TypeError, match="must be JSON values"):
        cached_features(encoder, loader, {"path": tmp_path}, cache_dir=tmp_path)


def test_unwritable_cache_is_a_warning(encoder, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    loader = Batches(images(4), torch.zeros(4, dtype=torch.long), torch.arange(4))
    with caplog.at_level(logging.WARNING):
        f, _ = cached_features(encoder, loader, DATA, cache_dir=blocker / "sub")
    assert f.shape == (4, 32) and "could not be written" in caplog.text


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "magma_composer" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "magma_composer" / "features"


def test_feature_options(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    loader = Batches(images(4), torch.zeros(4, dtype=torch.long), torch.arange(4))
    options = FeatureOptions(pool="mean")
    f, _ = options.features(encoder, loader, data_key=DATA)
    assert len(list((tmp_path / "xdg" / "magma_composer" / "features").iterdir())) == 1
    options.features(encoder, loader, data_key=DATA)
    assert loader.passes == 1
    uncached = FeatureOptions(pool="mean", cache=False)
    assert torch.equal(uncached.features(encoder, loader, data_key=DATA)[0], f) and loader.passes == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for kwargs, message in (
        ({"pool": "max"}, "pool: 'max' is not valid"),
        ({"cache": "yes"}, "cache: expected true or false"),
        ({"cache": False, "cache_dir": str(tmp_path)}, "cache_dir: has no effect with cache: false"),
        ({"cache_dir": str(blocker)}, "cache_dir: .*file is a file, not a folder"),
        ({"precision": "amp_fp8"}, "precision: 'amp_fp8' is not valid"),
    ):
        with pytest.raises(OptionError, match=message):
            FeatureOptions(**kwargs)


# ------------------------------------------------------------------------------------------------ two ranks
RANK_SCRIPT = """
import sys
import torch
from composer.utils import dist
from torch.utils.data import DataLoader, TensorDataset
from magma_composer.evaluate.encoders import load_encoder
from magma_composer.evaluate.features import cached_features, extract_features, extract_pooled_features

torch.set_num_threads(1)
dist.initialize_dist("cpu", timeout=120)
encoder_path, cache_dir, out = sys.argv[1:4]
n = 11  # odd: the sampler pads rank 1 with a repeat of sample 0
g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3, torch.arange(n))
sampler = dist.get_sampler(data, shuffle=True, drop_last=False)
loader = DataLoader(data, batch_size=2, sampler=sampler)
encoder = load_encoder(encoder_path)
local = sum(len(b[2]) for b in loader)
f, y = extract_features(encoder, loader, pool="mean")
pooled = extract_pooled_features(encoder, loader, ["cls", "mean"])
assert torch.equal(pooled["mean"][0], f) and torch.equal(pooled["cls"][1], y)
key = {"n": n}
c1 = cached_features(encoder, loader, key, pool="mean", cache_dir=cache_dir)
passes = []
class Counting:
    def __iter__(self):
        passes.append(1)
        return iter(loader)
c2 = cached_features(encoder, Counting(), key, pool="mean", cache_dir=cache_dir)
if dist.get_global_rank() == 0:
    torch.save({"world": dist.get_world_size(), "local": local, "f": f, "y": y, "c1": c1, "c2": c2,
                "passes": len(passes), "data": data.tensors}, out)
dist.barrier()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_give_the_single_process_features(model_and_encoder, tmp_path):
    if not COMPOSER.exists():
        pytest.skip(f"the composer launcher is not installed beside {sys.executable}")
    _, path = model_and_encoder
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        str(COMPOSER),
        "-n",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        str(path),
        str(tmp_path / "c"),
        str(out),
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("two ranks did not finish in 300 s (a hung collective?)")
    assert proc.returncode == 0 and out.exists(), f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2 and got["local"] == 6  # 11 samples -> 6 per rank, one of them a repeat

    x, labels, index = got["data"]
    encoder = load_encoder(str(path))
    single_f, single_y = extract_features(encoder, Batches(x, labels, index), pool="mean")
    assert got["y"].shape == (11,) and torch.equal(got["y"], single_y)
    torch.testing.assert_close(got["f"], single_f, rtol=1e-5, atol=1e-6)
    # the cache: computed once on both ranks, written by rank 0, then read by both without touching the loader
    assert all(torch.equal(a, b) for a, b in zip(got["c1"], got["c2"])) and got["passes"] == 0
    torch.testing.assert_close(got["c2"][0], single_f, rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "c").iterdir())) == 1
