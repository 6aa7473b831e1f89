"""Why MAGMA did not help: the term's size and anatomy, the original code's formula, and per-step plots.

Three commands (run from the repository root):

``magnitude``
    Builds a masked autoencoder (default ViT-B/16 at 224 px, randomly initialised, or loaded from a Composer
    checkpoint), runs one batch of real images (CIFAR-10 upsampled by the evaluation transform) through the masked
    training forward, reads the reference and target block features with the package's own
    :class:`~magma_composer.models.FeatureTap` and prints, on those same features: our ``magma_loss``, the original
    MAGMA code's formula (re-implemented here from reading ``solo/losses/manifold_regularizer.py`` and
    ``solo/utils/embedding_propagation.py`` of github.com/adondera/magma; in float32 and with the fp16 products that
    its recipes' ``precision: 16`` autocast gives), their ratio, the MAE loss, the gradient norms both losses put on
    the encoder, and the term's anatomy (:func:`term_anatomy`)::

        python experiments/magma_diagnostics.py magnitude --data data/cifar10-mds --batch 64
        python experiments/magma_diagnostics.py magnitude --encoder vit_tiny_patch16_224 --img-size 64 \\
            --patch-size 8 --decoder-dim 128 --decoder-depth 2 --batch 128

``trace``
    Trains a recipe in-process for a few steps and writes every logged metric per step as JSONL (the format
    ``plot`` reads), e.g. to watch ``||Y||`` while the term falls::

        python experiments/magma_diagnostics.py trace yamls/cifar10/mu-mae-vit-tiny.yaml --out runs/magma/mu.jsonl \\
            max_duration=60ba 'algorithms.magma.weight=1.0'

``plot``
    Plots per step the MAGMA term, lambda, ``||Y||``, ``||X||``, gamma, mean ``W``, the Rayleigh quotient, the MAE
    loss and the uniformity value of one or more runs (overlaid, one colour per run) into one PNG::

        python experiments/magma_diagnostics.py plot runs/magma/mae.jsonl runs/magma/mu.jsonl --out docs/magma

Metrics files (:func:`read_metrics`): JSONL, one JSON object per line with an integer ``step`` (or ``batch``) and
metric values (lines of the same step are merged); a JSON list of such objects; a JSON object with a ``metrics``
list of them (e.g. an evidence record); or Composer's ``FileLogger`` text (``[metric][batch=N]: name: value``,
which keeps only 4 decimals).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from composer.loggers import LoggerDestination

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from magma_composer.algorithms.magma import magma_loss  # noqa: E402

__all__ = [
    "PLOTTED",
    "JsonlMetrics",
    "measure_magnitude",
    "original_magma_term",
    "plot_metrics",
    "read_metrics",
    "term_anatomy",
    "trace_recipe",
]

#: the original code's constant inside the square root of the degree (``get_laplacian``)
ORIGINAL_EPS = 1e-4


# ---------------------------------------------------------------------------------------------- the original formula
def original_magma_term(
    x: torch.Tensor,
    y: torch.Tensor,
    rbf_scale: float = 1.0,
    fixed_gamma: float | None = None,
    half_products: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MAGMA term as the original code computes it, written here from its description (not copied).

    What ``ManifoldRegularizer.manifold_regularizer_loss`` (solo/losses/manifold_regularizer.py, lines 12-49) does
    with ``get_similarity_matrix`` and ``get_laplacian`` (solo/utils/embedding_propagation.py, lines 52-81):

    * squared distances by broadcasting, ``D2[i, j] = sum_c (x[i, c] - x[j, c])^2`` (diagonal 0 by construction);
    * ``gamma`` = the unbiased standard deviation of the entries of ``D2`` that are not 0 (both triangles);
    * ``W = exp(-rbf_scale * D2 / gamma)`` (``D2 / fixed_gamma`` when one is given) with the diagonal zeroed;
    * ``L = I - W * d^(-1/2)[None, :] * d^(-1/2)[:, None]`` with ``d = 1e-4 + sum_j W[i, j]``;
    * the term ``trace(y^T @ L @ y) / B^2``, the ``D x D`` matrix built explicitly. Nothing is detached.

    Args:
        x (torch.Tensor): ``B x D`` reference features.
        y (torch.Tensor): ``B x D`` target features.
        rbf_scale (float): the factor inside the exponential.
        fixed_gamma (float, optional): a fixed bandwidth (the original's ``fixed_gamma``; falsy means derived).
        half_products (bool): compute the two products of the trace in float16 with float16 results, as CUDA
            autocast does under the released recipes' ``precision: 16`` (the distances, ``W`` and ``L`` stay
            float32 there: autocast runs ``pow``, ``sum`` and ``exp`` in float32).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: the term (float32 or float64 like the input) and ``gamma``.
    """
    b, c = x.shape
    sq_dist = ((x.view(b, 1, c) - x.view(1, b, c)) ** 2).sum(-1)
    gamma = sq_dist[sq_dist != 0].std()
    scaled = sq_dist / (fixed_gamma if fixed_gamma else gamma)
    weights = torch.exp(-scaled * rbf_scale) * (~torch.eye(b, dtype=torch.bool, device=x.device)).to(x.dtype)
    isqrt = 1.0 / torch.sqrt(ORIGINAL_EPS + weights.sum(dim=-1))
    laplacian = torch.eye(b, dtype=x.dtype, device=x.device) - weights * isqrt[None, :] * isqrt[:, None]
    if half_products:
        # float16 operands and float16 results (accumulation in float32, then rounded), as cuBLAS under autocast
        left = (y.T.half().float() @ laplacian.half().float()).half()
        gram = (left.float() @ y.half().float()).half()
        term = torch.diagonal(gram).float().sum().half().float() / (b**2)
        return term, gamma
    return torch.trace(y.T @ laplacian @ y) / (b**2), gamma


