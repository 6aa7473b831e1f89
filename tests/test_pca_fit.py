"""PCA basis fitting: exact and randomized accuracy against a float64 reference, MDS shards, CLI, ranks, files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter

from magma_composer.data.transforms import eval_transform
from magma_composer.options import OptionError
from magma_composer.pca import (
    PCABasis,
    PixelStats,
    fit_basis,
    fit_pca,
    load_basis,
    load_pixel_stats,
    save_basis,
    save_pixel_stats,
)
from magma_composer.pca.__main__ import main as pca_main
from magma_composer.pca.basis import BASIS_FORMAT, STATS_FORMAT, _write_payload, describe_file
from magma_composer.pca.fit import (
    AUTO_WORKERS_MIN_IMAGES,
    EXACT_MAX_DIM,
    compute_pixel_stats,
    default_cache_gib,
    default_workers,
    fit_pixel_stats,
)
from magma_composer.pca.source import ShardImages, open_shards, split_shards
from tests.conftest import free_port
from tests.s3_server import moto_server, s3  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spaces of orthonormal ``a`` and ``b``."""
    a, b = a.double(), b.double()
    return float(torch.arcsin(torch.linalg.matrix_norm(b - a @ (a.T @ b), ord=2).clamp(max=1.0)))


def reference(x: torch.Tensor):
    """float64 mean, std (ddof 0), eigenvalues (decreasing) and eigenvectors of the covariance of z."""
    x = x.double().reshape(x.shape[0], -1)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    z = (x - mean) / std
    evals, evecs = torch.linalg.eigh(z.T @ z / x.shape[0])
    return mean, std, evals.flip(0), evecs.flip(1)


def planted(n: int, size: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    """``n`` images ``3 x size x size`` around grey: a rank-``rank`` signal of spectrum ``2^(-i/2)`` plus noise.

    The signal's pixel standard deviation is about 0.1, so ``noise`` is the noise-to-signal ratio.
    """
    g = torch.Generator().manual_seed(seed)
    d = 3 * size * size
    spectrum = 0.5 ** (torch.arange(rank, dtype=torch.float64) / 2)
    directions = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
    scale = 0.1 * (d / spectrum.sum()) ** 0.5
    coefficients = torch.randn(n, rank, generator=g, dtype=torch.float64) * spectrum.sqrt() * scale
    x = 0.5 + coefficients @ directions.T + 0.1 * noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.clamp(0, 1).float().reshape(n, 3, size, size)


# ---------------------------------------------------------------------- in-memory accuracy
def test_randomized_matches_exact_eigendecomposition_on_planted_spectrum():
    x = planted(n=1000, size=8, rank=12, noise=0.1)  # D = 192, a clear gap after the 12th eigenvalue
    mean, std, evals, evecs = reference(x)
    k = 12
    basis = fit_pca(lambda: x.split(250), image_size=8, components=k, method="randomized", progress=False)
    assert basis.method == "randomized" and basis.components.shape == (192, k)
    assert basis.components.dtype == torch.float32
    assert max_angle(evecs[:, :k], basis.components) < 1e-3
    rho = evals[:k] / evals.sum()
    assert torch.allclose(basis.ratios, rho, rtol=1e-4, atol=0)
    assert basis.total_variance == pytest.approx(192, rel=1e-12)  # no constant pixel
    assert torch.allclose(basis.mean, mean, rtol=0, atol=1e-12)
    assert torch.allclose(basis.std, std, rtol=1e-9, atol=0)
    # components are orthonormal
    gram = basis.components.double().T @ basis.components.double()
    assert torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=1e-5)


def test_randomized_accuracy_improves_with_power_iterations():
    x = planted(n=600, size=8, rank=40, noise=0.05)  # no spectral gap at K: a hard case
    _, _, _, evecs = reference(x)
    angles = [
        max_angle(
            evecs[:, :12],
            fit_pca(
                lambda: x.split(300), 8, components=12, method="randomized", power_iters=q, oversample=8, progress=False
            ).components,
        )
        for q in (0, 1, 3)
    ]
    assert angles[0] > angles[1] > angles[2]


