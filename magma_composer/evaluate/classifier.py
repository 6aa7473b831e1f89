r"""A classifier on an encoder, as a Composer model: the linear probe, the MLP probe and fine-tuning.

The encoder (a timm ViT, or a timm CNN such as a SimCLR / VICReg ResNet) gives one vector per image, then a head
maps it to class logits. A ViT's tokens are pooled:

* ``pool='cls'``: the CLS token after the encoder's final norm (MAE's and PMAE's linear probe, the papers' default).
* ``pool='mean'``: the mean of the patch tokens (prefix tokens excluded) after the final norm.
* ``fc_norm=True``: MAE's fine-tuning head: the encoder's final norm is dropped and a fresh LayerNorm (eps 1e-6)
  is applied to the pooled tokens instead, :math:`f = \mathrm{LN}(\frac{1}{N}\sum_i t_i)` with ``pool='mean'``.

A CNN's feature is its global average pooled output (``pool='mean'``; it has no CLS token, no final norm to
replace and no blocks to drop: ``'cls'``, ``fc_norm`` and ``drop_path`` are refused for it). Its batch-norm layers
use their running statistics while the encoder is frozen (the probes) and train with it when fine-tuning.

Heads (``D`` the encoder width, ``C`` the classes, ``H`` = ``mlp_hidden_dim``):

* ``'linear'``: :math:`z = W f + b`, :math:`W \in R^{C \times D}`; ``batch_norm=True`` puts
  ``BatchNorm1d(D, affine=False, eps=1e-6)`` before it (MAE's linear probe: the features are whitened per dimension
  with batch statistics, so the probe is insensitive to the features' scale).
* ``'mlp'``: ``mlp_layers`` linear layers with ReLU between them, ``D -> H -> ... -> H -> C``; PMAE's MLP probe has
  three layers (``mlp_layers=3``); its width is not published, ours defaults to 2048.

The last linear layer's weight is drawn from a truncated normal with std ``head_init_std`` (MAE: 0.01 for the linear
probe, 2e-5 for fine-tuning), its bias is zero; the MLP's hidden layers are Xavier-uniform with zero biases.

The loss is the soft-target cross entropy (:func:`soft_target_cross_entropy`),

.. math::

    \ell = -\frac{1}{B} \sum_{i=1}^{B} \sum_{c=1}^{C} q_{ic} \log \mathrm{softmax}(z_i)_c,

where the targets :math:`q` are class indices (one-hot) or ``B x C`` class probabilities, as Composer's MixUp, CutMix
and LabelSmoothing write them at ``Event.BEFORE_LOSS``; ``forward`` returns the logits tensor those algorithms
expect in ``state.outputs``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from timm.layers import DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from magma_composer.options import OptionError, check_choice, check_int, check_number
from magma_composer.precision import autocast_on_cpu

__all__ = [
    "EncoderClassifier",
    "EvalDataError",
    "check_labels",
    "pool_tokens",
    "set_drop_path",
    "soft_target_cross_entropy",
]

#: the MLP probe's hidden width when ``mlp_hidden_dim`` is not given (PMAE does not publish one)
DEFAULT_MLP_HIDDEN = 2048
DEFAULT_MLP_LAYERS = 3


class EvalDataError(ValueError):
    """The data does not fit a supervised protocol: labels missing or out of range, classes that differ between
    the splits, images of another size than the encoder's."""


