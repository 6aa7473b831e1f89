"""Frozen features of a loaded encoder: pooling, extraction on one or several ranks, and an on-disk cache.

* :func:`encode` runs a timm ViT on whole images (nothing masked) and pools the tokens after its final norm: the
  CLS token (``'cls'``, the papers' feature; the same numbers as ``ComposerMAE.extract_features``) or the mean of
  the patch tokens (``'mean'``). A CNN encoder (a SimCLR / VICReg ResNet) gives its pooled output (``'mean'``, the
  same numbers as the two-view models' ``extract_features``); it has no CLS token.
* :func:`extract_features` encodes a loader's ``(images, labels, indices)`` batches. On several ranks each encodes
  its share, the shares are gathered, and samples are deduplicated and sorted by index: the result is the same on
  one rank or N (a distributed sampler's padding repeats samples; they appear once). With several poolings
  (:func:`extract_pooled_features`) one forward pass per batch serves them all.
* :func:`cached_features` keeps those features on disk, keyed by the encoder's hash, the pooling, the precision
  and the caller's description of the data; the key is stored in the file and compared when reading, so a
  mismatched or damaged file is recomputed, never trusted. :class:`FeatureOptions` owns the recipe's
  ``features:`` section.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm import tqdm

from magma_composer.evaluate.encoders import LoadedEncoder
from magma_composer.options import OptionError, check_choice
from magma_composer.precision import autocast_context, default_precision

__all__ = [
    "CACHE_FORMAT",
    "POOLS",
    "PRECISIONS",
    "FeatureOptions",
    "cache_key",
    "cached_features",
    "cached_pooled_features",
    "default_cache_dir",
    "encode",
    "encode_pools",
    "extract_features",
    "extract_pooled_features",
]

log = logging.getLogger(__name__)

#: Feature pooling: the CLS token, or the mean of the patch tokens.
POOLS = ("cls", "mean")
#: Precisions of the encoder's forward (``None``: :func:`magma_composer.precision.default_precision`, ``amp_bf16``
#: on a GPU and on a CPU with native bf16, else ``fp32``).
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")
#: The ``format`` entry of every cache file's key.
CACHE_FORMAT = "magma_composer.features/1"

_GATHER_ROWS = 65536  # rows per all-gather: bounds the accelerator memory a gather takes


def encode(
    vit: nn.Module,
    images: torch.Tensor,
    pool: str = "cls",
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``B x D`` features of whole images: the ViT's tokens after its final norm, pooled; a CNN's pooled output.

    Args:
        vit (nn.Module): a timm ViT with one CLS token, or a timm CNN without classifier (``num_classes=0``, whose
            forward is the pooled output).
        images (torch.Tensor): ``B x C x H x W`` data-set images (on the encoder's device).
        pool (str): ``'cls'``: the CLS token; ``'mean'``: the mean of the patch tokens (prefix tokens excluded), for
            a CNN its global average pooled output.
        prepare (Callable, optional): applied to ``images`` first (a PCA basis's standardisation).

    Raises:
        ValueError: the images' shape is not the one the encoder takes.
        OptionError: ``pool='cls'`` for a CNN.
    """
    return encode_pools(vit, images, (pool,), prepare)[pool]


