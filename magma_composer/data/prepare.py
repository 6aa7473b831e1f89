"""Prepares the papers' data sets from the files they are distributed in, as MDS shards for ``StreamingImageDataset``.

Usage::

    python -m magma_composer.data.prepare cifar100 --src ~/Downloads/cifar-100-python --out data/cifar100
    python -m magma_composer.data.prepare stl10 --src ~/Downloads/stl10_binary --out data/stl10
    python -m magma_composer.data.prepare tiny-imagenet --src ~/Downloads/tiny-imagenet-200 --out data/tiny-imagenet
    python -m magma_composer.data.prepare imagenet100 --src /data/imagenet --out data/imagenet100 --workers 8
    python -m magma_composer.data.prepare bloodmnist --src ~/Downloads/bloodmnist_64.npz --out data/bloodmnist-64

Nothing is downloaded: ``--src`` is what the data set's own site distributes, unpacked (the folder named below,
or the folder holding it).

Data sets (NAME: what ``--src`` holds -> splits):

* ``cifar100``: the CIFAR-100 python version, ``cifar-100-python/{train,test,meta}`` (pickles) -> ``train``
  (50,000), ``test`` (10,000); 32 x 32 px. The 100 fine labels, or with ``--labels coarse`` the 20 superclasses.
* ``stl10``: the binary version, ``stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin,
  unlabeled_X.bin, class_names.txt}`` -> ``train`` (5,000), ``test`` (8,000), ``unlabeled`` (100,000 images
  without labels, for pre-training); 96 x 96 px. Images are stored channel by channel, each column by column
  (column-major); labels 1..10 become class indices 0..9. On request (``--splits train+unlabeled``) also
  torchvision's ``train+unlabeled``: the 5,000 training images, then the 100,000 unlabelled ones, without labels
  (what solo-learn pre-trains STL-10 on).
* ``tiny-imagenet``: ``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG,
  val/val_annotations.txt}`` -> ``train`` (100,000), ``val`` (10,000; its labels from ``val_annotations.txt``);
  64 x 64 px. Class ``k`` is the ``k``-th WordNet id of ``wnids.txt`` in sorted order in both splits (torchvision's
  ``ImageFolder`` order on ``train/``); class names from ``words.txt`` when present. The ``test`` images have no
  published labels and are not prepared.
* ``imagenet100``: an ImageNet-1k folder in class-folder layout, ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``
  -> ``train`` (about 1,300 per class), ``val`` (50 per class): only the 100 classes of CMC's list (also
  solo-learn's), shipped in ``magma_composer/data/imagenet100_classes.txt``; class ``k`` is the ``k``-th id in
  sorted order (``ImageFolder`` on the 100 folders, as CMC and solo-learn do). Other class folders are not read; a
  missing one is an error naming it. Class names from timm's ImageNet synset table.
* ``bloodmnist``, ``dermamnist``, ``pathmnist``: a MedMNIST ``.npz`` (``train_images``, ``train_labels``,
  ``val_...``, ``test_...``; labels ``N x 1``) -> ``train``, ``val``, ``test``. ``--src`` is the file, or a folder
  holding exactly one of ``NAME.npz`` (28 px, MedMNIST v2) and ``NAME_64.npz`` / ``_128`` / ``_224`` (MedMNIST+).
  Images keep their native size (28 or 64 px ...; the manifest records it); the training transform resizes.

Output: ``OUT/<split>/``, each an MDS data set written by the converter (``magma_composer.data.convert``: the same
chunks, resumption, shard hashes and per-split ``manifest.json``), read with
``StreamingImageDataset(remote=OUT, split=...)``; a split without labels (STL-10's ``unlabeled``) has no ``y``
column, so the data set yields label ``-1``, ``has_labels`` is false and label-needing callbacks refuse it.
``OUT/manifest.json`` (written last) names the data set, its classes (``classes``: index -> id, ``class_names``:
index -> readable name), the native image size, and each split's count and per-class counts.

Images: image files (Tiny-ImageNet, ImageNet-100) are stored as the converter stores them (RGB JPEGs byte for byte,
others re-encoded as JPEG at ``--quality``). Pixel arrays (CIFAR-100, STL-10, MedMNIST) are stored as PNG, every
pixel exactly as in the source (``--format jpeg`` for smaller shards, at ``--quality``). ``--resize S`` scales the
shorter side of every image to ``S`` pixels.

``OUT`` must be empty or hold a preparation of this command. Running the same command again resumes an interrupted
run (finished chunks are kept), keeps a complete one (nothing rewritten), and adds splits that were not asked for
before (``--splits``). A preparation of another source or with other options is refused unless ``--overwrite``,
which deletes what this command wrote there (nothing else) and starts over.

Exit codes: 0 done; 1 an unreadable image or a write error; 2 bad command-line input or source files (one line
``python -m magma_composer.data.prepare: error: ...``); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from magma_composer.data.convert import (
    ARRAY_FORMATS,
    DEFAULT_HASHES,
    IMAGE_EXTENSIONS,
    BadImageError,
    ConversionError,
    SourceListing,
    _check_location,
    _check_writable,
    _os_error_text,
    _positive_int,
    _shown,
    _validate_options,
    list_image_folder,
    write_listing,
)
from magma_composer.data.storage import RemoteDataError, is_remote, write_bytes

__all__ = [
    "DATASETS",
    "MEDMNIST_CLASSES",
    "PrepareError",
    "imagenet100_classes",
    "main",
    "prepare_dataset",
]

PROG = "python -m magma_composer.data.prepare"
RECORD_NAME = "prepare.json"
MANIFEST_NAME = "manifest.json"
_FORMAT = "magma_composer.prepare/1"
_STL_SIDE = 96
_STL_BYTES = 3 * _STL_SIDE * _STL_SIDE

#: class names of the MedMNIST v2 / MedMNIST+ sets (index -> name), from the ``label`` entries of MedMNIST's
#: ``medmnist/info.py`` (the .npz files hold only indices)
MEDMNIST_CLASSES = {
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ),
    "pathmnist": (
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
}


class PrepareError(ConversionError):
    """Bad input to the preparer: options, source files that are missing, corrupt or laid out otherwise, or an
    output that holds something else. The message names the file or option."""


@dataclass
class Found:
    """What a reader found in ``--src`` (before any image is read).

    Attributes:
        root: the data set's folder (or file, for MedMNIST), recorded as the source.
        classes: index -> class id (a WordNet id, or the name where the data set has no ids).
        class_names: index -> readable name.
        listings: split -> a function that reads the split's images (:class:`SourceListing`).
        arrays: whether the images are pixel arrays (stored as PNG/JPEG) rather than image files.
        image_size: the native image side in pixels, where every image has it.
        notes: lines printed for the user (what was found).
    """

    root: Path
    classes: list[str]
    class_names: list[str]
    listings: dict[str, Callable[[], SourceListing]]
    arrays: bool
    image_size: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Spec:
    splits: tuple[str, ...]
    read: Callable[..., Found]
    summary: str
    arrays: bool  # pixel arrays (stored as PNG / JPEG), not image files
    default: tuple[str, ...] | None = None  # the splits prepared without --splits (None: all)


# ---------------------------------------------------------------------------------------------------- helpers


def _stats(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _find_root(src: Path, folder: str, markers: Sequence[str], what: str) -> Path:
    """``src`` or ``src/<folder>``: the first that holds any of ``markers``; else an error saying what is there."""
    for candidate in (src, src / folder):
        if any((candidate / m).exists() for m in markers):
            return candidate
    try:
        there = sorted(p.name for p in src.iterdir())[:12]
    except OSError as error:
        raise PrepareError(f"cannot list --src {src}: {_os_error_text(error)}") from error
    raise PrepareError(
        f"--src {src} does not hold {what} (looked for {', '.join(markers)} in it and in {folder}/); "
        f"it holds: {', '.join(there) or 'nothing'}"
    )


def _need(root: Path, names: Sequence[str], dataset: str) -> None:
    missing = [str(root / n) for n in names if not (root / n).exists()]
    if missing:
        raise PrepareError(f"{dataset}: missing from --src: {_shown(missing)}")


def _labels_in_range(labels: np.ndarray, count: int, where: str, offset: int = 0) -> None:
    """Refuses labels outside ``[offset, offset + count)``, naming the first bad one and its position."""
    bad = np.flatnonzero((labels < offset) | (labels >= offset + count))
    if len(bad):
        raise PrepareError(
            f"{where}: label {int(labels[bad[0]])} at position {int(bad[0])} is outside {offset}..{offset + count - 1} "
            f"({count} classes); {len(bad)} such label(s): a corrupt file, or another data set's"
        )


def _array_listing(root: Path, name: str, images: Any, labels: np.ndarray | None, classes: list[str]) -> SourceListing:
    """A listing of pixel arrays read from the file ``root``; ``labels`` ``None``: unlabelled."""
    stats = [_stats(root)] * len(images)
    if labels is None:
        files = [(f"{name}[{k}]", -1) for k in range(len(images))]
        return SourceListing(root, [], files, stats, labelled=False, images=images)
    files = [(f"{name}[{k}]", int(y)) for k, y in enumerate(labels)]
    return SourceListing(root, list(classes), files, stats, images=images)


# ---------------------------------------------------------------------------------------------------- CIFAR-100


class _ArrayUnpickler(pickle.Unpickler):
    """Loads only dicts, lists, strings, numbers and NumPy arrays: unpickling may otherwise run any code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module[len("numpy.core.") :]  # NumPy 2 warns on numpy.core
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds a {module}.{name} object, not only arrays and lists")