def check_labels(labels: torch.Tensor, num_classes: int, split: str) -> None:
    """Raises :class:`EvalDataError` unless every class index is in ``[0, num_classes)``.

    Args:
        labels (torch.Tensor): ``B`` integer class indices.
        num_classes (int): the classifier's classes.
        split (str): 'training' or 'test', for the message.
    """
    if labels.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(labels))
    if low == -1:
        raise EvalDataError(
            f"the {split} data has no labels (label -1: its shards have no 'y' column); "
            "a supervised protocol needs a labelled data set (kNN and linear probes too)"
        )
    if low < 0 or high >= num_classes:
        raise EvalDataError(
            f"the {split} data has class index {low if low < 0 else high}, outside [0, {num_classes}) = "
            f"[0, num_classes={num_classes}); set num_classes to the data set's number of classes"
        )


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of ``B x C`` logits against class indices (``B``) or class probabilities (``B x C``).

    Same value as :func:`composer.loss.soft_cross_entropy` for targets that sum to one, without its host
    synchronisation and its rescaling of targets whose sum rounds below one.
    """
    if not targets.is_floating_point():
        return F.cross_entropy(logits.float(), targets)
    if targets.shape != logits.shape:
        raise EvalDataError(f"soft targets of shape {tuple(targets.shape)} for logits of shape {tuple(logits.shape)}")
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """``B x T x D`` tokens -> ``B x D``: the first (CLS) token, or the mean of the patch tokens."""
    if pool == "cls":
        return tokens[:, 0]
    return tokens[:, num_prefix_tokens:].mean(dim=1)


def set_drop_path(vit: VisionTransformer, drop_path: float) -> None:
    """Stochastic depth on an existing ViT: block ``i`` of ``L`` drops its residual branches with probability
    ``drop_path * i / (L - 1)`` (timm's and MAE's linear rule), replacing the blocks' previous rates."""
    depth = len(vit.blocks)
    rates = torch.linspace(0, drop_path, depth).tolist()
    for block, rate in zip(vit.blocks, rates):
        if not (hasattr(block, "drop_path1") and hasattr(block, "drop_path2")):
            raise OptionError("drop_path", f"the encoder's blocks ({type(block).__name__}) have no drop-path layers")
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


