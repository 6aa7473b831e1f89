"""Loading an encoder to evaluate: from our Composer checkpoints, exported timm state dicts and official MAE files.

:func:`load_encoder` (the owner of an evaluation recipe's ``encoder:`` section) reads one file and returns a
:class:`LoadedEncoder`: a timm ``VisionTransformer`` without head (or, for a SimCLR / VICReg run on a CNN, the timm
CNN without classifier), in eval mode on the CPU, with the file's hash and how its inputs must be prepared. Three
layouts are read:

* ``composer``: a checkpoint our training wrote (``torch.load(f)['state']['model']``, keys ``net.encoder.*`` for
  the MAE, ``encoder.*`` for SimCLR / VICReg, possibly below a ``module.`` prefix). Its ``_extra_state`` records the
  encoder's architecture (checkpoints written before that are still read; their ``num_heads`` comes from the rules
  below), and a PCA-masking run's algorithm state names the basis the encoder was trained on.
* ``timm``: a plain ``{name: tensor}`` state dict, as ``magma_composer.checkpoints.export_encoder`` writes it (with
  its architecture in ``<file>.json``), or timm's own weights (e.g. ``vit_base_patch16_224.mae``) saved locally as
  ``model.safetensors`` or ``pytorch_model.bin``.
* ``mae``: facebookresearch/mae's ``mae_pretrain_vit_*.pth``, ``{'model': state}``; its decoder (``decoder_*``,
  ``mask_token``) and a fine-tuned file's classifier (``head.*``) are dropped.

A CNN encoder (``ComposerSimCLR('resnet50')``...) is rebuilt from its record alone, ``{'timm_model', 'in_chans',
'img_size', 'cifar_stem'}`` (:func:`~magma_composer.models.two_view.backbone_architecture`), found in the checkpoint's
extra state or the exported file's ``<file>.json``: a CNN state dict without a record cannot be read. Its features
are the pooled output (``pool: mean``).

A ViT's architecture comes from the tensors' shapes (width, depth, patch size, channels, image size from the
position embedding's length, MLP ratio, qkv bias). The number of attention heads, which no shape shows, comes from
the file's record if it has one, else from ``num_heads``, else from the standard timm widths (192: 3, 384: 6,
768: 12, 1024: 16, 1280: 16). Files that cannot be used raise :class:`EncoderError` naming the file and what was found.

Composer checkpoints hold pickled Python objects: a file that ``torch.load(..., weights_only=True)`` refuses is read
with full unpickling, as Composer itself reads checkpoints, so load only files you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from magma_composer.checkpoints import (
    ENCODER_SIDECAR_FORMAT,
    ENCODER_SIDECAR_SUFFIX,
    CheckpointError,
    file_sha256,
    recorded_sha256,
)
from magma_composer.options import OptionError, check_choice, check_int

__all__ = [
    "ARCH_KEYS",
    "CNN_ARCH_KEYS",
    "FORMATS",
    "KINDS",
    "STANDARD_NUM_HEADS",
    "BasisStandardization",
    "EncoderError",
    "LoadedEncoder",
    "infer_architecture",
    "load_encoder",
    "map_encoder_keys",
]

#: The values ``load_encoder(format=...)`` accepts.
FORMATS = ("auto", "composer", "timm", "mae")
#: The entries of :attr:`LoadedEncoder.arch` (as :func:`~magma_composer.models.mae.encoder_architecture` gives).
ARCH_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans", "mlp_ratio", "qkv_bias")
#: Attention heads of timm's standard ViT widths (Tiny, Small, Base, Large, Huge).
STANDARD_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

_PATCH_WEIGHT = "patch_embed.proj.weight"
_REQUIRED = ("cls_token", "pos_embed", _PATCH_WEIGHT, "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


#: The entries of :attr:`LoadedEncoder.arch` for a CNN (as :func:`~magma_composer.models.two_view.backbone_architecture`
#: records them).
CNN_ARCH_KEYS = ("timm_model", "in_chans", "img_size", "cifar_stem")
#: :attr:`LoadedEncoder.kind`: a timm ViT, or another timm model (a CNN) whose feature is its pooled output.
KINDS = ("vit", "cnn")


class EncoderError(ValueError):
    """A file that is not a usable encoder; the message names the file and what was found in it."""


@dataclass
class LoadedEncoder:
    """An encoder ready for evaluation.

    Attributes:
        net (nn.Module): the encoder, in eval mode, on the CPU: a timm ViT (``num_classes=0``) for ``kind`` ``'vit'``,
            a timm CNN without classifier (``num_classes=0``: its forward gives the pooled output) for ``'cnn'``.
        source (str): the file it was read from.
        format (str): the file's layout: ``'composer'``, ``'timm'`` or ``'mae'``.
        sha256 (str): the file's sha256; for ``weights='random'`` a hash of the architecture and the seed.
        arch (dict): :data:`ARCH_KEYS` -> value for a ViT, :data:`CNN_ARCH_KEYS` -> value for a CNN.
        prepare (Callable, optional): applied to data-set images before the ViT (a PCA basis's per-pixel
            standardisation), or ``None``.
        normalize (str): the data normalisation the encoder expects: ``'none'`` (raw [0, 1] pixels, when
            ``prepare`` standardises them) or ``'imagenet'``.
        weights (str): ``'checkpoint'`` or ``'random'``.
        basis_sha256 (str, optional): the content hash of the PCA basis behind ``prepare``, if any (features
            depend on it as much as on the weights).
        kind (str): ``'vit'`` or ``'cnn'`` (:data:`KINDS`).
    """

    net: nn.Module
    source: str
    format: str
    sha256: str
    arch: dict[str, Any]
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
    normalize: str = "imagenet"
    weights: str = "checkpoint"
    basis_sha256: str | None = field(default=None)
    kind: str = "vit"

    @property
    def vit(self) -> nn.Module:
        """The encoder (:attr:`net`; the name is older than CNN encoders: for ``kind`` ``'cnn'`` it is the CNN)."""
        return self.net


class BasisStandardization:
    """A PCA basis's per-pixel standardisation ``z = (x - mean) / std`` of ``B x C x S x S`` images in [0, 1].

    The same arithmetic as :meth:`~magma_composer.algorithms.pca_masking.PCAMasking.standardize` (float32, outside
    autocast), so an encoder trained with PCA masking sees what it saw in training.

    Args:
        mean (torch.Tensor): ``D`` per-pixel means.
        std (torch.Tensor): ``D`` per-pixel standard deviations.
        shape (tuple[int, int, int]): the image shape ``(C, S, S)`` the basis was fitted on.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, shape: tuple[int, int, int]) -> None:
        self.shape = tuple(shape)
        self._cpu = (mean.to(torch.float32), 1.0 / std.to(torch.float32))
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.shape:
            c, s, _ = self.shape
            raise ValueError(
                f"the PCA basis standardises B x {c} x {s} x {s} images, got {tuple(images.shape)}: set the data's "
                f"image_size to {s}"
            )
        if images.device not in self._on:
            self._on[images.device] = tuple(t.to(images.device) for t in self._cpu)  # type: ignore[assignment]
        mean, inv_std = self._on[images.device]
        with torch.autocast(device_type=images.device.type, enabled=False):
            z = (images.reshape(images.shape[0], -1).float() - mean) * inv_std
        return z.reshape(images.shape)