def _load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys (the files have Python 2 ``str`` keys: ``b'data'`` in Python 3)."""
    try:
        with open(path, "rb") as f:
            value = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as error:
        raise PrepareError(f"cannot read {path}: {_os_error_text(error)}") from error
    except Exception as error:  # noqa: BLE001 -- a corrupt pickle raises almost anything
        raise PrepareError(
            f"{path} is not a readable CIFAR-100 pickle ({type(error).__name__}: {error}); download and unpack "
            f"cifar-100-python.tar.gz again"
        ) from error
    if not isinstance(value, dict):
        raise PrepareError(f"{path} holds a {type(value).__name__}, not the dict of a CIFAR-100 pickle")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in value.items()}


def _key(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise PrepareError(f"{path} has no {key!r} entry (it has {', '.join(sorted(batch))}): not a CIFAR-100 file")
    return batch[key]


def _read_cifar100(src: Path, splits: Sequence[str], labels: str) -> Found:
    root = _find_root(src, "cifar-100-python", ("meta", "train", "test"), "the CIFAR-100 python version")
    _need(root, ["meta", *splits], "cifar100")
    meta_path = root / "meta"
    meta = _load_pickle(meta_path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, f"{labels}_label_names", meta_path)]
    if len(set(names)) != len(names) or not names:
        raise PrepareError(f"{meta_path}: {labels}_label_names is not a list of distinct names")

    def listing(split: str) -> SourceListing:
        path = root / split
        batch = _load_pickle(path)
        data = np.asarray(_key(batch, "data", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise PrepareError(
                f"{path}: 'data' is {data.dtype} {tuple(data.shape)}, expected uint8 N x 3072 (32 x 32 px, the red "
                f"plane, then green, then blue, each row by row)"
            )
        y = np.asarray(_key(batch, f"{labels}_labels", path), dtype=np.int64).reshape(-1)
        if len(y) != len(data):
            raise PrepareError(f"{path}: {len(data)} images but {len(y)} {labels} labels")
        _labels_in_range(y, len(names), f"{path} ({labels} labels)")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # N x row x column x channel
        return _array_listing(path, split, images, y, names)

    return Found(
        root,
        names,
        names,
        {s: (lambda s=s: listing(s)) for s in splits},
        arrays=True,
        image_size=32,
        notes=[f"cifar100: {len(names)} {labels} labels ({labels}_label_names of {meta_path})"],
    )


# ---------------------------------------------------------------------------------------------------- STL-10


def _stl_images(path: Path) -> np.ndarray:
    """``N x 96 x 96 x 3`` (row, column, channel) view of an STL-10 ``*_X.bin``, memory-mapped (read lazily)."""
    size = path.stat().st_size
    if size == 0 or size % _STL_BYTES:
        raise PrepareError(
            f"{path} has {size} bytes, not a multiple of {_STL_BYTES} (3 x 96 x 96 per image): truncated or not an "
            f"STL-10 binary; download and unpack stl10_binary.tar.gz again"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // _STL_BYTES, 3, _STL_SIDE, _STL_SIDE))
    # each channel is stored column by column: raw[n, c, column, row]
    return raw.transpose(0, 3, 2, 1)


class _Concat:
    """Image arrays one after another, read one image at a time."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, k: int) -> np.ndarray:
        part = int(np.searchsorted(self.starts, k, side="right")) - 1
        return self.parts[part][k - int(self.starts[part])]