def term_anatomy(x: torch.Tensor, y: torch.Tensor, eps: float = ORIGINAL_EPS) -> dict[str, float]:
    """Where the value of ``R(X, Y)`` comes from, on one batch (float64, no gradient).

    With ``m`` the batch mean of ``Y`` and ``Yc = Y - 1 m^T``, ``trace(Y^T L Y) = ||m||^2 1^T L 1 + 2 m^T Yc^T L 1 +
    trace(Yc^T L Yc)``; the three parts are returned divided by ``B^2`` (``mean_part``, ``cross_part``,
    ``centred_part``; they sum to ``term``). ``identity_value`` is what the term would be with ``L = I`` (no graph):
    ``||Y||_F^2 / B^2``; ``rayleigh`` = ``term / identity_value``.

    Returns:
        dict[str, float]: ``term``, ``gamma``, ``mean_affinity``, ``mean_degree``, ``min_degree`` (to compare with
        ``eps``), ``d2_mean_over_gamma`` (a typical pair's ``W`` is about ``exp(-that)``), the parts above,
        ``identity_value``, ``rayleigh``, ``target_norm`` / ``reference_norm`` (mean row norms), ``target_mean_norm``
        (``||m||``) and ``target_spread`` (mean row norm of ``Yc``).
    """
    x = x.detach().double()
    y = y.detach().double()
    b = x.shape[0]
    d2 = torch.cdist(x, x).pow(2)
    d2.fill_diagonal_(0.0)
    gamma = d2[d2 > 0].std()
    w = torch.exp(-d2 / gamma)
    w.fill_diagonal_(0.0)
    degree = w.sum(dim=1)
    s = torch.rsqrt(degree + eps)
    lap = torch.eye(b, dtype=torch.float64) - s[:, None] * w * s[None, :]
    m = y.mean(dim=0)
    yc = y - m
    ones = torch.ones(b, dtype=torch.float64)
    mean_part = (m @ m) * (ones @ lap @ ones)
    cross_part = 2.0 * (m @ (yc.T @ (lap @ ones)))
    centred_part = torch.trace(yc.T @ lap @ yc)
    total = torch.trace(y.T @ lap @ y)
    identity = (y * y).sum()
    off = d2[~torch.eye(b, dtype=torch.bool)]
    return {
        "term": float(total / b**2),
        "gamma": float(gamma),
        "mean_affinity": float(w.sum() / (b * (b - 1))),
        "mean_degree": float(degree.mean()),
        "min_degree": float(degree.min()),
        "eps": eps,
        "d2_mean_over_gamma": float(off.mean() / gamma),
        "mean_part": float(mean_part / b**2),
        "cross_part": float(cross_part / b**2),
        "centred_part": float(centred_part / b**2),
        "identity_value": float(identity / b**2),
        "rayleigh": float(total / identity),
        "target_norm": float(y.norm(dim=1).mean()),
        "target_mean_norm": float(m.norm()),
        "target_spread": float(yc.norm(dim=1).mean()),
        "reference_norm": float(x.norm(dim=1).mean()),
    }


