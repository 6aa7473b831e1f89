"""The masked autoencoder of docs/algorithms.md §0 on a timm ViT encoder, as a Composer model."""

from __future__ import annotations

from typing import Any, Protocol, Union

import timm
import torch
from composer.models import ComposerModel
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torchmetrics import MeanMetric, Metric

from magma_composer.models.pos_embed import sincos_2d
from magma_composer.options import OptionError, check_choice, check_int, check_number
from magma_composer.precision import autocast_on_cpu
from magma_composer.seeding import seeded_generator

__all__ = [
    "ComposerMAE",
    "InputTransform",
    "MaskedAutoencoder",
    "build_vit",
    "check_mask_ratio_range",
    "draw_mask_ratio",
    "encoder_architecture",
    "random_masking",
    "patchify",
    "unpatchify",
    "masked_mse_loss",
]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``B x C x H x W`` images to ``B x N x (p * p * C)`` patches, row-major, pixels inside a patch as (p, p, C)."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch_size, gw * patch_size)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws an independent uniformly random mask for every sample.

    Every sample keeps exactly ``num_patches - round(num_patches * mask_ratio)`` patches (at least one).

    Returns:
        ``(ids_keep, mask, ids_restore)``: ``B x n_keep`` indices of the visible patches (sorted by the
        random draw), the ``B x N`` float mask (1 = masked), and the ``B x N`` permutation that restores
        the original order from ``[visible, masked]``.
    """
    n_keep = max(1, num_patches - int(round(num_patches * mask_ratio)))
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def check_mask_ratio_range(value: Any, key: str = "mask_ratio_range") -> tuple[float, float]:
    """``value`` as ``(low, high)`` with ``0 < low <= high < 1``.

    Raises:
        OptionError: not a pair of numbers, or out of that range.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 2:
        raise OptionError(key, f"expected [low, high] with 0 < low <= high < 1 (e.g. [0.1, 0.9]), got {value!r}")
    low = check_number(f"{key}[0]", value[0], 0.0, 1.0, open_min=True, open_max=True)
    high = check_number(f"{key}[1]", value[1], 0.0, 1.0, open_min=True, open_max=True)
    if low > high:
        raise OptionError(key, f"low {low} is above high {high}; write [low, high]")
    return low, high


def draw_mask_ratio(low: float, high: float, *keys: int) -> float:
    """A mask ratio drawn uniformly from ``[low, high]``, as a pure function of ``keys``.

    The draw comes from a CPU generator seeded with :func:`~magma_composer.seeding.derive_seed` of ``keys`` (and a
    tag of its own, so that it is independent of the mask noise drawn with the same keys): no device
    synchronisation, and the same keys always give the same ratio.

    Args:
        low (float): the smallest ratio.
        high (float): the largest ratio (``low == high`` gives ``low``).
        *keys (int): what the draw depends on; :class:`ComposerMAE` passes ``(mask_seed, rank, forward count)``.
    """
    u = torch.rand((), generator=seeded_generator(*keys, _RATIO_TAG), dtype=torch.float64).item()
    return low + (high - low) * u


_RATIO_TAG = 0x5241544F  # separates the ratio's draw from the mask noise drawn with the same keys


def masked_mse_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True
) -> torch.Tensor:
    """Mean squared error over the masked patches only (docs/algorithms.md §0).

    Args:
        pred (torch.Tensor): ``B x N x P`` predicted patches.
        target_patches (torch.Tensor): ``B x N x P`` true patches.
        mask (torch.Tensor): ``B x N``, 1 for a masked patch.
        norm_pix_loss (bool): normalise each target patch by its own mean and variance (eps 1e-6).
    """
    target = target_patches.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


_ENCODER_SIZES = {"embed_dim": int, "depth": int, "num_heads": int, "mlp_ratio": float, "qkv_bias": bool}


