"""PCA masking benchmarks: PMAE / MAE train-step time, and the basis fit against scikit-learn's IncrementalPCA.

``step``: two Composer Trainers in one process, a plain MAE (75 % of the patches dropped) and PMAE (the
:class:`~magma_composer.algorithms.pca_masking.PCAMasking` algorithm: the encoder sees every patch, two
projections per step and the component loss), same initialisation and batch. They take turns (``--steps``
batches each per turn, ``--repeats`` turns after a warm-up turn); a callback times each step from
``BATCH_START`` to ``BATCH_END`` (wall and process CPU time). Prints the median step times and the ratios
PMAE / MAE.

* CPU: ViT-T (192 wide, 12 blocks), 32 px, patch 4, batch 32, fp32, a full 3,072-component basis.
* GPU: ViT-B/16 at 224 px, batch 128, bf16 autocast, a 2,048-component basis (D = 150,528).

Both use the published decoder (512 wide, 8 blocks, 16 heads) and AdamW. The published PMAE costs
1.15x to 1.4x MAE's time, mostly because its encoder sees every patch.

``fit``: the basis of real CIFAR-10 training images (from ``../shared/data/cifar10-jpeg.tar.gz``,
optionally resized to ``--size``) three ways, all on the CPU with the same thread count:

* the exact reference: float64 covariance of the standardised images and ``numpy.linalg.eigh``;
* ours: :func:`magma_composer.pca.fit_pca` with the randomized method (streamed batches, ``O(D * K)``
  memory), for each ``--power-iters``;
* scikit-learn's ``IncrementalPCA`` (``n_components = K``, batches of ``--ipca-batch`` images) on the same
  standardised images (their standardisation pass is not timed: it favours scikit-learn).

Accuracy against the reference: the variance the ``K``-dimensional subspace captures, relative to the best
possible (the top ``K`` eigenvalues' sum; 1 is perfect); the largest principal angle between the top-64
subspaces; the largest relative error of the top-64 eigenvalues. Peak memory is each fit's resident-set
growth, measured in a forked child. Prints the time ratio IncrementalPCA / ours.

Usage::

    OMP_NUM_THREADS=1 python bench/pmae.py step --repeats 3 --steps 2
    OMP_NUM_THREADS=1 python bench/pmae.py fit --images 6000 --components 1024
    python bench/pmae.py step --device cuda
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import build_trainer  # noqa: E402  (the timed Trainer of the MAGMA overhead benchmark)

from magma_composer.algorithms.pca_masking import PCAMasking  # noqa: E402
from magma_composer.pca import PCABasis, fit_pca  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"

PRESETS = {
    "cpu": {"encoder": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "batch_size": 32,
            "precision": "fp32", "components": 3072},
    "cuda": {"encoder": "vit_base_patch16_224", "img_size": 224, "patch_size": 16, "batch_size": 128,
             "precision": "amp_bf16", "components": 2048},
}  # fmt: skip


# ---------------------------------------------------------------------- step time
def random_basis(size: int, k: int, device: str) -> PCABasis:
    """A random orthonormal ``D x K`` basis (timing does not depend on which one) with a decaying spectrum."""
    d = 3 * size * size
    g = torch.Generator(device=device).manual_seed(0)
    components = torch.linalg.qr(torch.randn(d, k, generator=g, device=device))[0].cpu()
    eigenvalues = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    return PCABasis(
        mean=torch.full((d,), 0.45, dtype=torch.float64),
        std=torch.full((d,), 0.25, dtype=torch.float64),
        components=components,
        eigenvalues=eigenvalues,
        ratios=eigenvalues / eigenvalues.sum(),
        image_size=size,
        channels=3,
        num_images=0,
        total_variance=float(eigenvalues.sum()),
        method="randomized",
    )


def bench_step(args: argparse.Namespace) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    preset = dict(PRESETS[device])
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    basis = random_basis(preset["img_size"], preset["components"], device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(preset["batch_size"], 3, preset["img_size"], preset["img_size"], generator=g).to(device)
    batches = [(images, torch.zeros(len(images), dtype=torch.long, device=device))] * args.steps

    runs = {}
    for name, algorithms in (("MAE", []), ("PMAE", [PCAMasking(basis, ratio=0.2)])):
        trainer, timer = build_trainer(f"pmae-bench-{name}", algorithms, preset, device, batches)
        runs[name] = (trainer, timer)
    for turn in range(args.repeats + 1):  # turn 0 warms up and is discarded
        for trainer, timer in runs.values():
            if turn == 1:
                timer.wall.clear()
                timer.cpu.clear()
            trainer.fit(duration=f"{args.steps}ba")
    wall = {name: statistics.median(timer.wall) for name, (_, timer) in runs.items()}
    cpu = {name: statistics.median(timer.cpu) for name, (_, timer) in runs.items()}
    ratio, cpu_ratio = wall["PMAE"] / wall["MAE"], cpu["PMAE"] / cpu["MAE"]
    print(f"step: device={device}, threads={torch.get_num_threads()}, preset={preset}")
    for name, (_, timer) in runs.items():
        times = f"{wall[name] * 1e3:9.1f} ms wall, {cpu[name] * 1e3:9.1f} ms CPU"
        print(f"  {name:5s} median {times}, {len(timer.wall)} steps")
    print(f"  ratio PMAE / MAE = {ratio:.3f} (wall), {cpu_ratio:.3f} (process CPU time)   published: 1.15 to 1.4")
    return {"device": device, "preset": preset, "median_wall_s": wall, "median_cpu_s": cpu, "ratio": ratio,
            "cpu_ratio": cpu_ratio}  # fmt: skip


# ---------------------------------------------------------------------- basis fit
def load_cifar(n: int, size: int) -> np.ndarray:
    """The first ``n`` CIFAR-10 training JPEGs (in archive order) as ``n x 3 x size x size`` float32 in [0, 1]."""
    from PIL import Image

    from magma_composer.data.transforms import eval_transform

    if not CIFAR.exists():
        sys.exit(f"the CIFAR-10 tarball is not at {CIFAR}")
    transform = eval_transform(size, normalize="none")
    out = np.empty((n, 3, size, size), np.float32)
    i = 0
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            if i == n:
                break
            if member.isfile() and member.name.endswith(".jpg") and "/train/" in f"/{member.name}":
                with tar.extractfile(member) as f:
                    out[i] = transform(Image.open(io.BytesIO(f.read())).convert("RGB")).numpy()
                i += 1
    return out[:i]


def in_child(fn, *args):
    """Runs ``fn(*args)`` in a forked child; returns its result and the child's peak resident-set growth (bytes)."""
    import multiprocessing as mp

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    def target(queue):
        start = rss("VmRSS:")
        result = fn(*args)
        queue.put((result, rss("VmHWM:") - start))

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue,))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def accuracy(components: np.ndarray, eigenvalues: np.ndarray, cov: np.ndarray, ref_vals, ref_vecs) -> dict:
    k = components.shape[1]
    v = components.astype(np.float64)
    captured = float(np.einsum("dk,dk->", v, cov @ v) / ref_vals[:k].sum())
    top = 64
    a, b = ref_vecs[:, :top], v[:, :top]
    sine = np.linalg.norm(b - a @ (a.T @ b), ord=2)
    rel = np.abs(eigenvalues[:top] - ref_vals[:top]) / ref_vals[:top]
    return {"captured": captured, "angle64": float(np.arcsin(min(sine, 1.0))), "eig_rel64": float(rel.max())}