# ---------------------------------------------------------------------------------------------------- reading
def _read_file(path: Path, shown: str) -> Any:
    """The file's content: a safetensors dict, or what ``torch.load`` returns (tensors on the CPU)."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise EncoderError(f"{shown} is not a readable safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a Composer checkpoint pickles more than tensors (its timestamps, RNG states...); or garbage
    except Exception as exc:  # torch raises several types for a file that is not its format
        raise EncoderError(
            f"{shown} is not a torch or safetensors file ({path.stat().st_size} bytes; {type(exc).__name__}: "
            f"{str(exc)[:200]})"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise EncoderError(
            f"{shown} is not a torch or safetensors file ({path.stat().st_size} bytes; {type(exc).__name__}: "
            f"{str(exc)[:200]})"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)
        more = f", ... ({len(keys)} keys)" if len(keys) > 8 else ""
        return "a dict with keys " + ", ".join(repr(k) for k in keys[:8]) + more
    return f"a {type(obj).__name__}"


def _unpack(obj: Any, fmt: str, shown: str) -> tuple[str, dict[str, Any], Any]:
    """``(format, state dict, the composer checkpoint's state or None)`` of a file's content."""
    composer = (
        isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj["state"].get("model"), dict)
    )
    mae = isinstance(obj, dict) and isinstance(obj.get("model"), dict)
    detected = "composer" if composer else "mae" if mae else "timm" if _is_state_dict(obj) else None
    if fmt == "auto":
        if detected is None:
            raise EncoderError(
                f"{shown} is not an encoder checkpoint: it holds {_describe(obj)}; expected a Composer checkpoint "
                "(state.model), a timm state dict ({name: tensor}) or an MAE checkpoint ({'model': state})"
            )
        fmt = detected
    if fmt == "composer":
        if not composer:
            raise EncoderError(f"{shown} is not a Composer checkpoint (no state.model): it holds {_describe(obj)}")
        return fmt, obj["state"]["model"], obj["state"]
    if fmt == "mae":
        if not mae:
            raise EncoderError(f"{shown} is not an MAE checkpoint (no 'model' entry): it holds {_describe(obj)}")
        return fmt, obj["model"], None
    if not _is_state_dict(obj):
        raise EncoderError(f"{shown} is not a timm state dict ({{name: tensor}}): it holds {_describe(obj)}")
    return fmt, obj, None


def map_encoder_keys(state: dict[str, Any], shown: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The timm ViT keys of an encoder inside any of the layouts, as a ``{timm name: tensor}`` dict.

    The encoder is found by its ``patch_embed.proj.weight``: whatever precedes it (``module.net.encoder.``,
    ``net.encoder.``, ``encoder.`` or nothing) is stripped, keys outside that prefix are dropped, and so are an
    MAE decoder (``decoder_*``, ``mask_token``) and a classifier head (``head.*``; ``fc_norm.*`` beside a final
    ``norm``).

    Raises:
        EncoderError: no encoder in ``state``, several, or a fine-tuned file whose final norm was replaced by
            global pooling's ``fc_norm``.
    """
    prefixes = sorted({k[: -len(_PATCH_WEIGHT)] for k in state if isinstance(k, str) and k.endswith(_PATCH_WEIGHT)})
    if not prefixes:
        keys = [k for k in state if not str(k).endswith("_extra_state")]
        sample = ", ".join(repr(k) for k in keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
        raise EncoderError(
            f"{shown} holds no ViT encoder: no {_PATCH_WEIGHT!r} among its keys ({sample or 'none'}); expected the "
            "keys of a timm VisionTransformer (cls_token, pos_embed, patch_embed.*, blocks.N.*, norm.*) — is it "
            "another model? A CNN encoder (a ResNet) is read from our SimCLR / VICReg checkpoints or from an export "
            "with its <file>.json record, which name its timm model"
        )
    if len(prefixes) > 1:
        preferred = [p for p in prefixes if p.removeprefix("module.") == "net.encoder."]
        if len(preferred) != 1:
            raise EncoderError(f"{shown} holds several ViT encoders (key prefixes {prefixes}); cannot tell which")
        prefixes = preferred
    prefix = prefixes[0]
    out = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    dropped = ("decoder_", "mask_token", "head.", "_extra_state")
    out = {k: v for k, v in out.items() if not k.startswith(dropped)}
    if any(k.startswith("fc_norm.") for k in out):
        if "norm.weight" not in out:
            raise EncoderError(
                f"{shown} is a fine-tuned classifier with global pooling: its final norm was replaced by fc_norm "
                "(applied to the mean of the patch tokens), so it has no per-token features; evaluate the "
                "pre-training checkpoint instead"
            )
        out = {k: v for k, v in out.items() if not k.startswith("fc_norm.")}
    return out


def infer_architecture(
    state: dict[str, torch.Tensor],
    shown: str = "the checkpoint",
    record: dict[str, Any] | None = None,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """The :data:`ARCH_KEYS` of a timm ViT state dict, from its shapes, a recorded architecture and ``num_heads``.

    Args:
        state (dict): ``{timm name: tensor}`` (see :func:`map_encoder_keys`).
        shown (str): the file, for messages.
        record (dict, optional): the architecture the file recorded; it must agree with the shapes.
        num_heads (int, optional): the attention heads; must agree with ``record`` if both are given.

    Raises:
        EncoderError: the shapes do not form a ViT with a CLS token, disagree with the record, or ``num_heads`` is
            unknown.
    """
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise EncoderError(f"{shown}: the encoder's tensors do not form a ViT: missing {', '.join(missing)}")
    if "reg_token" in state:
        raise EncoderError(f"{shown}: ViTs with register tokens (reg_token) are not supported (one CLS token only)")
    proj = state[_PATCH_WEIGHT]
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise EncoderError(f"{shown}: {_PATCH_WEIGHT} has shape {tuple(proj.shape)}, not D x C x p x p")
    dim, chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    cls, pos = state["cls_token"], state["pos_embed"]
    if tuple(cls.shape) != (1, 1, dim):
        raise EncoderError(f"{shown}: cls_token has shape {tuple(cls.shape)}, expected (1, 1, {dim})")
    grid = round((pos.shape[1] - 1) ** 0.5) if pos.dim() == 3 and pos.shape[1] > 1 else 0
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != dim or grid * grid != pos.shape[1] - 1:
        raise EncoderError(
            f"{shown}: pos_embed has shape {tuple(pos.shape)}; expected (1, 1 + g * g, {dim}) for a square grid of "
            "patches and the CLS token"
        )
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise EncoderError(f"{shown}: the encoder's blocks are not numbered 0..N-1 (found {blocks})")
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    arch: dict[str, Any] = {
        "embed_dim": dim,
        "depth": len(blocks),
        "num_heads": None,
        "patch_size": patch,
        "img_size": grid * patch,
        "in_chans": chans,
        "mlp_ratio": hidden / dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
    }
    if record is not None:
        differ = [
            f"{k} {record.get(k)!r} (shapes: {v!r})" for k, v in arch.items() if k != "num_heads" and record.get(k) != v
        ]
        if differ or not isinstance(record.get("num_heads"), int):
            raise EncoderError(
                f"{shown}: its recorded architecture does not describe its tensors: "
                f"{', '.join(differ) or 'no num_heads'}"
            )
        if num_heads is not None and num_heads != record["num_heads"]:
            raise EncoderError(
                f"{shown}: num_heads {num_heads} contradicts the file's record ({record['num_heads']} heads); "
                "drop num_heads"
            )
        arch["num_heads"] = record["num_heads"]
    elif num_heads is not None:
        arch["num_heads"] = num_heads
    elif dim in STANDARD_NUM_HEADS:
        arch["num_heads"] = STANDARD_NUM_HEADS[dim]
    else:
        raise EncoderError(
            f"{shown}: the number of attention heads is not recorded and embed_dim {dim} is not a standard timm "
            f"width ({', '.join(f'{d}: {h}' for d, h in STANDARD_NUM_HEADS.items())}): give num_heads"
        )
    if dim % arch["num_heads"]:
        raise EncoderError(f"{shown}: num_heads {arch['num_heads']} does not divide embed_dim {dim}")
    return arch


def _build_vit(arch: dict[str, Any]) -> VisionTransformer:
    return VisionTransformer(
        img_size=arch["img_size"],
        patch_size=arch["patch_size"],
        in_chans=arch["in_chans"],
        num_classes=0,
        global_pool="token",
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"],
        qkv_bias=arch["qkv_bias"],
    )


def _load_weights(net: nn.Module, state: dict[str, torch.Tensor], shown: str, what: str = "a timm ViT") -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise EncoderError(
            f"{shown}: its encoder does not match {what} of the inferred architecture: missing keys "
            f"{missing[:8] or 'none'}, unexpected keys {unexpected[:8] or 'none'}"
        )
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise EncoderError(f"{shown}: tensors of the wrong shape for {what}: {', '.join(wrong[:6])}")
    net.load_state_dict(state, strict=True)


def _random_vit(arch: dict[str, Any], seed: int, shown: str, method: str | None = None) -> VisionTransformer:
    """A fresh encoder initialised exactly as the model that trained it initialised its own:
    :class:`~magma_composer.models.ComposerMAE` by default, the two-view models' backbone for ``method`` ``'simclr'``
    or ``'vicreg'``."""
    from magma_composer.models.mae import MaskedAutoencoder
    from magma_composer.models.two_view import build_backbone

    sizes = {k: arch[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method in _TWO_VIEW_METHODS:
            try:
                vit, _ = build_backbone(sizes, arch["img_size"], arch["patch_size"], arch["in_chans"])
            except OptionError as exc:
                raise EncoderError(f"{shown}: no {method} initialisation for this architecture ({exc})") from None
            return vit
        try:  # the smallest valid decoder: only the encoder is kept
            mae = MaskedAutoencoder(
                encoder=sizes,
                img_size=arch["img_size"],
                patch_size=arch["patch_size"],
                in_chans=arch["in_chans"],
                decoder_dim=4,
                decoder_depth=1,
                decoder_heads=1,
            )
        except OptionError as exc:
            raise EncoderError(f"{shown}: no MAE initialisation for this architecture ({exc})") from None
    vit = mae.encoder
    vit.pos_embed.requires_grad_(True)  # as for a loaded encoder: the protocol decides what trains
    return vit


_TWO_VIEW_METHODS = ("simclr", "vicreg")


def _build_cnn(record: dict[str, Any], shown: str) -> nn.Module:
    """The timm CNN a record describes, freshly initialised (:func:`~magma_composer.models.two_view.build_backbone`)."""
    from magma_composer.models.two_view import build_backbone

    types_ = {"timm_model": str, "in_chans": int, "img_size": int, "cifar_stem": bool}
    # bool is an int to Python: an integer entry must not be a bool, cifar_stem must be one
    bad = [
        k for k, t in types_.items() if not isinstance(record.get(k), t) or (t is int and isinstance(record[k], bool))
    ]
    if bad:
        raise EncoderError(
            f"{shown}: its CNN record {record!r} is incomplete: {', '.join(bad)} missing or of the wrong type "
            f"(expected {', '.join(f'{k}: {t.__name__}' for k, t in types_.items())})"
        )
    try:
        net, _ = build_backbone(
            record["timm_model"], record["img_size"], None, record["in_chans"], record["cifar_stem"]
        )
    except OptionError as exc:
        raise EncoderError(f"{shown}: its recorded encoder {record!r} cannot be rebuilt: {exc}") from None
    return net


def _cnn_state(raw_state: dict[str, Any], fmt: str, shown: str) -> dict[str, torch.Tensor]:
    """The CNN encoder's tensors: below ``encoder.`` (or ``module.encoder.``) in a Composer checkpoint, the whole
    state dict of an exported file."""
    if fmt == "composer":
        prefix = "module.encoder." if any(str(k).startswith("module.encoder.") for k in raw_state) else "encoder."
        state = {k[len(prefix) :]: v for k, v in raw_state.items() if isinstance(k, str) and k.startswith(prefix)}
    else:
        state = {k: v for k, v in raw_state.items() if not str(k).endswith("_extra_state")}
    if not state:
        raise EncoderError(f"{shown}: its record names a CNN encoder, but it holds no 'encoder.*' tensors")
    return state


# ---------------------------------------------------------------------------------------------------- records
def _composer_record(state: dict[str, Any], checkpoint: dict[str, Any]) -> tuple[dict | None, dict | None, str | None]:
    """The architecture in the model's extra state, the PCA-masking basis reference and the training method
    (``'simclr'``, ``'vicreg'``; ``None`` for the MAE), if recorded."""
    record, method = None, None
    for key, value in state.items():
        if isinstance(key, str) and key.removeprefix("module.") == "_extra_state" and isinstance(value, dict):
            record, method = value.get("encoder"), value.get("method")
    basis = None
    algorithms = checkpoint.get("algorithms") or []
    for item in algorithms:
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict):
            if item[1].get("basis_sha256"):
                basis = item[1]
    return record, basis, method


def _sidecar_record(path: Path, shown: str, digest: str) -> dict | None:
    sidecar = Path(str(path) + ENCODER_SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{shown}: its architecture record {sidecar} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != ENCODER_SIDECAR_FORMAT:
        return None  # another tool's JSON that happens to sit there: not ours to interpret
    if data.get("sha256") != digest:
        raise EncoderError(
            f"{shown}: its architecture record {sidecar} was written for another file (sha256 "
            f"{str(data.get('sha256'))[:16]}..., this file {digest[:16]}...); remove the record or export again"
        )
    return data.get("architecture")


def _load_prepare(basis: str, arch: dict[str, Any]) -> tuple[BasisStandardization, str]:
    from magma_composer.pca.basis import load_basis

    try:
        loaded = load_basis(basis)
    except (OSError, ValueError) as exc:
        raise OptionError("basis", str(exc)) from None
    if (loaded.image_size, loaded.channels) != (arch["img_size"], arch["in_chans"]):
        raise OptionError(
            "basis",
            f"{basis} was fitted on {loaded.channels} x {loaded.image_size} x {loaded.image_size} images, but the "
            f"encoder takes {arch['in_chans']} x {arch['img_size']} x {arch['img_size']}",
        )
    shape = (loaded.channels, loaded.image_size, loaded.image_size)
    return BasisStandardization(loaded.mean, loaded.std, shape), loaded.sha256


def _sharded_message(path: Path, shown: str) -> str:
    if any(p.suffix == ".distcp" or p.name == ".metadata" for p in path.iterdir()):
        return (
            f"{shown} is a sharded (FSDP) checkpoint folder: not supported; save a full checkpoint (fsdp_config "
            "state_dict_type: full) or write the encoder with export_encoder, and give that file"
        )
    return f"{shown} is a folder, not a checkpoint file (a sharded checkpoint is not supported); give a file"


# ---------------------------------------------------------------------------------------------------- the owner
def load_encoder(
    path: str,
    format: str = "auto",
    num_heads: int | None = None,
    basis: str | None = None,
    weights: str = "checkpoint",
    seed: int = 0,
) -> LoadedEncoder:
    """Reads an encoder from a checkpoint file (the recipe's ``encoder:`` section): a ViT, or the CNN of a SimCLR /
    VICReg run.

    Args:
        path (str): the file: a Composer checkpoint of ours (MAE, SimCLR, VICReg), a timm state dict
            (``.pt``/``.pth``/``.bin`` or ``.safetensors``) or an MAE ``mae_pretrain_vit_*.pth``. Required with
            ``weights='random'`` too: the architecture of the random encoder is the file's, so the baseline matches
            the encoder it is compared with.
        format (str): ``'auto'`` (detected from the content), ``'composer'``, ``'timm'`` or ``'mae'``.
        num_heads (int, optional): attention heads, needed only when the file records none and its width is not a
            standard timm width; refused when it contradicts the file's record, and for a CNN.
        basis (str, optional): the PCA basis file of an encoder trained with PCA masking (PMAE): its per-pixel
            standardisation becomes ``prepare`` and the data must then be raw pixels (``normalize: none``). A
            Composer checkpoint of such a run requires it (and the same basis).
        weights (str): ``'checkpoint'``, or ``'random'``: the file's architecture freshly initialised as its model
            initialises it (the MAE's, or a SimCLR / VICReg backbone's: timm's), seeded by ``seed`` (the
            random-initialisation baseline).
        seed (int): the seed of ``weights='random'``.

    Returns:
        LoadedEncoder: the encoder (eval mode, CPU) and what evaluating it needs.

    Raises:
        OptionError: a bad option value (unknown format, num_heads < 1, a basis that does not fit).
        EncoderError: the file is missing, unreadable, not an encoder, or its encoder cannot be rebuilt.
    """
    if not isinstance(path, str) or not path:
        raise OptionError("path", f"expected the encoder's checkpoint file, got {path!r}")
    check_choice("format", format, FORMATS)
    if num_heads is not None:
        check_int("num_heads", num_heads, 1)
    check_choice("weights", weights, ("checkpoint", "random"))
    check_int("seed", seed, 0)
    if basis is not None and (not isinstance(basis, str) or not basis):
        raise OptionError("basis", f"expected a PCA basis file, got {basis!r}")

    file = Path(path)
    shown = path if os.path.realpath(path) == os.path.abspath(path) else f"{path} (-> {os.path.realpath(path)})"
    if file.is_dir():
        raise EncoderError(_sharded_message(file, shown))
    if not file.is_file():
        raise EncoderError(f"encoder checkpoint {shown} does not exist")
    digest = file_sha256(file)
    try:
        expected = recorded_sha256(file)
    except CheckpointError as exc:
        raise EncoderError(str(exc)) from None
    if expected is not None and expected != digest:  # our checkpoints and exports carry a .sha256
        raise EncoderError(
            f"{shown} is altered or truncated: its sha256 {digest[:16]}... differs from the one recorded when it was "
            f"written ({expected[:16]}..., in {file.resolve()}.sha256); use another checkpoint"
        )
    fmt, raw_state, checkpoint = _unpack(_read_file(file, shown), format, shown)
    if fmt == "composer":
        record, basis_record, method = _composer_record(raw_state, checkpoint)
    else:
        record, basis_record, method = _sidecar_record(file, shown, digest), None, None
    kind = "cnn" if isinstance(record, dict) and "timm_model" in record else "vit"
    if kind == "cnn":
        if num_heads is not None:
            raise OptionError("num_heads", f"applies to ViT encoders; {shown} holds a {record.get('timm_model')!r}")
        state = _cnn_state(raw_state, fmt, shown)
        arch = {k: record.get(k) for k in CNN_ARCH_KEYS}
    else:
        state = map_encoder_keys(raw_state, shown)
        arch = infer_architecture(state, shown, record, num_heads)

    prepare, basis_sha, normalize = None, None, "imagenet"
    if basis_record is not None and basis is None:
        raise EncoderError(
            f"{shown} was trained with PCA masking on the basis {basis_record.get('basis_path')!r} (sha256 "
            f"{basis_record['basis_sha256'][:16]}...): give that file as basis, so that images are standardised "
            "as in training"
        )
    if basis is not None:
        prepare, basis_sha = _load_prepare(basis, arch)
        normalize = "none"
        if basis_record is not None and basis_sha != basis_record["basis_sha256"]:
            raise OptionError(
                "basis",
                f"{basis} (sha256 {basis_sha[:16]}...) is not the basis {shown} was trained with "
                f"({basis_record.get('basis_path')!r}, sha256 {basis_record['basis_sha256'][:16]}...)",
            )

    if weights == "checkpoint":
        if kind == "cnn":
            net = _build_cnn(arch, shown)
            _load_weights(net, state, shown, f"a timm {arch['timm_model']}")
        else:
            net = _build_vit(arch)
            _load_weights(net, state, shown)
    else:
        if kind == "cnn":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = _build_cnn(arch, shown)
        else:
            net = _random_vit(arch, seed, shown, method)
        identity = {"weights": "random", "seed": seed, "arch": arch}
        if method in _TWO_VIEW_METHODS:  # another initialisation than the MAE's: another baseline
            identity["init"] = method
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    net.eval()
    return LoadedEncoder(
        net=net,
        source=path,
        format=fmt,
        sha256=digest,
        arch=arch,
        prepare=prepare,
        normalize=normalize,
        weights=weights,
        basis_sha256=basis_sha,
        kind=kind,
    )