class EncoderClassifier(ComposerModel):
    """An encoder, a pooling and a classification head (module docstring: the poolings and heads).

    A frozen encoder (``freeze_encoder=True``, the probes) gets no gradients, runs under ``torch.no_grad`` and stays
    in eval mode even when the model is put in training mode; only the head (and ``fc_norm``) train. Otherwise
    every encoder parameter trains (fine-tuning; the position embedding too, as in MAE).

    Published settings (the recipes in ``yamls/eval/`` write them):

    * MAE linear probe: ``pool='cls'``, ``batch_norm=True``, ``head_init_std=0.01``, frozen encoder.
    * PMAE linear probe: ``pool='cls'``, no BatchNorm, frozen encoder; MLP probe: ``head='mlp'``, ``mlp_layers=3``.
    * MAE ViT-B fine-tuning: ``pool='mean'``, ``fc_norm=True``, ``drop_path=0.1``, ``head_init_std=2e-5``.

    ``forward`` returns logits; ``loss`` is the soft-target cross entropy; evaluation reports top-1 and top-5
    accuracy (metrics ``top1`` and ``top5``, fractions in [0, 1]). Labels are checked on every batch: -1 (a data set
    without labels) or an index outside ``[0, num_classes)`` raises :class:`EvalDataError`. The classes seen in
    training and in evaluation are recorded (:meth:`seen_classes`) so that a caller can compare the splits.

    Args:
        encoder (nn.Module): a timm ViT (``num_classes=0``), or a timm CNN without classifier (``num_classes=0``, its
            forward the pooled ``num_features`` output); this model owns it from now on (``fc_norm`` and
            ``drop_path`` change a ViT's layers).
        num_classes (int): classes, >= 2.
        head (str): ``'linear'`` or ``'mlp'``.
        batch_norm (bool): ``BatchNorm1d(affine=False, eps=1e-6)`` on the pooled features before the head. Its
            statistics are per rank (no SyncBatchNorm), as in MAE's code.
        mlp_hidden_dim (int, optional): the MLP head's width (``head='mlp'`` only). Default: 2048.
        mlp_layers (int, optional): the MLP head's linear layers, >= 2 (``head='mlp'`` only). Default: 3.
        pool (str): ``'cls'`` or ``'mean'``.
        fc_norm (bool): replace the encoder's final norm by a fresh LayerNorm after pooling (MAE fine-tuning).
        freeze_encoder (bool): train the head only.
        drop_path (float): stochastic depth rate of the last block, in [0, 1) (linear in depth); needs a trainable
            encoder.
        head_init_std (float): std of the truncated-normal init of the last linear layer.
        prepare (Callable, optional): applied to the images before the encoder (e.g. PMAE's per-pixel
            standardisation); an ``nn.Module`` is registered as a child so that it moves with the model.
    """

    #: bf16 on a CPU: ``forward`` and ``eval_forward`` run under ``torch.autocast("cpu", dtype)`` (set by
    #: :func:`magma_composer.precision.cpu_autocast`; None: float32)
    cpu_autocast_dtype: torch.dtype | None = None

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        head: str = "linear",
        batch_norm: bool = False,
        mlp_hidden_dim: int | None = None,
        mlp_layers: int | None = None,
        pool: str = "cls",
        fc_norm: bool = False,
        freeze_encoder: bool = True,
        drop_path: float = 0.0,
        head_init_std: float = 0.01,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        is_vit = isinstance(encoder, VisionTransformer)
        if not is_vit and not (
            isinstance(encoder, nn.Module) and isinstance(getattr(encoder, "num_features", None), int)
        ):
            raise OptionError(
                "encoder",
                f"expected a timm VisionTransformer or a timm CNN (num_features), got {type(encoder).__name__}",
            )
        check_int("num_classes", num_classes, 2)
        check_choice("head", head, ("linear", "mlp"))
        check_choice("pool", pool, ("cls", "mean"))
        check_number("drop_path", drop_path, 0.0, 1.0, open_max=True)
        check_number("head_init_std", head_init_std, 0.0, open_min=True)
        if head == "linear":
            for key, value in (("mlp_hidden_dim", mlp_hidden_dim), ("mlp_layers", mlp_layers)):
                if value is not None:
                    raise OptionError(key, "applies to head: mlp only; remove it or set head: mlp")
        else:
            mlp_hidden_dim = DEFAULT_MLP_HIDDEN if mlp_hidden_dim is None else mlp_hidden_dim
            mlp_layers = DEFAULT_MLP_LAYERS if mlp_layers is None else mlp_layers
            check_int("mlp_hidden_dim", mlp_hidden_dim, 1)
            check_int("mlp_layers", mlp_layers, 2)
        if not is_vit:
            kind = type(encoder).__name__
            if pool == "cls":
                raise OptionError(
                    "pool", f"'cls' needs a ViT's CLS token; the {kind} encoder has none: set pool: mean (its global "
                    "average pooled output)"
                )  # fmt: skip
            if fc_norm:
                raise OptionError("fc_norm", f"replaces a ViT's final norm; the {kind} encoder has none: remove it")
            if drop_path > 0:
                raise OptionError("drop_path", f"sets a ViT's stochastic depth; not supported for the {kind} encoder")
        elif pool == "cls" and encoder.cls_token is None:
            raise OptionError("pool", "'cls' needs an encoder with a CLS token; this one has none (use 'mean')")
        if drop_path > 0 and freeze_encoder:
            raise OptionError("drop_path", "has no effect on a frozen encoder; set freeze_encoder: false or remove it")
        if getattr(encoder, "num_classes", 0) != 0:
            raise OptionError("encoder", f"expected a headless encoder (num_classes=0), got {encoder.num_classes}")

        self.encoder = encoder
        self.is_vit = is_vit
        self.num_classes = num_classes
        self.pool = pool
        self.freeze_encoder = freeze_encoder
        self.num_prefix_tokens = encoder.num_prefix_tokens if is_vit else 0
        width = encoder.embed_dim if is_vit else encoder.num_features
        if fc_norm:
            # MAE fine-tuning drops the pre-trained final norm and normalises the pooled tokens with a fresh one
            eps = getattr(encoder.norm, "eps", 1e-6)
            encoder.norm = nn.Identity()
            self.fc_norm: nn.Module = nn.LayerNorm(width, eps=eps)
        else:
            self.fc_norm = nn.Identity()
        if drop_path > 0:
            set_drop_path(encoder, drop_path)
        encoder.requires_grad_(not freeze_encoder)
        self.prepare = prepare

        layers: list[nn.Module] = []
        if batch_norm:
            layers.append(nn.BatchNorm1d(width, affine=False, eps=1e-6))
        if head == "linear":
            layers.append(nn.Linear(width, num_classes))
        else:
            dims = [width] + [mlp_hidden_dim] * (mlp_layers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                hidden = nn.Linear(d_in, d_out)
                nn.init.xavier_uniform_(hidden.weight)
                nn.init.zeros_(hidden.bias)
                layers += [hidden, nn.ReLU(inplace=True)]
            layers.append(nn.Linear(dims[-1], num_classes))
        nn.init.trunc_normal_(layers[-1].weight, std=head_init_std)
        nn.init.zeros_(layers[-1].bias)
        self.head = nn.Sequential(*layers)

        top5 = min(5, num_classes)
        self.val_metrics = {
            "top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes=num_classes, top_k=top5, average="micro"),
        }
        # classes seen in training / evaluation, as boolean tensors on the labels' device (no host sync per batch)
        self._seen: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ modes, FSDP
    def train(self, mode: bool = True) -> EncoderClassifier:
        """As ``nn.Module.train``, but a frozen encoder stays in eval mode (dropout, drop path off)."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """FSDP wraps every transformer block."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Activation checkpointing applies to every transformer block."""
        return isinstance(module, Block)

    # ------------------------------------------------------------------ forward
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:  # a timm CNN without classifier: its forward is the pooled output
            return self.encoder(x)
        return pool_tokens(self.encoder.forward_features(x), self.pool, self.num_prefix_tokens)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled (and ``fc_norm``-ed) encoder features, ``B x D``, of data-set images."""
        expected = tuple(self.encoder.patch_embed.img_size) if self.is_vit else None
        if (
            self.is_vit
            and getattr(self.encoder.patch_embed, "strict_img_size", True)
            and tuple(images.shape[-2:]) != expected
        ):
            raise EvalDataError(
                f"the images are {images.shape[-2]}x{images.shape[-1]} pixels but the encoder was built for "
                f"{expected[0]}x{expected[1]}; set the data's image_size to {expected[0]}"
            )
        x = images if self.prepare is None else self.prepare(images)
        if self.freeze_encoder:
            with torch.no_grad():
                pooled = self._encode(x)
        else:
            pooled = self._encode(x)
        return self.fc_norm(pooled)

    @autocast_on_cpu
    def forward(self, batch: Any) -> torch.Tensor:
        images, labels = _split(batch)
        if self.training and labels is not None and not labels.is_floating_point():
            self._record(labels, "training")
        return self.head(self.features(images))

    def loss(self, outputs: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Soft-target cross entropy; targets are class indices or ``B x C`` probabilities (MixUp, CutMix...)."""
        _, targets = _split(batch)
        if targets is None:
            raise EvalDataError("the training batches have no labels; a supervised protocol needs (images, labels)")
        return soft_target_cross_entropy(outputs, targets)

    @autocast_on_cpu
    def eval_forward(self, batch: Any, outputs: Any | None = None) -> torch.Tensor:
        if outputs is not None:
            return outputs
        images, _ = _split(batch)
        return self.head(self.features(images))

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else self.val_metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        _, labels = _split(batch)
        if labels is None:
            raise EvalDataError("the test batches have no labels; a supervised protocol needs (images, labels)")
        self._record(labels, "test")
        metric.update(outputs.float(), labels)

    # ------------------------------------------------------------------ classes seen
    def _record(self, labels: torch.Tensor, split: str) -> None:
        check_labels(labels, self.num_classes, split)
        seen = self._seen.get(split)
        if seen is None or seen.device != labels.device:
            seen = self._seen[split] = torch.zeros(self.num_classes, dtype=torch.bool, device=labels.device)
        seen[labels] = True

    def seen_classes(self, split: str) -> torch.Tensor:
        """Boolean ``num_classes`` mask of the classes this rank has seen in ``split`` ('training' or 'test')."""
        seen = self._seen.get(split)
        return torch.zeros(self.num_classes, dtype=torch.bool) if seen is None else seen


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels)`` of a batch: a tensor, a sequence ``(images, labels[, indices])`` or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return batch.get("image", batch.get("x")), batch.get("label", batch.get("y"))
    raise TypeError(f"unsupported batch type {type(batch).__name__}: expected (images, labels) or a dict")
