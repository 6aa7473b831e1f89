"""Images per second per loader worker: MDS streaming (``StreamingImageDataset``) against torchvision ``ImageFolder``.

A third column reads the same MDS shards with the same decode and transform through streaming 0.13's own
iteration (its per-worker download / ready / yield threads and its reader), to show what our iteration changes.

Both loaders read the same JPEG bytes and apply the same MAE training transform
(:func:`magma_composer.data.transforms.train_transform`: RandomResizedCrop, flip, to tensor, normalise) in
``DataLoader`` worker processes:

* ``32 px``: real CIFAR-10 JPEGs (32 x 32) as they come, cropped to 32 px;
* ``256 px``: the same images scaled to a 256 px shorter side and re-encoded by the converter
  (``convert_image_folder(resize=256)``), cropped to 224 px: ImageNet as ``--resize 256`` stores it. ImageNet's
  original JPEGs (mostly around 500 x 375) cost more to decode: for those, read this figure as an upper bound.

The ``ImageFolder`` tree of the 256 px set is written from the MDS samples, so both loaders decode identical bytes;
all files sit in the page cache (the local-disk best case for ``ImageFolder``). Each measurement is one pass over
the images after a warm-up batch, and the loaders alternate. Two figures per loader: images per second of wall
clock (the best of ``--repeats`` passes, since other jobs on the machine only ever slow a pass down) and images per
CPU second of the worker processes (all their threads, from ``/proc``; the median pass), which is what one
dedicated core per worker delivers. The ratios to ImageFolder are taken within each repeat (its passes run back to
back, in alternating order) and reported as the median over repeats with their range: on a shared machine this
is steadier than a ratio of best or median rates. Usage::

    python bench/data_pipeline.py                        # 300 images per class (3,000), 1 worker
    python bench/data_pipeline.py --per-class 100 --workers 2 --json runs/data_pipeline.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from streaming import StreamingDataset  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from magma_composer.data.convert import convert_image_folder  # noqa: E402
from magma_composer.data.dataset import StreamingImageDataset  # noqa: E402
from magma_composer.data.transforms import train_transform  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class StreamingOwnIteration(StreamingImageDataset):
    """The same images and transform, read through streaming 0.13's own iteration (its threads, locks, reads)."""

    __iter__ = StreamingDataset.__iter__
    get_item = StreamingDataset.get_item
    prepare_shard = StreamingDataset.prepare_shard


#: the MDS data set classes measured: the project's, and the same read by streaming's own machinery
MDS_CLASSES = {"mds": StreamingImageDataset, "streaming": StreamingOwnIteration}
LABELS = {"mds": "StreamingImageDataset", "streaming": "streaming's iteration"}
CIFAR_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def extract_cifar(tarball: Path, dest: Path, per_class: int) -> Path:
    """The first ``per_class`` training JPEGs of each CIFAR-10 class as ``dest/<class>/<name>.jpg``."""
    counts: dict[str, int] = {}
    with tarfile.open(tarball) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train" or not member.name.endswith(".jpg"):
                continue
            cls = parts[-2]
            if counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            (dest / cls).mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:
                (dest / cls / parts[-1]).write_bytes(src.read())
    return dest