def test_exact_reproduces_reference_and_full_ratios_sum_to_one():
    x = planted(n=300, size=8, rank=10, noise=0.05)  # D = 192 < N: full rank
    mean, std, evals, evecs = reference(x)
    basis = fit_pca(lambda: x.split(64), image_size=8, progress=False)  # auto -> exact, K = min(N, D)
    assert basis.method == "exact" and basis.num_components == 192 and basis.num_images == 300
    assert torch.allclose(basis.eigenvalues, evals, rtol=1e-9, atol=1e-12)
    assert float(basis.ratios.sum()) == pytest.approx(1.0, rel=1e-9)
    assert max_angle(evecs[:, :20], basis.components[:, :20]) < 1e-5
    truncated = fit_pca(lambda: x.split(64), image_size=8, components=5, method="exact", progress=False)
    assert truncated.num_components == 5 and float(truncated.ratios.sum()) < 1
    assert torch.allclose(truncated.ratios, basis.ratios[:5], rtol=1e-12)


def test_constant_pixels_are_kept_out_of_the_variance():
    x = planted(n=200, size=4, rank=5, noise=0.05)
    x[:, 0, 0, 0] = 0.25  # constant across the data set
    basis = fit_pca(lambda: x.split(50), image_size=4, progress=False)
    assert basis.std[0] == 1.0  # z = 0 there, not 0 / 0
    assert basis.total_variance == pytest.approx(47, rel=1e-9)
    assert torch.isfinite(basis.components).all() and float(basis.ratios.sum()) == pytest.approx(1.0, rel=1e-9)


def test_fit_arguments_are_checked():
    x = planted(n=20, size=4, rank=3, noise=0.05)
    with pytest.raises(OptionError, match="components: is required for the randomized method") as e:
        fit_pca(lambda: x.split(8), 4, method="randomized", progress=False)
    assert e.value.key == "components"
    with pytest.raises(OptionError, match=r"components: must be at most D = channels x image_size\^2 = 48, got 49"):
        fit_pca(lambda: x.split(8), 4, components=49, progress=False)
    with pytest.raises(OptionError, match="method: 'svd' is not valid"):
        fit_pca(lambda: x.split(8), 4, method="svd", progress=False)
    for key, kwargs in [
        ("image_size", {"image_size": 0}),
        ("channels", {"channels": 0}),
        ("components", {"components": 0}),
        ("components", {"components": 2.5}),
        ("power_iters", {"power_iters": -1}),
        ("oversample", {"oversample": -1}),
        ("seed", {"seed": "zero"}),
        ("device", {"device": "bogus"}),
        ("device", {"device": "mps"}),
    ]:
        with pytest.raises(OptionError) as e:
            fit_pca(lambda: pytest.fail("read a batch before checking the options"), **{"image_size": 4, **kwargs})
        assert e.value.key == key
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_pca(lambda: x[:1].split(8), 4, progress=False)
    with pytest.raises(ValueError, match="images have 48 values each, but channels \\* image_size\\^2 = 75"):
        fit_pca(lambda: x.split(8), 5, progress=False)
    with pytest.raises(ValueError, match="exact method needs a D x D float64 matrix, 288 GiB"):
        fit_pca(lambda: iter(()), 256, components=8, method="exact", progress=False)


# ---------------------------------------------------------------------- the gram method, uint8 images, replay
def test_gram_is_the_exact_basis_in_one_pass():
    x = planted(n=300, size=8, rank=12, noise=0.1)  # D = 192
    mean, std, evals, evecs = reference(x)
    reads = []

    def batches():
        reads.append(1)
        return x.split(64)

    for k in (12, 150):  # at the spectral gap, and deep in the noise's near-equal eigenvalues
        reads.clear()
        basis = fit_pca(batches, image_size=8, components=k, method="gram", progress=False)
        assert basis.method == "gram" and basis.components.shape == (192, k) and reads == [1]
        # float32 products: errors at about 1e-7 of the largest eigenvalue
        assert torch.allclose(basis.eigenvalues, evals[:k], rtol=1e-6, atol=1e-6 * float(evals[0]))
        assert torch.allclose(basis.ratios, evals[:k] / evals.sum(), rtol=1e-6, atol=1e-6 * float(evals[0] / 192))
        gram = basis.components.double().T @ basis.components.double()
        assert torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=1e-4)
        assert torch.allclose(basis.mean, mean, rtol=0, atol=1e-12) and torch.allclose(basis.std, std, rtol=1e-9)
    assert max_angle(evecs[:, :12], fit_pca(batches, 8, components=12, method="gram", progress=False).components) < 1e-5
    # each of the leading components, not only their span (distinct eigenvalues)
    first = fit_pca(batches, 8, components=4, method="gram", progress=False).components.double()
    assert torch.allclose((first * evecs[:, :4]).sum(0).abs(), torch.ones(4, dtype=torch.float64), atol=1e-6)
    # the statistics are the randomized fit's first pass, bit for bit
    randomized = fit_pca(batches, 8, components=4, method="randomized", progress=False)
    again = fit_pca(batches, 8, components=4, method="gram", progress=False)
    assert torch.equal(again.mean, randomized.mean) and torch.equal(again.std, randomized.std)