def build_vit(
    encoder: Union[str, dict[str, Any]], img_size: int, patch_size: int, in_chans: int = 3
) -> VisionTransformer:
    """A timm ``VisionTransformer`` without a head: a timm ViT name, or explicit sizes
    (``embed_dim``, ``depth``, ``num_heads``; optional ``mlp_ratio``, ``qkv_bias``).

    Raises:
        OptionError: ``encoder`` names no timm ViT, or a size is missing or out of range.
    """
    common = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="token")
    if isinstance(encoder, str):
        if encoder not in timm.list_models():
            vits = ", ".join(timm.list_models("vit_*_patch16_224")[:6])
            raise OptionError("encoder", f"{encoder!r} is not a timm model name; timm ViTs are e.g. {vits}")
        try:
            vit = timm.create_model(encoder, pretrained=False, **common)
        except TypeError:  # a non-ViT architecture refuses the ViT arguments
            raise OptionError(
                "encoder", f"{encoder!r} is not a timm VisionTransformer (e.g. vit_base_patch16_224)"
            ) from None
    elif isinstance(encoder, dict):
        for key, value in encoder.items():
            if key not in _ENCODER_SIZES:
                raise OptionError(f"encoder.{key}", f"unknown key; valid keys are {', '.join(_ENCODER_SIZES)}")
            if _ENCODER_SIZES[key] is bool and not isinstance(value, bool):
                raise OptionError(f"encoder.{key}", f"expected true or false, got {value!r}")
            if _ENCODER_SIZES[key] is float:
                check_number(f"encoder.{key}", value, 0.0, open_min=True)
            elif _ENCODER_SIZES[key] is int:
                check_int(f"encoder.{key}", value, 1)
        for key in ("embed_dim", "depth", "num_heads"):
            if key not in encoder:
                raise OptionError(f"encoder.{key}", "missing (give embed_dim, depth and num_heads, or a timm name)")
        if encoder["embed_dim"] % 4:
            raise OptionError("encoder.embed_dim", "must be divisible by 4 (2-D sin-cos position embeddings)")
        if encoder["embed_dim"] % encoder["num_heads"]:
            raise OptionError("encoder.num_heads", f"must divide embed_dim ({encoder['embed_dim']})")
        vit = VisionTransformer(**common, **encoder)
    else:
        raise OptionError("encoder", f"expected a timm ViT name or a mapping of sizes, got {type(encoder).__name__}")
    if not isinstance(vit, VisionTransformer):
        raise OptionError("encoder", f"{encoder!r} is a {type(vit).__name__}, not a timm VisionTransformer")
    return vit


def encoder_architecture(vit: VisionTransformer) -> dict[str, Any]:
    """The sizes that rebuild ``vit`` with :class:`~timm.models.vision_transformer.VisionTransformer`.

    ``num_heads`` is the one size a state dict's shapes do not show, so checkpoints and exported encoders record
    these (``ComposerMAE`` in its extra state, ``export_encoder`` in a ``.json`` beside the file).

    Returns:
        dict: ``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, ``img_size``, ``in_chans`` (ints),
        ``mlp_ratio`` (float) and ``qkv_bias`` (bool).
    """
    block = vit.blocks[0]
    return {
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "num_heads": int(block.attn.num_heads),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "img_size": int(vit.patch_embed.img_size[0]),
        "in_chans": int(vit.patch_embed.proj.in_channels),
        "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
    }