def encode_pools(
    vit: nn.Module,
    images: torch.Tensor,
    pools: Sequence[str],
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`encode` for several poolings from one forward pass: ``{pool: B x D}``."""
    pools = _check_pools(pools)
    if not isinstance(vit, VisionTransformer):
        if "cls" in pools:
            raise OptionError(
                "pool",
                f"'cls' needs a ViT's CLS token; this encoder ({type(vit).__name__}) has none: set pool: mean (its "
                "global average pooled output)",
            )
        conv = next((m for m in vit.modules() if isinstance(m, nn.Conv2d)), None)
        channels = conv.in_channels if conv is not None else images.shape[1]
        if images.dim() != 4 or images.shape[1] != channels:
            raise ValueError(f"the encoder takes B x {channels} x H x W images, got {tuple(images.shape)}")
        return {"mean": vit(images if prepare is None else prepare(images))}
    expected = (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(expected):
        raise ValueError(
            f"the encoder takes B x {expected[0]} x {expected[1]} x {expected[2]} images, got "
            f"{tuple(images.shape)}: set the data's image_size to {expected[1]} (and its channels to {expected[0]})"
        )
    x = images if prepare is None else prepare(images)
    tokens = vit.forward_features(x)
    pooled = {"cls": lambda: tokens[:, 0], "mean": lambda: tokens[:, vit.num_prefix_tokens :].mean(dim=1)}
    return {pool: pooled[pool]() for pool in pools}


def _check_pools(pools: Sequence[str]) -> tuple[str, ...]:
    if isinstance(pools, str) or not pools:
        raise OptionError("pools", f"expected a non-empty list of poolings from {', '.join(POOLS)}, got {pools!r}")
    for pool in pools:
        check_choice("pool", pool, POOLS)
    if len(set(pools)) < len(pools):
        raise OptionError("pools", f"names a pooling twice: {list(pools)!r}")
    return tuple(pools)


def _resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision is None:
        return default_precision(device.type)
    return check_choice("precision", precision, PRECISIONS)


def _batch_parts(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        images, labels, indices = batch
        return images, torch.as_tensor(labels).long(), torch.as_tensor(indices).long()
    found = f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
    raise ValueError(
        f"feature extraction needs batches of (images, labels, indices), got {found}: build the loader with "
        "return_index=True (StreamingImageDataset / build_image_dataloader)"
    )


def _gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All ranks' rows (a 1-D or 2-D tensor each, maybe of different lengths), concatenated in rank order, on CPU."""
    from composer.utils import dist

    width = local.shape[1] if local.dim() == 2 else 0
    sizes = torch.tensor([local.shape[0], width], device=device)
    all_sizes = [s.cpu() for s in dist.all_gather(sizes)]
    counts = [int(s[0]) for s in all_sizes]
    width = max(int(s[1]) for s in all_sizes)
    shape = (width,) if local.dim() == 2 else ()
    parts: list[list[torch.Tensor]] = [[] for _ in counts]
    for start in range(0, max(counts), _GATHER_ROWS):
        rows = min(_GATHER_ROWS, max(counts) - start)
        chunk = torch.zeros((rows, *shape), dtype=local.dtype, device=device)
        mine = local[start : start + rows]
        if len(mine):
            chunk[: len(mine)] = mine.to(device)
        for rank, got in enumerate(dist.all_gather(chunk)):
            keep = max(0, min(rows, counts[rank] - start))
            parts[rank].append(got[:keep].cpu())
    return torch.cat([torch.cat(p) for p in parts])


def extract_features(
    encoder: LoadedEncoder,
    loader: Iterable,
    pool: str = "cls",
    device: torch.device | str = "cpu",
    precision: str | None = None,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample a loader yields, identical on one rank or several.

    Args:
        encoder (LoadedEncoder): the encoder (its ``prepare`` is applied to the images).
        loader (Iterable): yields ``(images, labels, indices)`` (a data set with ``return_index=True``); on several
            ranks each rank's loader yields its share (a distributed sampler).
        pool (str): ``'cls'`` or ``'mean'`` (see :func:`encode`).
        device (torch.device | str): where the encoder runs; it is moved back to where it was afterwards.
        precision (str, optional): ``'fp32'``, ``'amp_bf16'`` or ``'amp_fp16'`` (autocast; features are returned
            in float32). Default: ``amp_bf16`` on a GPU and on a CPU with native bf16, else ``fp32``.
        progress (bool): a progress bar (rank 0).
        desc (str): the progress bar's label.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``N x D`` float32 features and ``N`` int64 labels on the CPU, one row per
        distinct sample index, sorted by index.

    Raises:
        ValueError: batches without indices, images of the wrong shape, no sample at all, or one index with two
            different labels (the indices do not identify samples).
    """
    return extract_pooled_features(encoder, loader, (pool,), device, precision, progress, desc)[pool]


@torch.no_grad()
def extract_pooled_features(
    encoder: LoadedEncoder,
    loader: Iterable,
    pools: Sequence[str],
    device: torch.device | str = "cpu",
    precision: str | None = None,
    progress: bool = False,
    desc: str = "features",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`extract_features` for several poolings from one pass over the loader: ``{pool: (features, labels)}``,
    each exactly what :func:`extract_features` gives for that pooling (one forward pass per batch serves all)."""
    from composer.utils import dist

    pools = _check_pools(pools)
    device = torch.device(device)
    precision = _resolve_precision(precision, device)
    vit = encoder.vit
    home, was_training = next(vit.parameters()).device, vit.training
    vit.to(device).eval()
    feats: dict[str, list[torch.Tensor]] = {pool: [] for pool in pools}
    labels, indices = [], []
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress or dist.get_global_rank() != 0, leave=False):
            images, y, index = _batch_parts(batch)
            with autocast_context(precision, device.type):
                out = encode_pools(vit, images.to(device, non_blocking=True), pools, encoder.prepare)
            for pool in pools:
                feats[pool].append(out[pool].float().cpu())
            labels.append(y.cpu())
            indices.append(index.cpu())
    finally:
        vit.to(home).train(was_training)
    width = {pool: f[0].shape[1] if f else 0 for pool, f in feats.items()}
    f = {pool: torch.cat(x) if x else torch.zeros(0, width[pool]) for pool, x in feats.items()}
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    if dist.get_world_size() > 1:
        # gloo gathers CPU tensors; NCCL needs them on the rank's GPU
        where = device if device.type == "cuda" else torch.device("cpu")
        y, index = (_gather_rows(t, where) for t in (y, index))
        f = {pool: _gather_rows(x, where) for pool, x in f.items()}
    if len(index) == 0:
        raise ValueError(f"{desc}: the loader yielded no samples: cannot extract features")
    order = torch.argsort(index, stable=True)
    index, y = index[order], y[order]
    first = torch.ones(len(index), dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    # a repeated index (a sampler's padding) must be the same sample: check its label
    run = torch.cumsum(first.long(), 0) - 1
    if not torch.equal(y, y[first][run]):
        bad = int(index[(y != y[first][run]).nonzero()[0, 0]])
        raise ValueError(f"{desc}: sample index {bad} came with two different labels; indices must identify samples")
    y = y[first].contiguous()
    return {pool: (x[order][first].contiguous(), y) for pool, x in f.items()}


# ---------------------------------------------------------------------------------------------------- the cache
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/magma_composer/features`` (``~/.cache/magma_composer/features`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "magma_composer" / "features"


def cache_key(encoder: LoadedEncoder, pool: str, precision: str, data: dict[str, Any]) -> dict[str, Any]:
    """What a cached feature file must match: the encoder's hash (and its basis'), pooling, precision and data.

    Raises:
        TypeError: ``data`` does not serialise to JSON.
    """
    key = {
        "format": CACHE_FORMAT,
        "encoder_sha256": encoder.sha256,
        "basis_sha256": encoder.basis_sha256,
        "pool": pool,
        "precision": precision,
        "data": data,
    }
    try:  # canonical form: the same description always names the same file
        return json.loads(json.dumps(key, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the data key of a feature cache must be JSON values, got {data!r} ({exc})") from None


def _cache_file(folder: Path, key: dict[str, Any]) -> Path:
    return folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40] + ".pt")


def _read_cache(path: Path, key: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached features if ``path`` holds exactly ``key``'s, else ``None`` (a damaged file is logged)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        log.warning("feature cache %s is unreadable (%s: %s); recomputing it", path, type(exc).__name__, exc)
        return None
    f = payload.get("features") if isinstance(payload, dict) else None
    y = payload.get("labels") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or payload.get("key") != key:
        log.warning("feature cache %s holds another key than this encoder's and data's; recomputing it", path)
        return None
    valid = (
        isinstance(f, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and f.dim() == 2
        and f.dtype == torch.float32
        and y.dim() == 1
        and y.dtype == torch.int64
        and len(f) == len(y) > 0
    )
    if not valid:
        log.warning("feature cache %s does not hold N x D float32 features and N int64 labels; recomputing it", path)
        return None
    return f, y


def cached_features(
    encoder: LoadedEncoder,
    loader: Iterable,
    data: dict[str, Any],
    pool: str = "cls",
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    precision: str | None = None,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features`, read from or written to the feature cache.

    Every rank reads the file; if any rank cannot use it, all ranks extract, and rank 0 writes the file atomically
    (:func:`~magma_composer.checkpoints.write_atomic`). A file that cannot be written is a warning, not a failure:
    the features are still returned.

    Args:
        encoder (LoadedEncoder): the encoder; its ``sha256`` (and ``basis_sha256``) identify it.
        loader (Iterable): see :func:`extract_features`.
        data (dict): JSON values describing the data exactly (remote, split, image size, normalisation, resize
            ratio, sample limit...): features of other data must have another description.
        pool (str): see :func:`extract_features`.
        cache_dir (str | PathLike, optional): the cache folder. Default: :func:`default_cache_dir`.
        device, precision, progress, desc: see :func:`extract_features`.
    """
    return cached_pooled_features(encoder, loader, data, (pool,), cache_dir, device, precision, progress, desc)[pool]


def cached_pooled_features(
    encoder: LoadedEncoder,
    loader: Iterable,
    data: dict[str, Any],
    pools: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    precision: str | None = None,
    progress: bool = False,
    desc: str = "features",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`cached_features` for several poolings: one file per pooling (the same file :func:`cached_features`
    reads), and the poolings not in the cache extracted together in one pass (:func:`extract_pooled_features`)."""
    from composer.utils import dist

    from magma_composer.checkpoints import write_atomic

    pools = _check_pools(pools)
    resolved = _resolve_precision(precision, torch.device(device))
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    keys = {pool: cache_key(encoder, pool, resolved, data) for pool in pools}
    paths = {pool: _cache_file(folder, key) for pool, key in keys.items()}
    hits = {pool: _read_cache(paths[pool], keys[pool]) for pool in pools}
    usable = [int(hits[pool] is not None) for pool in pools]
    if dist.get_world_size() > 1:  # every rank must extract the same poolings
        flag = torch.tensor(usable, device="cuda" if torch.device(device).type == "cuda" else "cpu")
        dist.all_reduce(flag, reduce_operation="MIN")
        usable = flag.tolist()
    missing = [pool for pool, ok in zip(pools, usable) if not ok]
    for pool in pools:
        if pool not in missing:
            log.info("%s: %s features read from the cache %s", desc, pool, paths[pool])
    out = {pool: hits[pool] for pool in pools if pool not in missing}
    if missing:
        fresh = extract_pooled_features(encoder, loader, missing, device, resolved, progress, desc)
        for pool, (features, labels) in fresh.items():
            out[pool] = (features, labels)
            if dist.get_global_rank() != 0:
                continue
            payload = {"key": keys[pool], "features": features, "labels": labels}
            try:
                write_atomic(paths[pool], lambda f, payload=payload: torch.save(payload, f))
            except OSError as exc:
                log.warning("%s: the feature cache %s could not be written (%s); continuing without it", desc,
                            paths[pool], exc)  # fmt: skip
        dist.barrier()
    return {pool: out[pool] for pool in pools}  # type: ignore[misc]


class FeatureOptions:
    """How frozen features are computed (the recipe's ``features:`` section).

    Args:
        pool (str): ``'cls'`` (the CLS token after the final norm, the papers' default) or ``'mean'`` (the mean of
            the patch tokens; a CNN encoder's pooled output: a CNN needs ``'mean'``).
        cache (bool): keep features on disk (keyed by the encoder's hash and the data) and reuse them.
        cache_dir (str, optional): the cache folder; default ``$XDG_CACHE_HOME/magma_composer/features``.
        precision (str, optional): ``'fp32'``, ``'amp_bf16'`` or ``'amp_fp16'``; default ``amp_bf16`` on a GPU and
            on a CPU with native bf16, else ``fp32`` (injected from the run's ``precision``).
    """

    def __init__(
        self, pool: str = "cls", cache: bool = True, cache_dir: str | None = None, precision: str | None = None
    ) -> None:
        check_choice("pool", pool, POOLS)
        if not isinstance(cache, bool):
            raise OptionError("cache", f"expected true or false, got {cache!r}")
        if cache_dir is not None:
            if not cache:
                raise OptionError("cache_dir", "has no effect with cache: false; drop cache_dir or set cache: true")
            from magma_composer.checkpoints import CheckpointError, check_output_folder

            try:
                check_output_folder(cache_dir, "cache_dir")
            except CheckpointError as exc:
                raise OptionError("cache_dir", str(exc).removeprefix("cache_dir: ")) from None
        if precision is not None:
            check_choice("precision", precision, PRECISIONS)
        self.pool = pool
        self.cache = cache
        self.cache_dir = cache_dir
        self.precision = precision

    def __repr__(self) -> str:
        return (
            f"FeatureOptions(pool={self.pool!r}, cache={self.cache}, cache_dir={self.cache_dir!r}, "
            f"precision={self.precision!r})"
        )

    def features(
        self,
        encoder: LoadedEncoder,
        loader: Iterable,
        data_key: dict[str, Any],
        device: torch.device | str = "cpu",
        progress: bool = False,
        desc: str = "features",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of ``loader`` (see :func:`extract_features`), through the cache if enabled.

        Args:
            data_key (dict): JSON values that describe the data (see :func:`cached_features`).
        """
        if not self.cache:
            return extract_features(encoder, loader, self.pool, device, self.precision, progress, desc)
        return cached_features(
            encoder, loader, data_key, self.pool, self.cache_dir, device, self.precision, progress, desc
        )