def test_gram_refuses_more_components_than_the_images_hold():
    x = planted(n=30, size=8, rank=5, noise=0.0)  # rank 5 (plus the clamp's rounding)
    with pytest.raises(ValueError, match="at most N - 1 = 29 components from 30 images, 30 were asked for"):
        fit_pca(lambda: x.split(8), 8, components=30, method="gram", progress=False)
    with pytest.raises(ValueError, match=r"the images span about \d+ directions .* 20 components were asked for"):
        fit_pca(lambda: x.split(8), 8, components=20, method="gram", progress=False)
    with pytest.raises(ValueError, match="keeps the images in memory, and they take more than cache_gib = 1e-05 GiB"):
        fit_pca(lambda: x.split(8), 8, components=4, method="gram", cache_gib=1e-5, progress=False)
    with pytest.raises(OptionError, match="components: is required for the gram method") as e:
        fit_pca(lambda: pytest.fail("read before checking"), 8, method="gram", progress=False)
    assert e.value.key == "components"
    with pytest.raises(OptionError, match="must be >= 0") as e:
        fit_pca(lambda: pytest.fail("read before checking"), 8, components=2, cache_gib=-1, progress=False)
    assert e.value.key == "cache_gib"


def test_auto_takes_gram_when_it_costs_less_and_fits():
    size = 74  # D = 16,428: just above the exact method's limit
    assert 3 * size * size > EXACT_MAX_DIM
    x = planted(n=40, size=size, rank=6, noise=0.1)
    flat = x.double().reshape(40, -1)
    z = (flat - flat.mean(0)) / flat.std(0, unbiased=False)
    _, singular, vt = torch.linalg.svd(z, full_matrices=False)  # D x D eigh would take minutes here
    evals, evecs = singular**2 / 40, vt.T

    def fit(k=6, **kwargs):
        return fit_pca(lambda: x.split(16), size, components=k, progress=False, **kwargs)

    gram = fit(total=40)
    assert gram.method == "gram" and max_angle(evecs[:, :6], gram.components) < 1e-4
    assert torch.allclose(gram.eigenvalues, evals[:6], rtol=1e-5)
    assert fit().method == "randomized"  # the number of images is not known in advance
    # the images as float32 take 40 x 16,428 x 4 bytes = 2.5 MiB (uint8 ones a quarter of that)
    assert fit(total=40, cache_gib=2.4 / 1024).method == "randomized"
    assert fit(total=40, cache_gib=2.6 / 1024).method == "gram"
    # the costs: gram N^2 D against randomized 4 (2 + power_iters) N D (K + oversample)
    assert fit(total=40, power_iters=0, oversample=0).method == "gram"  # 4 x 2 x 6 = 48 >= 40 images
    assert fit(3, total=40, power_iters=0, oversample=0).method == "randomized"  # 4 x 2 x 3 = 24 < 40
    assert fit(40, total=40).method == "randomized"  # gram gives at most N - 1 components


def test_uint8_images_are_the_same_as_their_float_values():
    x = planted(n=60, size=6, rank=4, noise=0.1)
    u8 = (x * 255).round().to(torch.uint8)
    as_float = u8.float() / 255  # what ToTensor gives for these pixels
    for method, k in (("exact", 10), ("randomized", 5), ("gram", 8)):
        a = fit_pca(lambda: u8.split(16), 6, components=k, method=method, progress=False)
        b = fit_pca(lambda: as_float.split(16), 6, components=k, method=method, progress=False)
        assert a.sha256 == b.sha256, method