def _read_stl10(src: Path, splits: Sequence[str], labels: str | None) -> Found:
    root = _find_root(src, "stl10_binary", ("class_names.txt", "train_X.bin"), "the STL-10 binary version")
    files = ["class_names.txt"]
    for split in splits:
        if split == "train+unlabeled":
            files += ["train_X.bin", "unlabeled_X.bin"]
        else:
            files += [f"{split}_X.bin"] + ([] if split == "unlabeled" else [f"{split}_y.bin"])
    _need(root, list(dict.fromkeys(files)), "stl10")
    names = [line.strip() for line in (root / "class_names.txt").read_text().splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise PrepareError(f"{root / 'class_names.txt'}: expected one distinct class name per line")

    def listing(split: str) -> SourceListing:
        if split == "train+unlabeled":  # torchvision's split of that name: train's images, then unlabeled's
            parts = [root / "train_X.bin", root / "unlabeled_X.bin"]
            images = _Concat([_stl_images(p) for p in parts])
            named = [(p, k) for p, part in zip(parts, images.parts) for k in range(len(part))]
            files = [(f"{p.name}[{k}]", -1) for p, k in named]
            stats = {p: _stats(p) for p in parts}
            return SourceListing(root, [], files, [stats[p] for p, _ in named], labelled=False, images=images)
        x_path = root / f"{split}_X.bin"
        images = _stl_images(x_path)
        if split == "unlabeled":
            return _array_listing(x_path, x_path.name, images, None, [])
        y_path = root / f"{split}_y.bin"
        y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        if len(y) != len(images):
            raise PrepareError(f"{y_path} holds {len(y)} labels but {x_path} {len(images)} images")
        _labels_in_range(y, len(names), str(y_path), offset=1)
        return _array_listing(x_path, x_path.name, images, y - 1, names)

    notes = [
        f"stl10: split {s!r} has no labels (no 'y' column): for pre-training only" for s in splits if "unlabeled" in s
    ]
    return Found(root, names, names, {s: (lambda s=s: listing(s)) for s in splits}, True, _STL_SIDE, notes)


# ---------------------------------------------------------------------------------------------------- Tiny-ImageNet


def _read_words(path: Path) -> dict[str, str]:
    words = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            wnid, _, name = line.partition("\t")
            if wnid.strip():
                words[wnid.strip()] = name.strip()
    return words


def _folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_tiny_imagenet(src: Path, splits: Sequence[str], labels: str | None) -> Found:
    root = _find_root(src, "tiny-imagenet-200", ("wnids.txt",), "Tiny-ImageNet (tiny-imagenet-200/wnids.txt)")
    needed = ["wnids.txt"] + [{"train": "train", "val": "val/val_annotations.txt"}[s] for s in splits]
    _need(root, needed + (["val/images"] if "val" in splits else []), "tiny-imagenet")
    wnids = [line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise PrepareError(f"{root / 'wnids.txt'}: expected one distinct WordNet id per line")
    classes = sorted(wnids)
    index = {w: k for k, w in enumerate(classes)}
    words = _read_words(root / "words.txt")
    names = [words.get(w, w) for w in classes]
    if "train" in splits:
        extra = sorted(set(_folders(root / "train")) - set(wnids))
        if extra:
            raise PrepareError(f"{root / 'train'} holds folder(s) not in wnids.txt: {_shown(extra)}")

    def train() -> SourceListing:
        return list_image_folder(root / "train", IMAGE_EXTENSIONS, classes=classes)

    def val() -> SourceListing:
        annotations = root / "val" / "val_annotations.txt"
        images = root / "val" / "images"
        files, seen = [], set()
        for number, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) < 2 or fields[1] not in index:
                what = "fewer than 2 fields" if len(fields) < 2 else f"WordNet id {fields[1]!r} is not in wnids.txt"
                raise PrepareError(
                    f"{annotations}, line {number}: {what} (expected FILE<tab>WNID<tab>x0<tab>y0<tab>x1<tab>y1): "
                    f"{line.strip()[:80]!r}"
                )
            if fields[0] in seen:
                raise PrepareError(f"{annotations}, line {number}: {fields[0]} is annotated twice")
            seen.add(fields[0])
            files.append((fields[0], index[fields[1]]))
        on_disk = {p.name for p in images.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)}
        missing = sorted(seen - on_disk)
        if missing:
            raise PrepareError(f"{annotations} names image(s) missing from {images}: {_shown(missing)}")
        unannotated = sorted(on_disk - seen)
        if unannotated:
            raise PrepareError(f"image(s) in {images} without a line in {annotations}: {_shown(unannotated)}")
        return SourceListing(
            root / "val",
            classes,
            [(f"images/{name}", label) for name, label in files],
            [_stats(images / name) for name, _ in files],
        )

    makers = {"train": train, "val": val}
    notes = [
        f"tiny-imagenet: {len(classes)} classes (wnids.txt), class k = the k-th id in sorted order in every split"
        + ("" if words else "; no words.txt: the ids are the class names")
    ]
    return Found(root, classes, names, {s: makers[s] for s in splits}, False, 64, notes)


