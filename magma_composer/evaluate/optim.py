"""Optimizers of the supervised protocols: SGD, LARS or AdamW, with layer-wise learning-rate decay.

Layer-wise decay (BEiT, MAE fine-tuning): a ViT of depth :math:`L` has layers :math:`0..L+1`: the patch embedding,
the CLS token and the position embedding are layer 0, block :math:`i` (0-based) is layer :math:`i + 1`, and
everything after the blocks (final norm, ``fc_norm``, head) is layer :math:`L + 1`. A parameter of layer
:math:`\\ell` gets the learning rate

.. math::

    \\eta_\\ell = \\eta \\cdot \\lambda^{L + 1 - \\ell},

with :math:`\\lambda` = ``layer_decay`` (0.65 for MAE's ViT-B), so the head learns at :math:`\\eta` and the patch
embedding at :math:`\\eta \\lambda^{L+1}`. Weight decay applies to matrices only: not to 1-D parameters (biases,
norms), nor to the CLS token and position embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from magma_composer.options import OptionError, check_choice, check_number

__all__ = ["NO_DECAY_NAMES", "build_eval_optimizer", "layer_decay_groups", "layer_id"]

#: parameters (last name component) without weight decay besides the 1-D ones
NO_DECAY_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token")
#: the ViT's parts before the first block, all in layer 0
_EMBEDDING_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token", "patch_embed", "norm_pre")


def layer_id(name: str, depth: int, prefix: str = "encoder.") -> int:
    """The layer of parameter ``name`` in a model whose ViT lives under ``prefix``: 0 for the embeddings,
    ``i + 1`` for ``blocks.i``, ``depth + 1`` for everything else (final norm, ``fc_norm``, the head)."""
    if not name.startswith(prefix):
        return depth + 1
    parts = name[len(prefix) :].split(".")
    if parts[0] in _EMBEDDING_NAMES:
        return 0
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    return depth + 1


def layer_decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    depth: int,
    weight_decay: float,
    layer_decay: float | None = None,
    no_decay_names: Sequence[str] = NO_DECAY_NAMES,
    prefix: str = "encoder.",
) -> list[dict]:
    """Parameter groups with per-layer learning-rate scales and weight decay (module docstring: the rule).

    Parameters without ``requires_grad`` are left out. Each group holds parameters of one layer and one decay
    kind: ``{"params", "names", "layer", "lr_scale", "decay", "weight_decay"}`` (``decay``: the kind that gets weight
    decay, ``weight_decay`` its value, 0 for the other kind); ``lr_scale`` is
    ``layer_decay ** (depth + 1 - layer)`` (1 for every group without ``layer_decay``).

    Args:
        named_parameters: ``model.named_parameters()``.
        depth (int): the ViT's number of blocks.
        weight_decay (float): the decay of the decayed groups.
        layer_decay (float, optional): the per-layer factor; ``None``: one learning rate.
        no_decay_names (Sequence[str]): last name components without weight decay, besides 1-D parameters.
        prefix (str): where the ViT's parameters are in the names.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth, prefix) if layer_decay is not None else depth + 1
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in no_decay_names)
        group = groups.get((layer, decay))
        if group is None:
            scale = 1.0 if layer_decay is None else float(layer_decay) ** (depth + 1 - layer)
            group = groups[(layer, decay)] = {
                "params": [],
                "names": [],
                "layer": layer,
                "lr_scale": scale,
                "decay": decay,
                "weight_decay": float(weight_decay) if decay else 0.0,
            }
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_eval_optimizer(
    model: nn.Module,
    global_batch: int,
    name: str = "sgd",
    lr: float | None = None,
    base_lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float = 0.0,
    betas: Sequence[float] | None = None,
    layer_decay: float | None = None,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer of a supervised protocol (the recipe's ``optimizer:`` section); give ``lr`` or ``base_lr``.

    * ``'sgd'``: ``torch.optim.SGD`` with momentum and (coupled, L2) weight decay. PMAE's linear probe: momentum
      0.9, ``base_lr=0.1`` (lr 0.1 x batch / 256), 10 warm-up epochs, 100 epochs.
    * ``'lars'``: ``timm.optim.Lars`` (trust coefficient 0.001). As in MAE's LARS, matrices get weight decay and the
      layer-wise trust ratio :math:`0.001 \\|w\\| / (\\|g\\| + wd \\|w\\|)` even when ``weight_decay`` is 0; biases,
      norms and tokens get neither (plain SGD with momentum). MAE's linear probe: ``base_lr=0.1`` at batch 16384,
      weight decay 0, 90 epochs, 10 warm-up.
    * ``'adamw'``: ``torch.optim.AdamW`` (decay ``lr_t * weight_decay * w`` per step). MAE's ViT-B fine-tuning:
      ``base_lr=5e-4`` (at batch 1024: lr 2e-3), betas (0.9, 0.999), weight decay 0.05, ``layer_decay=0.65``, 100
      epochs, 5 warm-up.

    Every group's ``lr`` is the peak learning rate times its ``lr_scale`` (:func:`layer_decay_groups`), so Composer's
    schedulers (which multiply each group's initial ``lr``) keep the layer ratios.

    Args:
        model (nn.Module): the model (an :class:`~magma_composer.evaluate.classifier.EncoderClassifier` for
            ``layer_decay``); only parameters with ``requires_grad`` are optimised.
        global_batch (int): samples per step over all ranks (for ``base_lr``).
        name (str): ``'sgd'``, ``'lars'`` or ``'adamw'``.
        lr (float, optional): the peak learning rate.
        base_lr (float, optional): the peak learning rate per 256 samples: ``lr = base_lr * global_batch / 256``.
        momentum (float, optional): SGD/LARS momentum in [0, 1). Default: 0.9.
        weight_decay (float): weight decay of the matrices (not of biases, norms, tokens).
        betas (Sequence[float], optional): AdamW's betas, each in [0, 1). Default: (0.9, 0.999).
        layer_decay (float, optional): layer-wise learning-rate decay in (0, 1]; needs a trainable ViT encoder.
        nesterov (bool): Nesterov momentum (SGD/LARS).
    """
    check_choice("name", name, ("sgd", "lars", "adamw"))
    if (lr is None) == (base_lr is None):
        raise OptionError("lr", "give exactly one of 'lr' (absolute) or 'base_lr' (x global batch / 256)")
    key, value = ("lr", lr) if lr is not None else ("base_lr", base_lr)
    check_number(key, value, 0.0, open_min=True)
    check_number("weight_decay", weight_decay, 0.0)
    if name == "adamw":
        if momentum is not None:
            raise OptionError("momentum", "applies to sgd and lars; AdamW's momentum is 'betas'")
        if nesterov:
            raise OptionError("nesterov", "applies to sgd and lars, not adamw")
        betas = (0.9, 0.999) if betas is None else tuple(betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise OptionError("betas", f"expected two numbers in [0, 1), got {list(betas)}")
    else:
        if betas is not None:
            raise OptionError("betas", f"applies to adamw, not {name}; use 'momentum'")
        momentum = 0.9 if momentum is None else momentum
        check_number("momentum", momentum, 0.0, 1.0, open_max=True)
        if nesterov and momentum == 0:
            raise OptionError("nesterov", "needs momentum > 0")

    depth = 0
    if layer_decay is not None:
        check_number("layer_decay", layer_decay, 0.0, 1.0, open_min=True)
        encoder = getattr(model, "encoder", None)
        blocks = getattr(encoder, "blocks", None)
        if not isinstance(encoder, nn.Module) or blocks is None:
            raise OptionError("layer_decay", f"needs a model with a ViT 'encoder', got {type(model).__name__}")
        if not any(p.requires_grad for p in encoder.parameters()):
            raise OptionError(
                "layer_decay", "has no effect: the encoder is frozen (only the head trains); set freeze_encoder: false"
            )
        depth = len(blocks)
    groups = layer_decay_groups(model.named_parameters(), depth, weight_decay, layer_decay)
    if not groups:
        raise OptionError("model", "has no trainable parameters")
    peak = lr if lr is not None else base_lr * global_batch / 256
    param_groups = [
        {
            "params": g["params"],
            "lr": peak * g["lr_scale"],
            "lr_scale": g["lr_scale"],
            "weight_decay": g["weight_decay"],
        }
        for g in groups
    ]
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=peak, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=peak, betas=betas)
    from timm.optim import Lars

    for group, spec in zip(param_groups, groups):  # MAE's LARS: the trust ratio on the decayed kind only
        group["always_adapt"] = spec["decay"]
    return Lars(param_groups, lr=peak, momentum=momentum, nesterov=nesterov, trust_coeff=0.001)