def test_randomized_passes_read_the_images_once_when_they_fit():
    x = planted(n=200, size=8, rank=12, noise=0.1)
    reads = []

    def batches():
        reads.append(1)
        return iter(list(x.split(50)))

    kept = fit_pca(batches, 8, components=8, method="randomized", power_iters=2, progress=False)
    assert len(reads) == 1
    reads.clear()
    streamed = fit_pca(batches, 8, components=8, method="randomized", power_iters=2, cache_gib=0, progress=False)
    assert len(reads) == 4  # 2 + power_iters passes, each reading the images
    assert kept.sha256 == streamed.sha256
    assert 0 < default_cache_gib() <= 8


def test_default_workers_use_the_cores_for_many_images():
    assert default_workers(AUTO_WORKERS_MIN_IMAGES - 1) == 0
    assert 1 <= default_workers(AUTO_WORKERS_MIN_IMAGES) <= (os.cpu_count() or 1)


# ---------------------------------------------------------------------- rank split
@pytest.mark.parametrize("counts", [[7, 7, 7, 3], [1, 1, 1, 1, 1], [100], [5, 9, 2, 8, 4, 6]])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("max_images", [None, 10])
def test_split_shards_reads_every_used_sample_once(counts, world, max_images):
    shares = [split_shards(counts, r, world, max_images) for r in range(world)]
    used = sum(counts) if max_images is None else min(max_images, sum(counts))
    shards = [i for share in shares for i, _ in share]
    assert len(shards) == len(set(shards))  # no shard on two ranks
    assert sum(n for share in shares for _, n in share) == used
    assert sorted(shards) == list(range(len(shards)))  # a prefix of the shards, in order


# ---------------------------------------------------------------------- MDS shards
def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_mds(tmp_path_factory) -> Path:
    """40 JPEGs of smooth random images (16 x 16) in several shards, under ``train/``."""
    root = tmp_path_factory.mktemp("pca_mds")
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 16)
    with MDSWriter(out=str(root / "train"), columns={"x": "bytes", "y": "int"}, size_limit=4096) as writer:
        for i in range(40):
            fx, fy, phase = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6)]
            base = np.sin(fx * 6 * grid[None, :] + phase) * np.cos(fy * 6 * grid[:, None])
            img = np.stack([base * rng.uniform(0.2, 1) for _ in range(3)], -1) * 100 + 128
            img += rng.normal(0, 8, img.shape)
            writer.write({"x": jpeg(np.clip(img, 0, 255).astype(np.uint8)), "y": i % 3})
    assert len(list((root / "train").glob("shard.*.mds"))) >= 3
    return root