# ---------------------------------------------------------------------------------------------- magnitude
def _load_images(data: str, split: str, img_size: int, batch: int, seed: int) -> torch.Tensor:
    """``batch`` images of an MDS data set through the evaluation transform (resized to ``img_size``, normalised)."""
    from magma_composer.data import build_image_dataloader

    loader = build_image_dataloader(
        batch_size=batch,
        num_workers=0,
        train=False,
        remote=data,
        split=split,
        image_size=img_size,
        shuffle=True,
        shuffle_seed=seed,
    )
    images = next(iter(loader))[0]
    if images.shape[0] != batch:
        raise SystemExit(f"--batch {batch}: the data set at {data} ({split}) gave only {images.shape[0]} images")
    return images


def _encoder_spec(encoder: str) -> Any:
    """``--encoder``: a timm name, or JSON sizes such as ``{"embed_dim": 32, "depth": 4, "num_heads": 2}``."""
    return json.loads(encoder) if encoder.lstrip().startswith("{") else encoder


def _grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


def measure_magnitude(
    encoder: str = "vit_base_patch16_224",
    img_size: int = 224,
    patch_size: int = 16,
    batch: int = 64,
    data: str = "data/cifar10-mds",
    split: str = "train",
    checkpoint: str | None = None,
    reference: int = 10,
    target: int = -1,
    decoder_dim: int = 512,
    decoder_depth: int = 8,
    decoder_heads: int = 16,
    mask_ratio: float = 0.75,
    seed: int = 0,
    grads: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Our term and the original formula on the same features of one masked training forward.

    Args:
        encoder (str): a timm ViT name or JSON sizes (see :class:`~magma_composer.models.ComposerMAE`).
        img_size (int): image side; the images are resized to it by the evaluation transform.
        patch_size (int): patch side.
        batch (int): images in the batch (the term's ``B``).
        data (str): an MDS data set folder (``split`` inside it).
        split (str): the split to read.
        checkpoint (str, optional): a Composer checkpoint of a ComposerMAE of these sizes; default: random init.
        reference (int): the reference block. target (int): the target block.
        decoder_dim, decoder_depth, decoder_heads (int): the decoder (for the MAE loss only).
        mask_ratio (float): the training mask ratio.
        seed (int): initialisation, mask and image draw.
        grads (bool): also measure the gradient norm each loss puts on the encoder's parameters.
        device (str): ``cpu`` or ``cuda``; on ``cuda`` the original formula is also run as its recipes ran it, inside
            ``torch.autocast('cuda', dtype=torch.float16)`` (``original_cuda_autocast``).

    Returns:
        dict: the setting, ``ours``, ``original_fp32``, ``original_fp16``, their ratios, ``mae_loss``, the gradient
        norms and :func:`term_anatomy`'s keys under ``anatomy``.
    """
    from magma_composer.models import ComposerMAE
    from magma_composer.models.taps import get_feature_tap

    torch.manual_seed(seed)
    model = ComposerMAE(
        _encoder_spec(encoder),
        img_size=img_size,
        patch_size=patch_size,
        mask_ratio=mask_ratio,
        decoder_dim=decoder_dim,
        decoder_depth=decoder_depth,
        decoder_heads=decoder_heads,
    )
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        weights = state["state"]["model"] if "state" in state else state
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
        model.load_state_dict(weights)
    model.train().to(device)
    images = _load_images(data, split, img_size, batch, seed).to(device)
    tap = get_feature_tap(model)
    tap.request_blocks([reference, target])
    start = time.perf_counter()
    tap.arm()
    outputs = model((images, torch.zeros(batch, dtype=torch.long, device=device)))
    tap.disarm()
    x = tap.block_features(reference)[0]
    y = tap.block_features(target)[0]
    mae = model.loss(outputs, (images, None))["mae"]
    ours = magma_loss(x, y)
    with torch.no_grad():
        original, original_gamma = original_magma_term(x.detach(), y.detach())
        original_half, _ = original_magma_term(x.detach(), y.detach(), half_products=True)
    result: dict[str, Any] = {
        "encoder": encoder,
        "img_size": img_size,
        "patch_size": patch_size,
        "batch": batch,
        "width": int(y.shape[1]),
        "checkpoint": checkpoint,
        "reference": reference,
        "target": target,
        "ours": float(ours),
        "original_fp32": float(original),
        "original_fp16": float(original_half),
        "original_gamma": float(original_gamma),
        # the original forms trace(Y^T L Y) before dividing by B^2: in float16 it overflows beyond 65504
        "trace_value": float(ours) * batch**2,
        "ratio_original_fp32_to_ours": float(original) / float(ours),
        "ratio_original_fp16_to_ours": float(original_half) / float(ours),
        "mae_loss": float(mae),
        "term_over_mae": float(ours) / float(mae),
        "anatomy": term_anatomy(x.cpu(), y.cpu()),
    }
    if torch.device(device).type == "cuda":
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            autocast_term, _ = original_magma_term(x.detach(), y.detach())
        result["original_cuda_autocast"] = float(autocast_term)
        result["original_cuda_autocast_dtype"] = str(autocast_term.dtype)
    if grads:
        params = [p for p in model.encoder.parameters() if p.requires_grad]
        result["grad_norm_mae"] = _grad_norm(mae, params)
        result["grad_norm_magma"] = _grad_norm(ours, params)
        result["grad_ratio_magma_to_mae"] = result["grad_norm_magma"] / result["grad_norm_mae"]
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _print_magnitude(result: dict[str, Any]) -> None:
    print(
        f"{result['encoder']} at {result['img_size']} px, patch {result['patch_size']}, B = {result['batch']}, "
        f"D = {result['width']}, blocks {result['reference']} -> {result['target']}, "
        f"{'checkpoint ' + result['checkpoint'] if result['checkpoint'] else 'random init'}"
    )
    print(f"  ours R(X, Y)                 {result['ours']:.6g}")
    print(
        f"  original formula, fp32       {result['original_fp32']:.6g}   "
        f"ratio {result['ratio_original_fp32_to_ours']:.6f}"
    )
    print(
        f"  original formula, fp16 prod. {result['original_fp16']:.6g}   "
        f"ratio {result['ratio_original_fp16_to_ours']:.6f}"
    )
    print(
        f"  trace(Y^T L Y) = R B^2 = {result['trace_value']:.6g} "
        f"(float16 overflows beyond {torch.finfo(torch.float16).max:g})"
    )
    if "original_cuda_autocast" in result:
        print(
            f"  original formula, CUDA autocast fp16 {result['original_cuda_autocast']:.6g} "
            f"({result['original_cuda_autocast_dtype']})"
        )
    print(f"  MAE loss                     {result['mae_loss']:.4f}   R / MAE = {result['term_over_mae']:.4g}")
    if "grad_norm_mae" in result:
        print(
            f"  encoder gradient norm: MAE {result['grad_norm_mae']:.4g}, MAGMA (lambda 1) "
            f"{result['grad_norm_magma']:.4g}, ratio {result['grad_ratio_magma_to_mae']:.4g}"
        )
    a = result["anatomy"]
    print(
        f"  gamma {a['gamma']:.4g}; mean D2 / gamma {a['d2_mean_over_gamma']:.3g}; mean W {a['mean_affinity']:.3g}; "
        f"degree mean {a['mean_degree']:.3g}, min {a['min_degree']:.3g} (eps {a['eps']:g})"
    )
    print(
        f"  ||Y|| rows {a['target_norm']:.4g} (batch mean {a['target_mean_norm']:.4g}, "
        f"spread {a['target_spread']:.4g}); ||X|| rows {a['reference_norm']:.4g}"
    )
    print(
        f"  R parts: batch mean {a['mean_part']:.4g}, cross {a['cross_part']:.4g}, centred {a['centred_part']:.4g}; "
        f"with L = I: {a['identity_value']:.4g} (Rayleigh quotient {a['rayleigh']:.4f})"
    )


# ---------------------------------------------------------------------------------------------- metrics files
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _add_row(steps: dict[int, dict[str, float]], row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object per step, got {type(row).__name__}")
    step = row.get("step", row.get("batch"))
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: each row needs an integer 'step' (or 'batch'), got {step!r}")
    values = {k: v for k, v in ((k, _number(v)) for k, v in row.items() if k not in ("step", "batch")) if v is not None}
    steps.setdefault(step, {}).update(values)


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """Per-step metrics of one run: ``{step: {metric: value}}``, steps ascending.

    Accepts JSONL (one object per line with ``step`` or ``batch``), a JSON list of such objects, a JSON object with
    a ``metrics`` list of them, or Composer ``FileLogger`` text. Non-numeric values are ignored.

    Raises:
        ValueError: the file is none of these (the message names the file and the line).
    """
    path = Path(path)
    text = path.read_text()
    steps: dict[int, dict[str, float]] = {}
    stripped = text.lstrip()
    if stripped.startswith("[metric]") or "\n[metric][batch=" in text or stripped.startswith("[hyperparameter]"):
        for line in text.splitlines():
            if not line.startswith("[metric][batch="):
                continue
            head, _, rest = line.partition("]: ")
            name, sep, value = rest.rpartition(": ")
            try:
                step = int(head[len("[metric][batch=") :])
                number_value = float(value.strip())
            except ValueError:
                continue  # a non-numeric metric (a string, a tensor shape)
            if sep:
                steps.setdefault(step, {})[name] = number_value
        if not steps:
            raise ValueError(f"{path}: a Composer FileLogger file without numeric [metric] lines")
        return dict(sorted(steps.items()))
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        for i, row in enumerate(whole):
            _add_row(steps, row, f"{path} item {i}")
    elif isinstance(whole, dict) and isinstance(whole.get("metrics"), list):
        for i, row in enumerate(whole["metrics"]):
            _add_row(steps, row, f"{path} metrics item {i}")
    elif isinstance(whole, dict):
        _add_row(steps, whole, f"{path} line 1")
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path} line {number}: not JSON ({e.msg}); expected JSONL rows, a JSON list or FileLogger text"
                ) from None
            _add_row(steps, row, f"{path} line {number}")
    if not steps:
        raise ValueError(f"{path}: no per-step metrics found")
    return dict(sorted(steps.items()))


#: the panels of :func:`plot_metrics`: (title, metric names tried in order, log scale)
PLOTTED: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("MAGMA term R (unweighted)", ("magma/term",), True),
    ("lambda (MAGMA weight)", ("magma/weight",), False),
    ("||Y|| (target rows, mean)", ("magma/target_norm",), True),
    ("||Y - mean(Y)|| (target spread)", ("magma/target_spread",), True),
    ("||X|| (reference rows, mean)", ("magma/reference_norm",), True),
    ("gamma", ("magma/gamma",), True),
    ("mean W (off-diagonal)", ("magma/mean_affinity",), True),
    ("Rayleigh quotient R B^2 / ||Y||^2", ("magma/rayleigh",), False),
    ("MAE loss", ("loss/train/mae",), False),
    ("uniformity value", ("uniformity/term",), False),
    ("learning rate", ("lr-AdamW/group0", "lr-DecoupledAdamW/group0", "lr"), True),
)


def plot_metrics(
    paths: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    name: str = "magma_metrics.png",
    title: str | None = None,
) -> Path:
    """Plots the :data:`PLOTTED` metrics of several runs, overlaid, into one PNG (panels without data are dropped).

    Args:
        paths: metrics files (see :func:`read_metrics`), one per run.
        out: the output folder (created).
        labels: one legend label per run (default: the file names without suffix).
        name: the PNG's file name.
        title: a figure title.

    Returns:
        Path: the PNG written.

    Raises:
        ValueError: the labels do not match the runs, or no run has any plotted metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [Path(p).stem for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} labels for {len(paths)} metrics files")
    runs = [read_metrics(p) for p in paths]
    panels = []
    for panel_title, names, log in PLOTTED:
        series = []
        for run in runs:
            metric = next((n for n in names if any(n in row for row in run.values())), None)
            points = [(s, row[metric]) for s, row in run.items() if metric and metric in row]
            series.append(points)
        if any(series):
            panels.append((panel_title, series, log))
    if not panels:
        wanted = ", ".join(n for _, names, _ in PLOTTED for n in names)
        raise ValueError(f"none of the runs {list(map(str, paths))} logged any of: {wanted}")
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel_title, series, log) in zip(axes.flat, panels):
        for i, points in enumerate(series):
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=labels[i], color=colours[i % len(colours)], linewidth=1.2)
        positive = all(v > 0 for points in series for _, v in points)
        if log and positive:
            ax.set_yscale("log")
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