def bench_fit(args: argparse.Namespace) -> dict:
    from sklearn.decomposition import IncrementalPCA
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    t = time.perf_counter()
    x = load_cifar(args.images, args.size).reshape(args.images, -1)
    n, d = x.shape
    k = args.components
    print(f"fit: {n} CIFAR-10 images at {args.size} px (D = {d}), K = {k}, threads = {threads} "
          f"(loaded in {time.perf_counter() - t:.1f} s)")  # fmt: skip

    with threadpool_limits(threads):
        t = time.perf_counter()
        mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
        z = ((x - mean) / std).astype(np.float32)
        cov = (z.astype(np.float64).T @ z.astype(np.float64)) / n
        ref_vals, ref_vecs = np.linalg.eigh(cov)
        ref_vals, ref_vecs = ref_vals[::-1], ref_vecs[:, ::-1]
        print(f"  exact reference (numpy float64 covariance + eigh): {time.perf_counter() - t:.1f} s")

        results = {}
        x_t = torch.from_numpy(x)
        for q in args.power_iters:

            def ours(q=q):
                t0 = time.perf_counter()
                basis = fit_pca(
                    lambda: x_t.split(args.batch), args.size, components=k, method="randomized",
                    power_iters=q, device="cpu", progress=False,
                )  # fmt: skip
                return time.perf_counter() - t0, basis.components.numpy(), basis.eigenvalues.numpy()

            (seconds, comps, vals), peak = in_child(ours)
            results[f"ours q={q}"] = {
                "seconds": seconds,
                "peak_bytes": peak,
                **accuracy(comps, vals, cov, ref_vals, ref_vecs),
            }

        def sklearn_ipca():
            t0 = time.perf_counter()
            ipca = IncrementalPCA(n_components=k, batch_size=args.ipca_batch).fit(z)
            vals = ipca.explained_variance_ * (n - 1) / n  # ddof 1 -> 0, as the reference
            return time.perf_counter() - t0, ipca.components_.T.copy(), vals

        (seconds, comps, vals), peak = in_child(sklearn_ipca)
        results["IncrementalPCA"] = {
            "seconds": seconds,
            "peak_bytes": peak,
            **accuracy(comps, vals, cov, ref_vals, ref_vecs),
        }

    base = results["IncrementalPCA"]["seconds"]
    for name, r in results.items():
        print(
            f"  {name:15s} {r['seconds']:7.1f} s  peak +{r['peak_bytes'] / 2**20:5.0f} MiB"
            f"  captured {r['captured']:.6f}  angle(top 64) {r['angle64']:.2e} rad"
            f"  eig rel err(top 64) {r['eig_rel64']:.1e}  speed-up vs IncrementalPCA {base / r['seconds']:.2f}x"
        )
    working = 3 * d * (k + max(16, k // 10)) * 8 / 2**20
    print(f"  ours' O(D*K) arrays: 3 x D x (K + oversample) x 8 B = {working:.0f} MiB (the rest of its peak: torch)")
    return {"images": n, "dim": d, "components": k, "threads": threads, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["step", "fit", "all"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="step: timed round-robin turns")
    parser.add_argument("--steps", type=int, default=2, help="step: train steps per configuration per turn")
    parser.add_argument("--batch-size", type=int, default=None, help="step: override the preset's batch size")
    parser.add_argument("--images", type=int, default=6000, help="fit: CIFAR-10 training images")
    parser.add_argument("--size", type=int, default=32, help="fit: image side (CIFAR-10 is 32 px)")
    parser.add_argument("--components", type=int, default=1024, help="fit: K")
    parser.add_argument("--power-iters", type=int, nargs="+", default=[1, 2], help="fit: ours, each value")
    parser.add_argument("--batch", type=int, default=500, help="fit: images per product in ours")
    parser.add_argument("--ipca-batch", type=int, default=None, help="fit: IncrementalPCA batch (default 2 K)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    args.ipca_batch = args.ipca_batch or 2 * args.components
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    out = {}
    if args.part in ("step", "all"):
        out["step"] = bench_step(args)
    if args.part in ("fit", "all"):
        out["fit"] = bench_fit(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