def decoded(root: Path, n: int | None = None) -> torch.Tensor:
    """The images of ``root/train`` decoded independently of the fit (PIL, uint8 / 255, C, H, W)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(root / "train"), shuffle=False, batch_size=1)
    n = ds.num_samples if n is None else n
    arrays = [np.asarray(Image.open(io.BytesIO(ds[i]["x"])).convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_fit_from_mds_matches_reference_on_the_decoded_images(jpeg_mds):
    images = decoded(jpeg_mds)
    # the fit's transform at the stored size keeps the pixels: [0, 1], C, H, W order
    with Image.open(io.BytesIO(jpeg(np.zeros((16, 16, 3), np.uint8)))) as img:
        assert eval_transform(16, normalize="none")(img.convert("RGB")).shape == (3, 16, 16)
    mean, std, evals, evecs = reference(images)
    basis = fit_basis(str(jpeg_mds), split="train", image_size=16, batch_size=16, progress=False)
    assert basis.method == "exact" and basis.num_images == 40 and basis.num_components == 40
    assert torch.allclose(basis.mean, mean, atol=1e-12, rtol=0)
    assert torch.allclose(basis.std, std, rtol=1e-9, atol=0)
    assert torch.allclose(basis.eigenvalues[:39], evals[:39], rtol=1e-7, atol=1e-9)
    assert max_angle(evecs[:, :5], basis.components[:, :5]) < 1e-4

    first = fit_basis(str(jpeg_mds), split="train", image_size=16, max_images=25, components=6, progress=False)
    mean25, _, evals25, _ = reference(images[:25])
    assert first.num_images == 25 and torch.allclose(first.mean, mean25, atol=1e-12, rtol=0)
    assert torch.allclose(first.ratios, evals25[:6] / evals25.sum(), rtol=1e-7)


def test_stats_from_mds_are_the_reference_and_the_basis_standardisation(jpeg_mds, tmp_path, capsys):
    images = decoded(jpeg_mds)
    mean, std, _, _ = reference(images)
    stats = compute_pixel_stats(str(jpeg_mds), split="train", image_size=16, batch_size=16, progress=False)
    assert (stats.image_size, stats.channels) == (16, 3)
    assert torch.allclose(stats.mean, mean, atol=1e-12, rtol=0) and torch.allclose(stats.std, std, rtol=1e-9, atol=0)
    # the randomized fit's first pass is this pass (bit for bit); the exact fit sums the squares in another order
    randomized = fit_basis(
        str(jpeg_mds), split="train", image_size=16, components=3, method="randomized", progress=False
    )
    assert torch.equal(stats.mean, randomized.mean) and torch.equal(stats.std, randomized.std)
    exact = fit_basis(str(jpeg_mds), split="train", image_size=16, batch_size=16, progress=False)
    assert torch.equal(stats.mean, exact.mean) and torch.allclose(stats.std, exact.std, rtol=1e-12, atol=0)
    first = compute_pixel_stats(str(jpeg_mds), split="train", image_size=16, max_images=25, progress=False)
    assert torch.allclose(first.mean, reference(images[:25])[0], atol=1e-12, rtol=0)
    # in memory, from batches: the same numbers
    batches = images.reshape(40, -1).split(7)
    assert torch.allclose(fit_pixel_stats(lambda: batches, 16, progress=False).mean, mean, atol=1e-12, rtol=0)
    out = tmp_path / "stats.pt"
    argv = ["stats", "--data", str(jpeg_mds), "--split", "train", "--image-size", "16", "--out", str(out)]
    assert pca_main([*argv, "--no-progress", "--batch-size", "9"]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: Pixel statistics: 3x16x16 (D=768) from 40 images")
    assert torch.equal(load_pixel_stats(out).mean, stats.mean)
    with pytest.raises(OptionError, match="already exists") as e:
        compute_pixel_stats(str(jpeg_mds), split="train", image_size=16, out=out, progress=False)
    assert e.value.key == "out"
    for key, kwargs in [("image_size", {"image_size": 0}), ("max_images", {"max_images": 1})]:
        with pytest.raises(OptionError) as e:
            compute_pixel_stats(str(jpeg_mds), **{"image_size": 16, "progress": False, **kwargs})
        assert e.value.key == key


def test_shard_images_are_the_eval_transform_pixels_as_uint8(jpeg_mds):
    from magma_composer.data.dataset import decode_image

    _, shards = open_shards(str(jpeg_mds), split="train")
    for size in (16, 8, 11):  # as stored, and resized (shorter side, bicubic) + centre-cropped
        images = ShardImages(shards, [(0, shards[0].samples)], size)
        for i in range(3):
            item = images[i]
            expected = eval_transform(size, normalize="none")(decode_image(shards[0].get_item(i)["x"]))
            assert item.dtype == torch.uint8 and item.shape == (3 * size * size,)
            assert torch.equal(item.float() / 255, expected.reshape(-1))


def test_gram_from_mds_is_the_exact_basis(jpeg_mds):
    exact = fit_basis(str(jpeg_mds), split="train", image_size=16, components=8, method="exact", progress=False)
    gram = fit_basis(
        str(jpeg_mds), split="train", image_size=16, components=8, method="gram", batch_size=16, progress=False
    )
    assert gram.method == "gram" and gram.num_images == 40
    assert max_angle(exact.components[:, :5], gram.components[:, :5]) < 1e-4
    assert torch.allclose(gram.eigenvalues, exact.eigenvalues, rtol=1e-5)
    assert torch.allclose(gram.mean, exact.mean, rtol=0, atol=1e-12)


def test_fit_resizes_shorter_side_and_centre_crops(jpeg_mds):
    basis = fit_basis(str(jpeg_mds), split="train", image_size=8, components=4, method="randomized", progress=False)
    assert (basis.image_size, basis.channels, basis.dim) == (8, 3, 192)
    assert basis.components.shape == (192, 4)


def test_cli_fit_and_info(jpeg_mds, tmp_path, capsys):
    out = tmp_path / "basis.pt"
    args = ["fit", "--data", str(jpeg_mds), "--split", "train", "--image-size", "16", "--components", "8"]
    assert (
        pca_main(
            [
                *args,
                "--method",
                "randomized",
                "--batch-size",
                "7",
                "--num-workers",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    basis = load_basis(out, expected_image_size=16, expected_channels=3)
    assert basis.num_components == 8 and basis.method == "randomized" and basis.path == str(out)
    exact = fit_basis(str(jpeg_mds), split="train", image_size=16, components=8, method="exact", progress=False)
    assert max_angle(exact.components[:, :3], basis.components[:, :3]) < 1e-3
    assert torch.allclose(basis.ratios[:3], exact.ratios[:3], rtol=1e-4)
    capsys.readouterr()
    assert pca_main(["info", str(out)]) == 0
    assert "K=8" in capsys.readouterr().out
    assert pca_main(["fit", "--data", str(tmp_path), "--image-size", "16", "--out", str(tmp_path / "x.pt")]) == 2
    assert "error: --data: no MDS data set at" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fit", "stats"])
def test_two_ranks_read_disjoint_shards_and_agree_with_one(command, jpeg_mds, tmp_path):
    """Two gloo ranks of the CLI (the environment ``composer -n 2`` / ``torchrun`` set), sums all-reduced."""
    out = tmp_path / "two.pt"
    port = str(free_port())
    cmd = [sys.executable, "-m", "magma_composer.pca", command, "--data", str(jpeg_mds), "--split", "train"]
    cmd += ["--image-size", "16", "--out", str(out), "--device", "cpu", "--no-progress"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": str(rank)}
        env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    if command == "stats":
        stats = load_pixel_stats(out)
        one = compute_pixel_stats(str(jpeg_mds), split="train", image_size=16, progress=False)
        assert torch.allclose(stats.mean, one.mean, atol=1e-14, rtol=0)
        assert torch.allclose(stats.std, one.std, atol=1e-14, rtol=0)
        assert "Pixel statistics: 3x16x16 (D=768) from 40 images" in describe_file(out)
        return
    two = load_basis(out)
    one = fit_basis(str(jpeg_mds), split="train", image_size=16, progress=False)
    assert two.num_images == one.num_images == 40
    assert torch.allclose(two.mean, one.mean, atol=1e-14, rtol=0)
    assert torch.allclose(two.eigenvalues, one.eigenvalues, rtol=1e-9, atol=1e-12)
    assert max_angle(one.components[:, :5], two.components[:, :5]) < 1e-6


def test_fit_from_object_storage(jpeg_mds, s3, tmp_path):  # noqa: F811
    """Shards in an S3-compatible store (moto): downloaded to the cache, same basis as from the folder."""
    bucket = s3.make_bucket()
    client = s3.client()
    for path in sorted((jpeg_mds / "train").iterdir()):
        client.upload_file(str(path), bucket, f"pca/train/{path.name}")
    remote = fit_basis(
        f"s3://{bucket}/pca", split="train", image_size=16, components=6, local=str(tmp_path / "cache"), progress=False
    )
    local = fit_basis(str(jpeg_mds), split="train", image_size=16, components=6, progress=False)
    assert remote.sha256 == local.sha256
    assert len(list((tmp_path / "cache" / "train").glob("shard.*.mds"))) == len(
        list((jpeg_mds / "train").glob("*.mds"))
    )


# ---------------------------------------------------------------------- the file
@pytest.fixture
def small_basis(tmp_path) -> PCABasis:
    x = planted(n=50, size=4, rank=4, noise=0.05)
    return save_basis(fit_pca(lambda: x.split(25), 4, components=6, progress=False), tmp_path / "b.pt")


def test_save_load_round_trip(small_basis):
    loaded = load_basis(small_basis.path)
    assert loaded.sha256 == small_basis.sha256 and len(loaded.sha256) == 64
    for name in ("mean", "std", "components", "eigenvalues", "ratios"):
        assert torch.equal(getattr(loaded, name), getattr(small_basis, name))
    assert (loaded.image_size, loaded.channels, loaded.num_images) == (4, 3, 50)


def test_load_errors_are_clear(small_basis, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: fit one with"):
        load_basis(tmp_path / "missing.pt")
    data = Path(small_basis.path).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"'{truncated}' is not a PCA basis file .*, or it is truncated"):
        load_basis(truncated)
    payload = torch.load(small_basis.path, weights_only=True)
    payload["components"][3, 2] += 1e-3  # one value edited, content hash left as it was, file checksum redone
    tampered = tmp_path / "tampered.pt"
    _write_payload(payload, tampered, overwrite=False)
    with pytest.raises(ValueError, match=f"'{tampered}' is corrupted: its content hashes to"):
        load_basis(tampered)
    assert torch.load(tampered, weights_only=True)["format"] == BASIS_FORMAT  # still a plain torch.save archive
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a PCA basis file"):
        load_basis(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="3 x 4 x 4 images, but the caller uses 3 x 32 x 32"):
        load_basis(small_basis.path, expected_image_size=32)
    with pytest.raises(ValueError, match="uses 1 x 4 x 4"):
        load_basis(small_basis.path, expected_channels=1)


@pytest.mark.parametrize("size", ["whole", "truncated-by-1", "truncated-to-zip", "empty"])
def test_truncated_files_are_refused_with_their_path(small_basis, tmp_path, size):
    data = Path(small_basis.path).read_bytes()
    cut = {"whole": len(data), "truncated-by-1": len(data) - 1, "truncated-to-zip": len(data) - 96, "empty": 0}[size]
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:cut])
    if size == "whole":
        assert load_basis(path).sha256 == small_basis.sha256
        return
    with pytest.raises(ValueError, match=f"'{path}' .*truncated"):
        load_basis(path)


def test_every_single_byte_alteration_is_refused_with_the_path(small_basis, tmp_path):
    """torch's zip reader ignores many header bytes (about 30% of one-bit flips load fine): the file checksum
    catches every one."""
    data = Path(small_basis.path).read_bytes()
    path = tmp_path / "edited.pt"
    accepted = []
    for pos in range(len(data)):
        edited = bytearray(data)
        edited[pos] ^= 0x01 if pos % 2 else 0xFF
        path.write_bytes(bytes(edited))
        try:
            load_basis(path)
            accepted.append(pos)
        except ValueError as e:
            assert f"'{path}'" in str(e)
    assert accepted == []


def test_save_refuses_an_existing_file_unless_overwrite(small_basis, tmp_path):
    path = Path(small_basis.path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        save_basis(small_basis, path)
    assert path.read_bytes() == before
    other = replace(small_basis, num_images=51)
    assert save_basis(other, path, overwrite=True).sha256 == load_basis(path).sha256 != small_basis.sha256
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_basis(small_basis, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]


def test_a_file_that_appears_during_the_write_is_kept(small_basis, tmp_path):
    """The no-overwrite publish is atomic (a hard link): a file made meanwhile by someone else survives."""
    theirs = tmp_path / "theirs.pt"
    theirs.write_bytes(b"someone else's basis")
    payload = torch.load(small_basis.path, weights_only=True)
    with pytest.raises(FileExistsError, match="appeared while the basis was being made") as e:
        _write_payload(payload, theirs, overwrite=False)
    assert theirs.read_bytes() == b"someone else's basis"
    kept = tmp_path / f"theirs.{payload['sha256'][:12]}.pt"
    assert str(kept) in str(e.value) and load_basis(kept).sha256 == small_basis.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b.pt", "theirs.pt", kept.name])


def test_fit_basis_checks_out_before_reading_the_data(tmp_path):
    (tmp_path / "taken.pt").write_bytes(b"x")
    with pytest.raises(OptionError, match="already exists") as e:
        fit_basis("/nonexistent/data", image_size=8, out=tmp_path / "taken.pt", progress=False)
    assert e.value.key == "out"
    with pytest.raises(OptionError, match="no MDS data set at /nonexistent/data") as e:
        fit_basis("/nonexistent/data", image_size=8, out=tmp_path / "new.pt", progress=False)
    assert e.value.key == "data" and sorted(p.name for p in tmp_path.iterdir()) == ["taken.pt"]
    for key, kwargs in [
        ("batch_size", {"batch_size": 0}),
        ("max_images", {"max_images": 1}),
        ("num_workers", {"num_workers": -1}),
        ("overwrite", {"overwrite": "yes"}),
    ]:
        with pytest.raises(OptionError) as e:
            fit_basis("/nonexistent/data", image_size=8, progress=False, **kwargs)
        assert e.value.key == key


# ---------------------------------------------------------------------- pixel statistics (interface I2)
@pytest.fixture
def stats_file(tmp_path) -> Path:
    x = planted(n=30, size=4, rank=3, noise=0.1)
    mean, std, _, _ = reference(x)
    return save_pixel_stats(PixelStats(mean, std, 4, 3), tmp_path / "stats.pt", num_images=30)


def test_pixel_stats_round_trip_and_flattening_order(stats_file, tmp_path):
    stats = load_pixel_stats(stats_file)
    x = planted(n=30, size=4, rank=3, noise=0.1).double()
    # D is image.reshape(-1) of a C x S x S image: the per-channel image mean reshapes back to C x S x S
    assert torch.equal(stats.mean, x.mean(0).reshape(-1)) and stats.mean.dtype == torch.float64
    assert torch.allclose(stats.mean.reshape(3, 4, 4), x.mean(0), atol=0, rtol=0)
    assert torch.allclose(stats.std.reshape(3, 4, 4), x.std(0, unbiased=False), rtol=1e-12, atol=0)
    assert (stats.image_size, stats.channels) == (4, 3)
    assert torch.load(stats_file, weights_only=True)["format"] == STATS_FORMAT
    assert "Pixel statistics: 3x4x4 (D=48) from 30 images" in describe_file(stats_file)
    with pytest.raises(FileExistsError, match="already exists"):
        save_pixel_stats(stats, stats_file)
    assert save_pixel_stats(stats._replace(mean=stats.mean + 1), stats_file, overwrite=True) == stats_file
    assert torch.equal(load_pixel_stats(stats_file).mean, stats.mean + 1)


def test_pixel_stats_from_a_basis_file_are_its_standardisation(small_basis):
    stats = load_pixel_stats(small_basis.path)
    assert torch.equal(stats.mean, small_basis.mean) and torch.equal(stats.std, small_basis.std)
    assert (stats.image_size, stats.channels) == (small_basis.image_size, small_basis.channels)
    assert describe_file(small_basis.path) == small_basis.summary()


def test_pixel_stats_errors_name_the_file(stats_file, tmp_path):
    for path, phrase in [
        (tmp_path / "missing.pt", "does not exist"),
        (tmp_path, "is a directory"),
    ]:
        with pytest.raises(ValueError, match=f"'{path}' {phrase}"):
            load_pixel_stats(path)
    data = stats_file.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:-1])
    with pytest.raises(ValueError, match=f"'{cut}' is not a pixel statistics file .*or it is truncated"):
        load_pixel_stats(cut)
    edited = tmp_path / "edited.pt"
    edited.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(ValueError, match=f"'{edited}' is corrupted"):
        load_pixel_stats(edited)
    payload = torch.load(stats_file, weights_only=True)
    payload["std"][0] *= 2  # content edited, file checksum redone: the content hash catches it
    tampered = tmp_path / "tampered.pt"
    _write_payload(payload, tampered, overwrite=False)
    with pytest.raises(ValueError, match=f"'{tampered}' is corrupted: its content hashes to"):
        load_pixel_stats(tampered)
    other = tmp_path / "other.pt"
    _write_payload({"format": "something/1", "sha256": "0" * 64}, other, overwrite=False)
    with pytest.raises(ValueError, match=f"'{other}' is neither a pixel statistics file nor a PCA basis file"):
        load_pixel_stats(other)
    with pytest.raises(ValueError, match=f"'{stats_file}' is a pixel statistics file .*not a PCA basis"):
        load_basis(stats_file)


def test_save_pixel_stats_refuses_inconsistent_statistics(tmp_path):
    mean = torch.zeros(48, dtype=torch.float64)
    for stats, phrase in [
        (PixelStats(mean, torch.ones(47, dtype=torch.float64), 4, 3), "std must be a float tensor of D = 3 x 4 x 4"),
        (PixelStats(mean, torch.zeros(48, dtype=torch.float64), 4, 3), "std must be positive"),
        (PixelStats(mean * float("nan"), torch.ones(48), 4, 3), "mean holds values that are not finite"),
        (PixelStats(mean, torch.ones(48), 4, 0), "image_size and channels must be integers >= 1"),
    ]:
        with pytest.raises(ValueError, match=phrase):
            save_pixel_stats(stats, tmp_path / "s.pt")
    assert list(tmp_path.iterdir()) == []