# ---------------------------------------------------------------------------------------------------- ImageNet-100


def imagenet100_classes() -> list[str]:
    """The 100 WordNet ids of ImageNet-100 (CMC's list, also solo-learn's), in the order of the shipped file."""
    text = resources.files("magma_composer.data").joinpath("imagenet100_classes.txt").read_text()
    ids = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(ids) != 100 or len(set(ids)) != 100 or not all(re.fullmatch(r"n\d{8}", i) for i in ids):
        raise RuntimeError("magma_composer/data/imagenet100_classes.txt is damaged: expected 100 distinct WordNet ids")
    return ids


def _imagenet_names(wnids: Sequence[str]) -> list[str]:
    """Readable names from timm's ImageNet synset table (the id itself where it has none)."""
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.label_name_to_description(w) or w for w in wnids]
    except Exception:  # noqa: BLE001 -- names are a convenience; an older timm without the table gives the ids
        return list(wnids)


def _read_imagenet100(src: Path, splits: Sequence[str], labels: str | None) -> Found:
    root = src
    _need(root, list(splits), "imagenet100")
    classes = sorted(imagenet100_classes())
    for split in splits:
        folder = root / split
        have = set(_folders(folder))
        if not have & set(classes):
            flat = [p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
            layout = (
                f"it holds {len(flat)} image files and no class folders (ILSVRC2012's raw validation layout): "
                f"sort them into {split}/<wnid>/ first (with the devkit's labels), then run again"
                if flat
                else f"it holds none of the 100 class folders ({split}/<wnid>/, e.g. {classes[0]})"
            )
            raise PrepareError(f"imagenet100: {folder}: {layout}")
        missing = sorted(set(classes) - have)
        if missing:
            raise PrepareError(
                f"imagenet100: {folder} lacks {len(missing)} of the 100 ImageNet-100 class folders: {_shown(missing)}"
            )

    def listing(split: str) -> SourceListing:
        return list_image_folder(root / split, IMAGE_EXTENSIONS, classes=classes)

    notes = ["imagenet100: the 100 classes of CMC's list (magma_composer/data/imagenet100_classes.txt), sorted ids"]
    return Found(
        root, classes, _imagenet_names(classes), {s: (lambda s=s: listing(s)) for s in splits}, False, None, notes
    )


# ---------------------------------------------------------------------------------------------------- MedMNIST


def _medmnist_file(name: str, src: Path) -> Path:
    if src.is_file():
        return src
    candidates = sorted(src.glob(f"{name}.npz")) + sorted(
        p for p in src.glob(f"{name}_*.npz") if re.fullmatch(rf"{name}_\d+\.npz", p.name)
    )
    if not candidates:
        raise PrepareError(f"{name}: --src {src} holds no {name}.npz or {name}_<size>.npz (MedMNIST's files)")
    if len(candidates) > 1:
        raise PrepareError(
            f"{name}: --src {src} holds {len(candidates)} sizes ({', '.join(p.name for p in candidates)}); give the "
            f"one to prepare as --src (e.g. --src {candidates[-1]})"
        )
    return candidates[0]


def _read_medmnist(name: str, src: Path, splits: Sequence[str], labels: str | None) -> Found:
    path = _medmnist_file(name, src)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise PrepareError(f"{path} is not a readable .npz file ({error}); download it again") from error
    wanted = [f"{s}_{kind}" for s in splits for kind in ("images", "labels")]
    missing = [k for k in wanted if k not in keys]
    if missing:
        raise PrepareError(
            f"{path} has no {', '.join(missing)} (it has {', '.join(sorted(keys)) or 'nothing'}): not a MedMNIST file"
        )
    names = list(MEDMNIST_CLASSES[name])
    sizes: dict[str, int] = {}

    def listing(split: str) -> SourceListing:
        try:
            with np.load(path, allow_pickle=False) as npz:
                images, y = npz[f"{split}_images"], npz[f"{split}_labels"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise PrepareError(f"{path}: cannot read {split}_images / {split}_labels ({error})") from error
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise PrepareError(
                f"{path}: {split}_images is {images.dtype} {tuple(images.shape)}, expected uint8 N x H x W x 3 "
                f"(or N x H x W, grey)"
            )
        if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] != 1) or not np.issubdtype(y.dtype, np.integer):
            raise PrepareError(
                f"{path}: {split}_labels is {y.dtype} {tuple(y.shape)}, expected integer N x 1 (one class per image; "
                f"{name} is single-label)"
            )
        y = y.reshape(-1).astype(np.int64)
        if len(y) != len(images):
            raise PrepareError(f"{path}: {len(images)} {split}_images but {len(y)} {split}_labels")
        _labels_in_range(y, len(names), f"{path} ({split}_labels)")
        sizes[split] = int(images.shape[1])
        return _array_listing(path, f"{split}_images", images, y, names)

    size = re.fullmatch(rf"{name}_(\d+)\.npz", path.name)
    native = int(size.group(1)) if size else 28
    note = (
        f"{name}: {path.name}: images kept at their native {native} x {native} px "
        f"({'MedMNIST+' if size else 'MedMNIST v2, 28 px'}); recipes resize in the transform"
    )
    return Found(path, names, names, {s: (lambda s=s: listing(s)) for s in splits}, True, native, [note])


