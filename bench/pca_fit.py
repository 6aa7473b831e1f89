"""The PCA basis fit at 224 px: ``python -m magma_composer.pca fit`` against scikit-learn's ``IncrementalPCA``.

The data, as a user would feed it: the first ``--images`` CIFAR-10 training images, upsampled to ``--size``
(bilinear) and stored as JPEGs (quality 90) in a work folder, both in MDS shards (for our command line) and as
the same JPEG files in a folder (for scikit-learn). Both fits then start from those JPEGs, one after the other
in this run:

* ours: the command line, ``python -m magma_composer.pca fit --data WORK --split train --image-size S
  --components K`` with its defaults (``--method auto``, which is ``gram`` at the default size; loader
  workers and threads on every core), in a new process, so the time includes starting Python and importing
  torch;
* scikit-learn, in its own process that imports neither torch nor this package, as a user's script would
  (two OpenMP runtimes in one process, torch's and OpenBLAS's, can slow the BLAS down): the JPEG files
  decoded with PIL into an ``N x D`` float32 array in [0, 1] (C, H, W order, as our fit reads them),
  standardised with the per-pixel mean and std (float64 statistics, as our basis defines ``z``) and given to
  ``IncrementalPCA(n_components=K, batch_size=B).fit``. ``B`` defaults to ``K``, the fastest
  ``IncrementalPCA`` allows (each batch costs an SVD of ``(K + B) x D``). Its time is the decode +
  standardise time plus the fit time; the ratio is printed against both that total and the fit alone.

Accuracy, against an exact float64 PCA of the same standardised images (the ``N x N`` Gram matrix in
float64, its eigendecomposition, and the components ``Z^T u / sqrt(N lambda)`` in float64): the principal
angles between each fit's ``K``-dimensional subspace and the exact one (largest and mean, degrees; also for
the leading ``K / 2`` components, whose subspace is less sensitive to the near-equal eigenvalues around the
``K``-th) and the variance each subspace captures (a fraction of the total variance of ``z``; the exact
subspace captures the most possible). Threads: torch and NumPy's BLAS use every core (unless
``OMP_NUM_THREADS`` says otherwise). Usage::

    python bench/pca_fit.py                                   # N = 4,096, 224 px, K = 1,024 (the issue's case)
    python bench/pca_fit.py --images 512 --components 128     # a quick run
    python bench/pca_fit.py --json runs/pca_fit.json --work /tmp/pca-fit-bench

Memory at the default size: about 2.5 GB for the float32 image array that ``IncrementalPCA`` needs, 1.2 GB
for the float64 reference components, and about 1.5 GB in our fit's process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# torch and this package are imported where they are used: the IncrementalPCA child process imports neither
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Pixels per block of the reference's float64 products (N x 4096 float64 at a time).
BLOCK = 4096


def build_data(source: str, split: str, n: int, size: int, out: Path) -> float:
    """Writes the first ``n`` images of ``source/split``, upsampled to ``size`` (bilinear), as JPEG MDS shards.

    Returns:
        float: seconds taken.
    """
    from streaming import MDSWriter

    from magma_composer.pca.source import open_shards

    start = time.perf_counter()
    _, shards = open_shards(source, split=split)
    if sum(s.samples for s in shards) < n:
        raise SystemExit(f"{source}/{split} holds {sum(s.samples for s in shards)} images, fewer than --images {n}")
    written = 0
    (out / "files").mkdir(parents=True)
    with MDSWriter(out=str(out / "train"), columns={"x": "bytes", "y": "int"}, size_limit=1 << 26) as writer:
        for shard in shards:
            for i in range(shard.samples):
                if written == n:
                    break
                sample = shard.get_item(i)
                image = Image.open(io.BytesIO(sample["x"])).convert("RGB").resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                writer.write({"x": buf.getvalue(), "y": int(sample.get("y", 0))})
                (out / "files" / f"{written:06d}.jpg").write_bytes(buf.getvalue())
                written += 1
    return time.perf_counter() - start


def run_ours(work: Path, size: int, k: int, extra: list[str]) -> tuple[float, Path]:
    """Our command line in a new process; returns its wall time and the basis file."""
    out = work / "ours.pt"
    cmd = [sys.executable, "-m", "magma_composer.pca", "fit", "--data", str(work), "--split", "train"]
    cmd += ["--image-size", str(size), "--components", str(k), "--out", str(out), "--overwrite", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=7200)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"our fit failed ({done.returncode}): {done.stderr.strip()}")
    print(f"  {done.stdout.strip()}")
    return seconds, out


def decode_all(work: Path) -> np.ndarray:
    """Every JPEG file of the work folder decoded with PIL: ``N x D`` float32 in [0, 1], C, H, W order."""
    rows = []
    for path in sorted((work / "files").iterdir()):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        rows.append(pixels.transpose(2, 0, 1).reshape(-1))
    return np.stack(rows).astype(np.float32) / np.float32(255)


def sklearn_child(work: Path, k: int, batch: int) -> None:
    """``IncrementalPCA`` from the JPEG files (this process imports no torch); writes times and components."""
    from sklearn import __version__
    from sklearn.decomposition import IncrementalPCA
    from threadpoolctl import threadpool_info

    assert "torch" not in sys.modules
    start = time.perf_counter()
    z = standardise(decode_all(work))
    decoded = time.perf_counter() - start
    start = time.perf_counter()
    ipca = IncrementalPCA(n_components=k, batch_size=batch).fit(z)
    fitted = time.perf_counter() - start
    np.save(work / "sklearn.npy", ipca.components_)
    blas = ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info())
    record = {"decode_seconds": decoded, "fit_seconds": fitted, "blas": f"scikit-learn {__version__}; {blas}"}
    (work / "sklearn.json").write_text(json.dumps(record))


def run_sklearn(work: Path, k: int, batch: int) -> tuple[float, float, np.ndarray]:
    """:func:`sklearn_child` in a new process; returns its decode and fit times and its ``K x D`` components."""
    cmd = [sys.executable, __file__, "--sklearn-child", str(work), "--components", str(k), "--ipca-batch", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=36000)
    if done.returncode != 0:
        raise SystemExit(f"IncrementalPCA failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    times = json.loads((work / "sklearn.json").read_text())
    return times["decode_seconds"], times["fit_seconds"], np.load(work / "sklearn.npy")


def standardise(x: np.ndarray) -> np.ndarray:
    """``z = (x - mean) / std`` in place (float64 statistics, population std, 1 for constant pixels)."""
    mean = x.mean(0, dtype=np.float64)
    # by blocks of pixels: a float64 copy of all the images would double the memory
    squares = [(x[:, i : i + BLOCK].astype(np.float64) ** 2).mean(0) for i in range(0, x.shape[1], BLOCK)]
    var = np.maximum(np.concatenate(squares) - mean**2, 0.0)
    std = np.where(var > 1e-12, np.sqrt(var), 1.0)
    x -= mean.astype(np.float32)
    x /= std.astype(np.float32)
    return x


def reference(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact top-``k`` PCA of the standardised images ``z`` in float64: ``(D x k components, eigenvalues, total)``."""
    import torch

    n, d = z.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(0, d, BLOCK):
        block = z[:, i : i + BLOCK].double()
        gram.addmm_(block, block.T)
    gram /= n
    total = float(torch.diagonal(gram).sum())  # trace(Z Z^T) / N = trace(C): the total variance
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    weights = evecs / (n * evals).sqrt()
    vectors = torch.cat([z[:, i : i + BLOCK].double().T @ weights for i in range(0, d, BLOCK)])
    return vectors, evals, total