class MaskedAutoencoder(nn.Module):
    """A timm ``VisionTransformer`` encoder and the MAE decoder (512 wide, 8 blocks, 16 heads by default).

    Args:
        encoder (str | dict): a timm ViT name (``'vit_tiny_patch16_224'``) or explicit sizes
            (``{'embed_dim': 192, 'depth': 12, 'num_heads': 3}``).
        img_size (int): square image side in pixels.
        patch_size (int): square patch side in pixels.
        in_chans (int): image channels.
        decoder_dim (int): decoder width.
        decoder_depth (int): decoder blocks.
        decoder_heads (int): decoder attention heads.
        mlp_ratio (float): decoder MLP ratio.
    """

    def __init__(
        self,
        encoder: Union[str, dict[str, Any]] = "vit_base_patch16_224",
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        check_int("img_size", img_size, 1)
        check_int("patch_size", patch_size, 1, img_size)
        check_int("in_chans", in_chans, 1)
        if img_size % patch_size:
            raise OptionError("patch_size", f"{patch_size} does not divide img_size {img_size}")
        for key, value in (
            ("decoder_dim", decoder_dim),
            ("decoder_depth", decoder_depth),
            ("decoder_heads", decoder_heads),
        ):
            check_int(key, value, 1)
        if decoder_dim % 4:
            raise OptionError("decoder_dim", "must be divisible by 4 (2-D sin-cos position embeddings)")
        if decoder_dim % decoder_heads:
            raise OptionError("decoder_heads", f"{decoder_heads} does not divide decoder_dim {decoder_dim}")
        check_number("mlp_ratio", mlp_ratio, 0.0, open_min=True)
        self.encoder = build_vit(encoder, img_size, patch_size, in_chans)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_prefix_tokens = self.encoder.num_prefix_tokens
        if self.num_prefix_tokens != 1 or self.encoder.cls_token is None:
            raise OptionError("encoder", "the MAE needs exactly one prefix token (the CLS token, no register tokens)")
        embed_dim = self.encoder.embed_dim

        # fixed sin-cos position embeddings for encoder (CLS row zero) and decoder
        self.encoder.pos_embed.requires_grad_(False)
        self.encoder.pos_embed.data.copy_(sincos_2d(embed_dim, *self.grid, num_prefix_tokens=1).unsqueeze(0))

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_2d(decoder_dim, *self.grid, num_prefix_tokens=1).unsqueeze(0), persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("encoder.patch_embed"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ FSDP / checkpointing
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """FSDP wraps every transformer block, encoder and decoder."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Activation checkpointing applies to every transformer block."""
        return isinstance(module, Block)

    # ------------------------------------------------------------------ encoder
    def encode(
        self, images: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Runs the encoder on the visible patches.

        Returns:
            ``(latent, mask, ids_restore)``; ``latent`` is ``B x (1 + n_visible) x D`` after the final
            norm; ``mask`` and ``ids_restore`` are ``None`` when nothing is masked.
        """
        enc = self.encoder
        x = enc.patch_embed(images)
        x = x + enc.pos_embed[:, 1:, :]
        mask = ids_restore = None
        if mask_ratio > 0:
            ids_keep, mask, ids_restore = random_masking(x.shape[0], x.shape[1], mask_ratio, x.device, generator)
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in enc.blocks:  # one call per block, so block hooks fire for any wrapper
            x = block(x)
        return enc.norm(x), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor | None) -> torch.Tensor:
        """Predicts every patch (``B x N x p*p*C``) from the encoded visible tokens."""
        x = self.decoder_embed(latent)
        if ids_restore is not None:
            n_missing = ids_restore.shape[1] + 1 - x.shape[1]
            patches = torch.cat([x[:, 1:, :], self.mask_token.expand(x.shape[0], n_missing, -1)], dim=1)
            patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1, :], patches], dim=1)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(
        self, images: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        latent, mask, ids_restore = self.encode(images, mask_ratio, generator)
        pred = self.decode(latent, ids_restore)
        if mask is None:
            mask = torch.ones(pred.shape[:2], device=pred.device)
        return {"pred": pred, "mask": mask, "cls": latent[:, 0]}


class InputTransform(Protocol):
    """What an algorithm that feeds the model its own input (PCA masking) tells :meth:`ComposerMAE.use_input_transform`.

    Training batches are rewritten by the algorithm itself; this says how every other image (evaluation, features,
    pictures) becomes the model's input, and how to draw the algorithm's own reconstruction pictures.
    """

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the data set yields them -> the model's input (same shape)."""

    def reconstruction_panels(self, model: ComposerMAE, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Titled rows of pictures for ``images`` (data set images), in the data set's value range."""


class ComposerMAE(ComposerModel):
    """A masked autoencoder (docs/algorithms.md §0) as a Composer model.

    ``loss()`` returns ``{'mae': ...}``: the mean squared error over the masked patches. The network
    lives in the child module ``net`` (a :class:`MaskedAutoencoder`), whose ``fsdp_wrap_fn`` and
    ``activation_checkpointing_fn`` select the transformer blocks. The algorithms of this package read
    block features through :func:`magma_composer.models.get_feature_tap`, which works on this model and
    on any other model holding a timm ViT.

    Images from outside the training loop (kNN features, pictures, evaluation) go through
    :meth:`prepare_images`; an algorithm that replaces patch masking with its own input says so with
    :meth:`use_input_transform`.

    Args:
        encoder (str | dict): timm ViT name or explicit sizes, see :class:`MaskedAutoencoder`.
        img_size (int): image side in pixels.
        patch_size (int): patch side in pixels; divides ``img_size``.
        mask_ratio (float, optional): fraction of patches dropped per sample, in ``[0, 1)``. Default 0.75 (when
            ``mask_ratio_range`` is not given either).
        mask_ratio_range (tuple[float, float], optional): ``[low, high]`` with ``0 < low <= high < 1``: PMAE's
            "MAE_rd" baseline. Every training forward draws its ratio uniformly from ``[low, high]`` (see
            :func:`draw_mask_ratio`), and every sample of that forward drops exactly ``round(N * ratio)`` of its
            ``N`` patches (at least one kept), so the batch stays rectangular. The draw is a pure function of
            ``(mask_seed, global rank, training forward count)``, like the masks: a resumed run draws the same
            ratios. Each microbatch and each rank draws its own ratio (one forward each). The drawn ratio is
            ``outputs['mask_ratio']`` of the training forward and is logged as ``mae/mask_ratio``. Evaluation,
            pictures and :attr:`mask_ratio` use the midpoint ``(low + high) / 2`` (the mean of the uniform draw).
            Exclusive with ``mask_ratio``: give one of the two (from a recipe whose base sets ``mask_ratio``, write
            ``mask_ratio: null``). The lowest ratio must mask at least one patch.
        norm_pix_loss (bool): normalise each target patch by its mean and variance.
        decoder_dim (int): decoder width.
        decoder_depth (int): decoder blocks.
        decoder_heads (int): decoder heads; divides ``decoder_dim``.
        in_chans (int): image channels.
        mask_seed (int, optional): the training masks come from a generator seeded by
            ``(mask_seed, global rank, training forward count)``, not from the global RNG; the count is saved
            in the state dict, so a run resumed from a checkpoint (even mid-epoch) draws the same masks as an
            uninterrupted one. Default: drawn from torch's global RNG at construction (set by the trainer's seed).

    Example:
        .. code-block:: python

            from composer import Trainer
            from magma_composer.models import ComposerMAE
            model = ComposerMAE('vit_tiny_patch16_224', img_size=32, patch_size=4)
            trainer = Trainer(model=model, train_dataloader=loader, max_duration='1ep')
    """

    #: bf16 on a CPU: ``forward``, ``loss``, ``eval_forward`` and ``extract_features`` run under
    #: ``torch.autocast("cpu", dtype)`` (set by :func:`magma_composer.precision.cpu_autocast`; None: float32)
    cpu_autocast_dtype: torch.dtype | None = None

    def __init__(
        self,
        encoder: Union[str, dict[str, Any]] = "vit_base_patch16_224",
        img_size: int = 224,
        patch_size: int = 16,
        mask_ratio: float | None = None,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        in_chans: int = 3,
        mask_seed: int | None = None,
        mask_ratio_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if mask_ratio_range is not None:
            if mask_ratio is not None:
                raise OptionError(
                    "mask_ratio_range",
                    f"draws the ratio of every batch, so it cannot be combined with mask_ratio ({mask_ratio!r}); "
                    "give one of the two (mask_ratio: null to drop an inherited one)",
                )
            mask_ratio_range = check_mask_ratio_range(mask_ratio_range)
            mask_ratio = (mask_ratio_range[0] + mask_ratio_range[1]) / 2
        elif mask_ratio is None:
            mask_ratio = 0.75
        check_number("mask_ratio", mask_ratio, 0.0, 1.0, open_max=True)
        if mask_seed is not None:
            check_int("mask_seed", mask_seed, 0)
        self.net = MaskedAutoencoder(
            encoder=encoder,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
        )
        if mask_ratio_range is not None and round(self.net.num_patches * mask_ratio_range[0]) < 1:
            raise OptionError(
                "mask_ratio_range",
                f"the lowest ratio {mask_ratio_range[0]} masks no patch of {self.net.num_patches} "
                f"(round({self.net.num_patches} x {mask_ratio_range[0]}) = 0); raise it "
                f"above {0.5 / self.net.num_patches:.3g}",
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.mask_ratio = float(mask_ratio)
        self.mask_ratio_range = mask_ratio_range
        self.norm_pix_loss = norm_pix_loss
        self._input_transform: InputTransform | None = None
        if mask_ratio == 0:  # nothing is masked, so the mask token never gets a gradient (DDP would wait for it)
            self.net.mask_token.requires_grad_(False)
        self.val_metrics = {"ReconstructionMSE": MeanMetric()}
        # drawn on the CPU so that the model can also be built on the meta device
        self.mask_seed = int(torch.randint(0, 2**62, (), device="cpu").item()) if mask_seed is None else int(mask_seed)
        self._mask_step = 0

    # ------------------------------------------------------------------ input
    def use_input_transform(self, transform: InputTransform) -> None:
        """Feeds the model whole images that an algorithm prepares, instead of dropping patches.

        From now on the training forward drops no patch and ``loss()`` adds no pixel loss (the algorithm adds its
        own), the mask token (then unused) is frozen so that DDP and checkpoint loading see no parameter without a
        gradient, and :meth:`prepare_images` applies ``transform.prepare``.
        """
        self._input_transform = transform
        self.net.mask_token.requires_grad_(False)

    @property
    def drops_patches(self) -> bool:
        """Whether the training forward drops patches (false once an input transform is in use)."""
        return self._input_transform is None

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the data set yields them -> this model's input. Callbacks call this before the model."""
        return images if self._input_transform is None else self._input_transform.prepare(images)

    def reconstruction_panels(self, images: torch.Tensor, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
        """Titled rows of pictures for data-set ``images``, in the data set's value range.

        Patch masking: the images, the masked input and the reconstruction (visible patches pasted from the
        input); with an input transform, its own panels.
        """
        if self._input_transform is not None:
            return self._input_transform.reconstruction_panels(self, images)
        masked, recon = self.reconstruct(images, seed=seed)
        return [("original", images), ("masked input", masked), ("reconstruction", recon)]

    def get_extra_state(self) -> dict[str, Any]:
        """The mask generator's seed and position, and the encoder's architecture, saved with the weights.

        The architecture (:func:`encoder_architecture`) lets an evaluation rebuild the encoder from the checkpoint
        alone: its ``num_heads`` is not visible in any tensor's shape.
        """
        return {
            "mask_seed": self.mask_seed,
            "mask_step": self._mask_step,
            "encoder": encoder_architecture(self.net.encoder),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # checkpoints written before the architecture was recorded have only the mask entries
        recorded = state.get("encoder")
        if recorded is not None:
            current = encoder_architecture(self.net.encoder)
            differ = {k: (v, current.get(k)) for k, v in recorded.items() if current.get(k) != v}
            if differ:
                shown = ", ".join(f"{k} {saved!r} (this model: {now!r})" for k, (saved, now) in differ.items())
                raise ValueError(f"the checkpoint's encoder differs from this model's: {shown}; build the same model")
        self.mask_seed, self._mask_step = int(state["mask_seed"]), int(state["mask_step"])

    def _training_mask(self, device: torch.device) -> tuple[float, torch.Generator]:
        """The ratio and the mask generator of the next training forward, from ``(mask_seed, rank, count)``."""
        from composer.utils import dist

        keys = (self.mask_seed, dist.get_global_rank(), self._mask_step)
        self._mask_step += 1
        ratio = self.mask_ratio if self.mask_ratio_range is None else draw_mask_ratio(*self.mask_ratio_range, *keys)
        return ratio, seeded_generator(*keys, device=device)

    @property
    def encoder(self) -> VisionTransformer:
        """The timm ViT encoder."""
        return self.net.encoder

    @staticmethod
    def _images(batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (tuple, list)):
            return batch[0]
        if isinstance(batch, dict):
            return batch["image"] if "image" in batch else batch["x"]
        raise TypeError(f"unsupported batch type {type(batch).__name__}: expected (images, labels) or a tensor")

    @autocast_on_cpu
    def forward(self, batch: Any) -> dict[str, Any]:
        """The masked forward; in training (patch masking) ``outputs['mask_ratio']`` is the ratio used (a float)."""
        images = self._images(batch)
        if not self.drops_patches:
            return self.net(images, 0.0, None)
        if not self.training or self.mask_ratio == 0:  # nothing to draw (mask_ratio 0 has no range)
            return self.net(images, self.mask_ratio, None)
        ratio, generator = self._training_mask(images.device)
        out = self.net(images, ratio, generator)
        out["mask_ratio"] = ratio
        if self.mask_ratio_range is not None and self.logger is not None:
            self.logger.log_metrics({"mae/mask_ratio": ratio})
        return out

    @autocast_on_cpu
    def loss(self, outputs: dict[str, torch.Tensor], batch: Any, *args, **kwargs) -> dict[str, torch.Tensor]:
        if not self.drops_patches:  # the input transform's algorithm adds its own loss
            return {}
        target = patchify(self._images(batch), self.patch_size)
        return {"mae": masked_mse_loss(outputs["pred"], target, outputs["mask"], self.norm_pix_loss)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    @autocast_on_cpu
    def extract_features(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Features of whole, unmasked data-set images (``B x D``), from the tokens after the final LayerNorm.

        Args:
            images (torch.Tensor): ``B x C x H x W`` images as the data set yields them.
            pool (str): ``'cls'``: the CLS token (the papers' kNN and linear-probe feature); ``'mean'``: the mean
                of the patch tokens (the CLS token excluded).
        """
        check_choice("pool", pool, ("cls", "mean"))
        latent, _, _ = self.net.encode(self.prepare_images(images), 0.0)
        features = latent[:, 0] if pool == "cls" else latent[:, self.net.num_prefix_tokens :].mean(dim=1)
        return features.float()

    @autocast_on_cpu
    def eval_forward(self, batch: Any, outputs: Any | None = None) -> dict[str, torch.Tensor]:
        if outputs is not None:
            return outputs
        images = self.prepare_images(self._images(batch))
        # a fixed-seed mask so that the reconstruction metric is comparable between evaluations
        generator = seeded_generator(0, device=images.device)
        ratio = self.mask_ratio if self.mask_ratio > 0 else 0.75
        out = self.net(images, ratio, generator)
        latent, _, _ = self.net.encode(images, 0.0)
        out["features"] = latent[:, 0]
        out["input"] = images
        return out

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else self.val_metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        target = patchify(outputs["input"], self.patch_size)
        metric.update(masked_mse_loss(outputs["pred"], target, outputs["mask"], self.norm_pix_loss))

    @autocast_on_cpu
    def reconstruct(
        self, images: torch.Tensor, mask_ratio: float | None = None, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(masked_input, reconstruction)`` images for pictures.

        With ``norm_pix_loss`` the predicted patches are de-normalised with the true patch statistics,
        as the MAE paper's visualisations do; visible patches are pasted from the input.
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        generator = seeded_generator(seed, device=images.device)
        with torch.no_grad():
            out = self.net(images, ratio, generator)
        p, grid, c = self.patch_size, self.net.grid, images.shape[1]
        target = patchify(images, p)
        pred = out["pred"].float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std + mean
        m = out["mask"].unsqueeze(-1)
        masked_input = unpatchify(target * (1 - m), p, grid, c)
        recon = unpatchify(target * (1 - m) + pred * m, p, grid, c)
        return masked_input, recon