# ---------------------------------------------------------------------------------------------------- registry


#: data set name -> its splits, reader and a one-line description (the CLI's help)
DATASETS: dict[str, _Spec] = {
    "cifar100": _Spec(("train", "test"), _read_cifar100, "cifar-100-python/{train,test,meta} pickles", True),
    "stl10": _Spec(
        ("train", "test", "unlabeled", "train+unlabeled"),
        _read_stl10,
        "stl10_binary/*.bin; 'unlabeled': 100,000 images, no labels; 'train+unlabeled' (105,000, no labels) only "
        "with --splits",
        True,
        default=("train", "test", "unlabeled"),
    ),
    "tiny-imagenet": _Spec(("train", "val"), _read_tiny_imagenet, "tiny-imagenet-200/ with val_annotations.txt", False),
    "imagenet100": _Spec(("train", "val"), _read_imagenet100, "an ImageNet folder train/<wnid>/, val/<wnid>/", False),
    **{
        name: _Spec(
            ("train", "val", "test"),
            functools.partial(_read_medmnist, name),
            f"MedMNIST {name}.npz (28 px) or {name}_64.npz (64 px)",
            True,
        )
        for name in MEDMNIST_CLASSES
    },
}


# ---------------------------------------------------------------------------------------------------- the output


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _claim(out: Path, record: dict, all_splits: Sequence[str], overwrite: bool) -> dict | None:
    """Checks that ``out`` is empty or holds this command's files; returns the manifest of a complete preparation
    with the same record (``None`` otherwise). With ``overwrite``, deletes what this command wrote there."""
    if not out.exists():
        return None
    own = {RECORD_NAME, MANIFEST_NAME, *all_splits}
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in own and not (n.endswith(".tmp") and n[:-4] in own)]
    if foreign:
        raise PrepareError(
            f"--out {out} holds {_shown(foreign)}: not a data set prepared by this command; choose an empty or new "
            f"folder (nothing there is deleted)"
        )
    existing = _read_json(out / RECORD_NAME)
    if names and not isinstance(existing, dict):
        raise PrepareError(
            f"--out {out} holds {_shown(names)} but no readable {RECORD_NAME}: not a preparation this command can "
            f"resume; delete {out} or choose another --out"
        )
    if names and existing != record and not overwrite:
        theirs, now = existing.get("options") or {}, record["options"]
        keys = sorted(set(theirs) | set(now))
        changed = [f"{k}: {theirs.get(k)!r} there, {now.get(k)!r} now" for k in keys if theirs.get(k) != now.get(k)]
        if existing.get("dataset") != record["dataset"] or existing.get("source") != record["source"]:
            changed.insert(0, f"{existing.get('dataset')} from {existing.get('source')} there")
        raise PrepareError(
            f"--out {out} holds a preparation with other settings ({'; '.join(changed)}); rerun with those, "
            f"pass --overwrite to replace it, or choose another --out"
        )
    if overwrite:
        for name in names:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        return None
    manifest = _read_json(out / MANIFEST_NAME)
    return manifest if isinstance(manifest, dict) and manifest.get("format") == _FORMAT else None