def accuracy(components: torch.Tensor, exact: torch.Tensor, z: torch.Tensor, total: float) -> dict:
    """Principal angles (degrees) to the exact subspace and the variance captured, of ``D x K`` ``components``."""
    import torch

    a = torch.linalg.qr(components.double())[0]  # orthonormal (both fits' are, to rounding)
    k = a.shape[1]

    def angles(m: int) -> torch.Tensor:
        cosines = torch.linalg.svdvals(exact[:, :m].T @ a[:, :m]).clamp(max=1.0)
        return torch.rad2deg(torch.arccos(cosines))

    every, lead = angles(k), angles(k // 2)
    projected = sum(z[:, i : i + BLOCK].double() @ a[i : i + BLOCK] for i in range(0, z.shape[1], BLOCK))
    captured = float((projected**2).sum()) / z.shape[0] / total
    return {
        "max_angle_deg": float(every.max()),
        "mean_angle_deg": float(every.mean()),
        "max_angle_lead_half_deg": float(lead.max()),
        "mean_angle_lead_half_deg": float(lead.mean()),
        "captured_variance": captured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="N, CIFAR-10 training images used")
    parser.add_argument("--components", type=int, default=1024, help="K")
    parser.add_argument("--size", type=int, default=224, help="side the images are upsampled to")
    parser.add_argument("--data", default=str(REPO / "data" / "cifar10-mds"), help="CIFAR-10 as MDS shards")
    parser.add_argument("--split", default="train")
    parser.add_argument("--ipca-batch", type=int, default=None, help="IncrementalPCA batch_size (default K)")
    parser.add_argument("--work", default=None, help="folder for the upsampled data (default: a temporary one)")
    parser.add_argument("--ours-args", default="", help="extra arguments for our fit, e.g. '--method randomized'")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--sklearn-child", default=None, help=argparse.SUPPRESS)  # the IncrementalPCA process
    args = parser.parse_args()
    n, k, size = args.images, args.components, args.size
    batch = args.ipca_batch or k
    if args.sklearn_child:
        sklearn_child(Path(args.sklearn_child), k, batch)
        return
    import torch

    from magma_composer.pca import load_basis

    if not 2 <= k < n or batch < k:
        raise SystemExit("need 2 <= --components < --images and --ipca-batch >= --components")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pca-fit-bench-"))
    for old in ("train", "files"):
        if (work / old).exists():
            shutil.rmtree(work / old)
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
        f"{torch.get_num_threads()} threads"
    )
    print(f"data: {n} CIFAR-10 images upsampled to {size} px (D = {3 * size * size}), K = {k}; work folder {work}")
    built = build_data(args.data, args.split, n, size, work)
    print(f"  built in {built:.1f} s")
    results: dict = {"images": n, "components": k, "size": size, "ipca_batch": batch, "build_seconds": built}

    print("ours: python -m magma_composer.pca fit ...", args.ours_args)
    ours_seconds, ours_file = run_ours(work, size, k, args.ours_args.split())
    basis = load_basis(ours_file)
    print(f"  {ours_seconds:.1f} s ({basis.method})")

    print(f"scikit-learn IncrementalPCA(n_components={k}, batch_size={batch})")
    decoded, fitted, sk_components = run_sklearn(work, k, batch)
    blas = json.loads((work / "sklearn.json").read_text())["blas"]
    print(f"  decode + standardise {decoded:.1f} s, fit {fitted:.1f} s (its BLAS: {blas})")

    print("exact float64 reference (Gram matrix)")
    start = time.perf_counter()
    zt = torch.from_numpy(standardise(decode_all(work)))
    exact, exact_evals, total = reference(zt, k)
    print(f"  {time.perf_counter() - start:.1f} s")
    ours_acc = accuracy(basis.components, exact, zt, total)
    sk_acc = accuracy(torch.from_numpy(sk_components.T.copy()), exact, zt, total)
    ours_acc["eigenvalue_max_rel_error"] = float((basis.eigenvalues / exact_evals - 1).abs().max())
    results.update(
        ours={"seconds": ours_seconds, "method": basis.method, **ours_acc},
        sklearn={"seconds": decoded + fitted, "blas": blas, "decode_seconds": decoded, "fit_seconds": fitted, **sk_acc},
        exact_captured_variance=float(exact_evals.sum()) / total,
        ratio_total=(decoded + fitted) / ours_seconds,
        ratio_fit_only=fitted / ours_seconds,
    )
    print("\n| fit | wall time | largest / mean angle to exact (deg) | leading K/2: largest / mean | captured |")
    print("|---|---|---|---|---|")
    for name, r in (("ours", results["ours"]), ("IncrementalPCA", results["sklearn"])):
        print(
            f"| {name} | {r['seconds']:.1f} s | {r['max_angle_deg']:.3g} / {r['mean_angle_deg']:.3g} | "
            f"{r['max_angle_lead_half_deg']:.3g} / {r['mean_angle_lead_half_deg']:.3g} | "
            f"{r['captured_variance']:.6f} |"
        )
    print(f"| exact | | 0 / 0 | 0 / 0 | {results['exact_captured_variance']:.6f} |")
    print(
        f"\nspeed-up: {results['ratio_total']:.2f}x against IncrementalPCA with its decode, "
        f"{results['ratio_fit_only']:.2f}x against its fit alone"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