# ---------------------------------------------------------------------------------------------- trace
class JsonlMetrics(LoggerDestination):
    """A Composer logger destination that appends every numeric metric as a JSONL row ``{"step": s, name: v}``.

    Args:
        path (Path): the file to write (replaced).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.file = path.open("w")

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if _number(value) is not None:
                row[key] = float(value)
        if len(row) > 1:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close_file(self) -> None:
        self.file.close()


def trace_recipe(recipe: str | Path, out: str | Path, overrides: Iterable[str] = ()) -> Path:
    """Trains ``recipe`` (with ``key=value`` overrides) in this process and writes its per-step metrics as JSONL.

    Nothing is saved but the metrics file (``save_folder``, ``export_encoder`` and the callbacks' pictures are
    switched off by overrides unless given).

    Returns:
        Path: the JSONL file.
    """
    from magma_composer.config import load_config
    from magma_composer.train import build_trainer

    given = list(overrides)
    keys = {item.split("=", 1)[0] for item in given}
    defaults = {"save_folder": "null", "autoresume": "false", "export_encoder": "null", "progress_bar": "false"}
    given += [f"{k}={v}" for k, v in defaults.items() if k not in keys]
    cfg = load_config(recipe, given)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = JsonlMetrics(out)
    trainer = build_trainer(cfg)
    # an extra destination beside the recipe's: the Logger forwards every metric with its step
    trainer.logger.destinations = (*trainer.logger.destinations, sink)
    try:
        trainer.fit()
    finally:
        sink.close_file()
        trainer.close()
    return out


# ---------------------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magma_diagnostics", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mag = sub.add_parser("magnitude", help="our term vs the original formula on the same features")
    mag.add_argument("--encoder", default="vit_base_patch16_224", help="timm ViT name or JSON sizes")
    mag.add_argument("--img-size", type=int, default=224)
    mag.add_argument("--patch-size", type=int, default=16)
    mag.add_argument("--batch", type=int, default=64)
    mag.add_argument("--data", default="data/cifar10-mds", help="an MDS data set folder")
    mag.add_argument("--split", default="train")
    mag.add_argument("--checkpoint", default=None, help="a Composer checkpoint of a ComposerMAE of these sizes")
    mag.add_argument("--reference", type=int, default=10)
    mag.add_argument("--target", type=int, default=-1)
    mag.add_argument("--decoder-dim", type=int, default=512)
    mag.add_argument("--decoder-depth", type=int, default=8)
    mag.add_argument("--decoder-heads", type=int, default=16)
    mag.add_argument("--seed", type=int, default=0)
    mag.add_argument("--no-grads", action="store_true", help="skip the two gradient norms (saves two backwards)")
    mag.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the forward")
    mag.add_argument("--json", default=None, help="also write the result to this JSON file")
    tr = sub.add_parser("trace", help="train a recipe a few steps, writing per-step metrics as JSONL")
    tr.add_argument("recipe")
    tr.add_argument("--out", required=True, help="the JSONL file to write")
    tr.add_argument("overrides", nargs="*", help="key.path=value overrides of the recipe")
    pl = sub.add_parser("plot", help="plot per-step metrics of one or more runs into a PNG")
    pl.add_argument("metrics", nargs="+", help="metrics files (JSONL, JSON list, or Composer FileLogger text)")
    pl.add_argument("--out", default="docs/magma", help="output folder")
    pl.add_argument("--labels", default=None, help="comma-separated legend labels, one per file")
    pl.add_argument("--label", action="append", default=[], help="one legend label (repeat once per file)")
    pl.add_argument("--name", default="magma_metrics.png", help="PNG file name")
    pl.add_argument("--title", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # trace's overrides may come after --out, which argparse does not gather into the positional list
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "trace" or any(item.startswith("-") or "=" not in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "trace":
        args.overrides = [*args.overrides, *extra]
    if args.command == "magnitude":
        for flag, value in (("--img-size", args.img_size), ("--patch-size", args.patch_size), ("--batch", args.batch)):
            if value < 1 or (flag == "--batch" and value < 3):
                raise SystemExit(f"{flag} must be a positive integer (--batch at least 3), got {value}")
        if not Path(args.data).is_dir():
            raise SystemExit(f"--data {args.data}: no such folder (an MDS data set with a {args.split!r} split)")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA GPU here; use --device cpu")
        result = measure_magnitude(
            encoder=args.encoder,
            img_size=args.img_size,
            patch_size=args.patch_size,
            batch=args.batch,
            data=args.data,
            split=args.split,
            checkpoint=args.checkpoint,
            reference=args.reference,
            target=args.target,
            decoder_dim=args.decoder_dim,
            decoder_depth=args.decoder_depth,
            decoder_heads=args.decoder_heads,
            seed=args.seed,
            grads=not args.no_grads,
            device=args.device,
        )
        _print_magnitude(result)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "trace":
        path = trace_recipe(args.recipe, args.out, args.overrides)
        print(f"wrote {path}")
    else:
        if args.labels and args.label:
            raise SystemExit("plot: give --labels or --label, not both")
        labels = args.labels.split(",") if args.labels else (args.label or None)
        try:
            path = plot_metrics(args.metrics, args.out, labels=labels, name=args.name, title=args.title)
        except (OSError, ValueError) as e:
            raise SystemExit(f"plot: {e}") from None
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