def _check_options(
    name: str,
    spec: _Spec,
    splits: Sequence[str] | None,
    labels: str | None,
    image_format: str | None,
    quality: int | None,
) -> tuple[list[str], str | None, str | None, int]:
    if splits is None:
        splits = list(spec.default or spec.splits)
    else:
        splits = list(dict.fromkeys(splits))
        unknown = [s for s in splits if s not in spec.splits]
        if unknown or not splits:
            raise PrepareError(
                f"--splits {','.join(unknown) or '(none)'}: {name} has the splits {', '.join(spec.splits)}"
            )
    if name == "cifar100":
        labels = labels or "fine"
        if labels not in ("fine", "coarse"):
            raise PrepareError(f"--labels {labels!r}: choose fine (100 classes) or coarse (20 superclasses)")
    elif labels is not None:
        raise PrepareError(f"--labels applies to cifar100 only (fine or coarse); {name} has one set of labels")
    arrays = spec.arrays
    if not arrays and image_format is not None:
        raise PrepareError(
            f"--format applies to data sets of pixel arrays (cifar100, stl10, MedMNIST); {name} is image files, "
            f"stored as their JPEG bytes (--quality sets the quality of the few that are re-encoded)"
        )
    if arrays:
        image_format = image_format or "png"
        if image_format not in ARRAY_FORMATS:
            raise PrepareError(f"--format {image_format!r}: choose png (lossless) or jpeg")
        if image_format == "png" and quality is not None:
            raise PrepareError(
                "--quality applies to JPEG output; PNG is lossless: add --format jpeg, or drop --quality"
            )
    quality = 90 if quality is None else quality
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise PrepareError(f"--quality must be an integer from 1 to 95, got {quality!r}")
    return splits, labels, image_format, quality