def dump_image_folder(mds: Path, classes: list[str], dest: Path) -> Path:
    """Writes every sample of an MDS folder back out as ``dest/<class>/<i>.jpg`` (the very same bytes)."""
    dataset = StreamingDataset(local=str(mds), batch_size=1)
    for k in range(dataset.num_samples):
        sample = dataset[k]
        folder = dest / classes[int(sample["y"])]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{int(sample['i']):06d}.jpg").write_bytes(sample["x"])
    return dest


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (all their threads), from ``/proc``."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def one_pass(dataset, workers: int, batch_size: int, shuffle: bool) -> tuple[int, float, float]:
    """One pass over ``dataset`` after a warm-up batch: images, wall seconds, and the workers' CPU seconds."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=shuffle,
        worker_init_fn=_worker_init,
        persistent_workers=False,
    )
    iterator = iter(loader)
    next(iterator)  # warm-up: workers started, first shard / files opened
    pids = [w.pid for w in iterator._workers]
    cpu_start, start, images = _cpu_seconds(pids), time.perf_counter(), 0
    cpu_end = cpu_start
    for images_batch, _ in iterator:
        images += len(images_batch)
        cpu_end = _cpu_seconds(pids)  # read after every batch: the workers are gone once the pass is over
    return images, time.perf_counter() - start, cpu_end - cpu_start


def measure(
    name: str, mds: Path, folder: Path, crop: int, workers: int, batch_size: int, repeats: int
) -> dict[str, object]:
    """Images per second per worker and the ratios to ImageFolder, from passes taken side by side.

    Each repeat makes one pass per loader, back to back, in an order that alternates between repeats; a ratio is
    taken within a repeat (the passes of one repeat share the machine's load) and the median over repeats is
    reported with its range. Rates: by wall clock (best pass) and per CPU second of the workers (median pass).
    """
    transform = train_transform(crop)
    loaders = [*MDS_CLASSES, "imagefolder"]
    wall: dict[str, list[float]] = {loader: [] for loader in loaders}
    cpu: dict[str, list[float]] = {loader: [] for loader in loaders}
    for repeat in range(repeats):
        for loader in loaders if repeat % 2 == 0 else loaders[::-1]:
            if loader == "imagefolder":
                dataset = ImageFolder(str(folder), transform=transform)
            else:
                dataset = MDS_CLASSES[loader](str(mds), image_size=crop, batch_size=batch_size, shuffle=True)
            # streaming shuffles by itself; ImageFolder through the sampler
            images, seconds, cpu_seconds = one_pass(dataset, workers, batch_size, shuffle=loader == "imagefolder")
            if loader != "imagefolder":
                dataset.release()  # streaming would keep its shared memory until exit
            wall[loader].append(images / seconds / workers)
            cpu[loader].append(images / cpu_seconds)
    result: dict[str, object] = {"set": name, "crop": crop, "images": images, "workers": workers, "passes": wall}
    for loader in loaders:
        result[f"{loader}_wall"] = max(wall[loader])
        result[f"{loader}_cpu"] = statistics.median(cpu[loader])
    for loader in MDS_CLASSES:
        for kind, rates in (("wall", wall), ("cpu", cpu)):
            paired = [a / b for a, b in zip(rates[loader], rates["imagefolder"])]
            result[f"{loader}_{kind}_ratio"] = statistics.median(paired)
            result[f"{loader}_{kind}_ratio_range"] = [min(paired), max(paired)]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, default=CIFAR_TARBALL, help="CIFAR-10 JPEG tarball")
    parser.add_argument("--per-class", type=int, default=300, help="training images per class (default 300)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="passes per loader; the best is kept (default 3)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.tarball.is_file():
        parser.error(f"--tarball {args.tarball} not found: the benchmark needs the CIFAR-10 JPEG tarball")
    torch.set_num_threads(1)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    for stale in ("jpeg32", "mds32", "mds256", "jpeg256"):
        shutil.rmtree(work / stale, ignore_errors=True)
    src32 = extract_cifar(args.tarball, work / "jpeg32", args.per_class)
    classes = sorted(p.name for p in src32.iterdir())
    convert_image_folder(src32, work / "mds32", progress=False)
    convert_image_folder(src32, work / "mds256", resize=256, quality=90, progress=False)
    src256 = dump_image_folder(work / "mds256", classes, work / "jpeg256")

    results = [
        measure("CIFAR-10 JPEGs at 32 px", work / "mds32", src32, 32, args.workers, args.batch_size, args.repeats),
        measure(
            "same at 256 px (converter)", work / "mds256", src256, 224, args.workers, args.batch_size, args.repeats
        ),
    ]
    print(
        f"images per second per loader worker: by wall clock (best of {args.repeats} passes) / per CPU second of "
        f"the worker (median); ratio to ImageFolder: median over the {args.repeats} side-by-side repeats [range], "
        f"wall / CPU; {args.workers} worker(s), batch {args.batch_size}, MAE train transform, {os.cpu_count()} cores "
        f"({platform.machine()})"
    )
    for r in results:
        print(f"{r['set']} ({r['images']} images, crop {r['crop']}):")
        print(f"  {'ImageFolder':<24} {r['imagefolder_wall']:>6.0f} / {r['imagefolder_cpu']:>5.0f}")
        for loader in MDS_CLASSES:
            ratios = "   ".join(
                f"{r[f'{loader}_{kind}_ratio']:.2f} [{r[f'{loader}_{kind}_ratio_range'][0]:.2f}-"
                f"{r[f'{loader}_{kind}_ratio_range'][1]:.2f}]"
                for kind in ("wall", "cpu")
            )
            print(f"  {LABELS[loader]:<24} {r[f'{loader}_wall']:>6.0f} / {r[f'{loader}_cpu']:>5.0f}   ratio {ratios}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