def prepare_dataset(
    name: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    labels: str | None = None,
    image_format: str | None = None,
    quality: int | None = None,
    resize: int | None = None,
    workers: int = 1,
    shard_size: int | str = "64mb",
    compression: str | None = None,
    chunk_files: int = 10000,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepares data set ``name`` from its distributed files in ``src`` as MDS splits in ``out``.

    See the module docstring for the data sets, the layout of ``out`` and resuming.

    Args:
        name: one of :data:`DATASETS`.
        src: the downloaded, unpacked files (the data set's folder, or the folder holding it; a MedMNIST ``.npz``).
        out: the output folder (local).
        splits: the splits to prepare; default all of the data set's.
        labels: cifar100 only: ``'fine'`` (default, 100 classes) or ``'coarse'`` (20).
        image_format: pixel-array data sets only: ``'png'`` (default, lossless) or ``'jpeg'``.
        quality: JPEG quality, 1 to 95 (default 90): of ``image_format='jpeg'``, or of re-encoded image files.
        resize: scale every image so its shorter side has this many pixels.
        workers: processes that encode images.
        shard_size: MDS shard size limit (bytes or ``'64mb'``).
        compression: MDS shard compression (``'zstd'``...).
        chunk_files: images per resumable chunk.
        skip_bad: skip unreadable image files (listed in the split's manifest) instead of failing.
        overwrite: delete this command's earlier output in ``out`` and start over.
        progress: show progress bars and what was found.

    Returns:
        The manifest, also written to ``out/manifest.json``.

    Raises:
        PrepareError: a bad option, missing/corrupt/misplaced source files (named), or an ``out`` that holds
            something else (a :class:`~magma_composer.data.convert.ConversionError`, as are the converter's own).
        BadImageError: an unreadable image file (without ``skip_bad``).
        OSError: a write fails.
    """
    if name not in DATASETS:
        raise PrepareError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    splits, labels, image_format, quality = _check_options(name, spec, splits, labels, image_format, quality)
    src, out = os.fspath(src), os.fspath(out)
    if not src or is_remote(src):
        raise PrepareError(f"--src {src!r}: give the local folder (or file) of the downloaded data set")
    if not os.path.exists(src):
        raise PrepareError(f"--src {src} does not exist")
    if os.path.isfile(src) and name not in MEDMNIST_CLASSES:
        raise PrepareError(f"--src {src} is a file; give the folder of the unpacked {name} files")
    if not out or is_remote(out):
        raise PrepareError(
            f"--out {out!r}: the preparer writes a local folder (copy it to object storage afterwards, or convert "
            f"an image folder straight to s3:// with python -m magma_composer.data.convert)"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out} is a file; give a folder")
    _positive_int(workers, "--workers")
    _positive_int(chunk_files, "--chunk-files")
    size_limit, _ = _validate_options(resize, quality, shard_size, compression, DEFAULT_HASHES)
    _check_writable(out, "--out")

    found = spec.read(Path(src), splits, labels)
    source = os.path.realpath(found.root)
    if not spec.arrays:  # an output inside the image tree would be listed as images on a rerun
        _check_location(out, "--out", source)
    options = {
        "labels": labels,
        "image_format": image_format,
        "quality": quality,
        "resize": resize,
        "shard_size": size_limit,
        "compression": compression,
        "chunk_files": chunk_files,
    }
    record = {"format": _FORMAT, "dataset": name, "source": source, "options": options}
    out_path = Path(out)
    existing = _claim(out_path, record, spec.splits, overwrite)
    done = dict(existing.get("splits", {})) if existing else {}
    if existing and all(s in done for s in splits):
        if progress:
            print(f"{name} already prepared in {out} (same source and options): kept; --overwrite to redo it")
        return existing
    write_bytes(str(out_path / RECORD_NAME), json.dumps(record, indent=2).encode())
    if progress:
        for note in found.notes:
            print(note, file=sys.stderr)
    for split in splits:
        manifest = write_listing(
            found.listings[split],
            str(out_path / split),
            source=source,
            source_options={"dataset": name, "split": split, **({"labels": labels} if labels else {})},
            workers=workers,
            resize=resize,
            quality=quality,
            image_format=image_format if found.arrays else None,
            shard_size=shard_size,
            compression=compression,
            chunk_files=chunk_files,
            skip_bad=skip_bad,
            progress=progress,
            desc=f"{name} {split}",
        )
        done[split] = {
            "samples": manifest["samples"],
            "labelled": manifest["labelled"],
            "class_counts": manifest["class_counts"],
            "num_skipped": manifest["num_skipped"],
        }
    result = {
        "format": _FORMAT,
        "dataset": name,
        "source": source,
        "classes": found.classes,
        "class_names": found.class_names,
        "num_classes": len(found.classes),
        "image_size": found.image_size if resize is None or found.image_size is None else resize,
        "splits": {s: done[s] for s in spec.splits if s in done},
        "options": options,
        "notes": found.notes,
    }
    write_bytes(str(out_path / MANIFEST_NAME), json.dumps(result, indent=2).encode())
    return result


# ---------------------------------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block: the usage is one --help away
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    names = "\n".join(f"  {n:14s} {s.summary} -> splits {', '.join(s.splits)}" for n, s in DATASETS.items())
    parser = _Parser(
        prog=PROG,
        description="Prepare a data set from the files it is distributed in, as MDS shards for StreamingImageDataset "
        "(OUT/<split>/ and OUT/manifest.json).\n\ndata sets:\n" + names,
        epilog=__doc__[__doc__.index("Output:") :].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", choices=list(DATASETS), help="the data set: " + ", ".join(DATASETS))
    parser.add_argument("--src", required=True, help="the downloaded, unpacked files (folder; a MedMNIST .npz)")
    parser.add_argument("--out", required=True, help="output folder: OUT/<split>/ and OUT/manifest.json")
    parser.add_argument("--splits", default=None, help="comma-separated splits to prepare (default: all)")
    parser.add_argument("--labels", default=None, help="cifar100: fine (default, 100 classes) or coarse (20)")
    parser.add_argument(
        "--format", dest="image_format", metavar="FORMAT", default=None, help="pixel arrays: png (default) or jpeg"
    )
    parser.add_argument("--quality", type=int, default=None, help="JPEG quality 1-95 (default 90)")
    parser.add_argument("--resize", type=int, default=None, help="scale the shorter side to this many pixels")
    parser.add_argument("--workers", type=int, default=1, help="processes that encode images (default 1)")
    parser.add_argument("--shard-size", default="64mb", help="shard size limit (default 64mb)")
    parser.add_argument("--compression", default=None, help="shard compression, e.g. zstd (default none)")
    parser.add_argument("--chunk-files", type=int, default=10000, help="images per resumable chunk (default 10000)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable image files, listing them")
    parser.add_argument("--overwrite", action="store_true", help="delete this command's earlier output there first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 done, 1 unreadable image or write error, 2 bad input,
    130 interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    splits = None if args.splits is None else [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        manifest = prepare_dataset(
            args.name,
            args.src,
            args.out,
            splits=splits,
            labels=args.labels,
            image_format=args.image_format,
            quality=args.quality,
            resize=args.resize,
            workers=args.workers,
            shard_size=args.shard_size,
            compression=args.compression,
            chunk_files=args.chunk_files,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ConversionError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except (BadImageError, RemoteDataError, OSError) as error:
        message = _os_error_text(error) if isinstance(error, OSError) else str(error)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        message = f"interrupted; finished chunks are kept in {args.out}: run the same command again to resume"
        print(f"{PROG}: {message}", file=sys.stderr)
        return 130
    for split, info in manifest["splits"].items():
        what = f"{manifest['num_classes']} classes" if info["labelled"] else "no labels"
        print(f"{split}: {info['samples']} images, {what} -> {os.path.join(args.out, split)}")
    size = f"{manifest['image_size']} px" if manifest["image_size"] else "sizes as in the source"
    print(f"{manifest['dataset']}: {size}; manifest: {os.path.join(args.out, MANIFEST_NAME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
