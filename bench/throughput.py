"""Training-step throughput and model FLOP utilisation (MFU) of ComposerMAE, bare and through the Trainer.

Measures, in one process, the images per second of a full training step (forward, loss, backward,
optimizer step) of the MAE, with and without MAGMA + uniformity, and reports the MFU against the
device's peak dense bf16 throughput. FLOPs are counted analytically (matrix products only: 2 per
multiply-add; backward = 2 x forward), the usual convention for MFU.

Examples::

    python bench/throughput.py                                  # GPU: ViT-B/16, 224 px, batch 256, bf16
    python bench/throughput.py --encoder vit_tiny_patch16_224 --img-size 32 --patch-size 4 --batch 64  # CPU
    python bench/throughput.py --trainer                         # also through composer.Trainer
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from magma_composer.models import ComposerMAE


def vit_flops_per_token(width: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one pre-norm transformer block, per token (qkv, proj, MLP, attention products)."""
    linear = 2 * (4 * width * width + 2 * mlp_ratio * width * width)
    attention = 2 * 2 * tokens * width
    return linear + attention


def mae_step_flops(model: ComposerMAE, batch: int, mask_ratio: float | None = None) -> float:
    """Analytic FLOPs of one training step (3 x forward) of ``model`` on ``batch`` images."""
    net = model.net
    enc = net.encoder
    n = net.num_patches
    ratio = model.mask_ratio if mask_ratio is None else mask_ratio
    visible = n - int(round(n * ratio)) if model.drops_patches else n
    d, dd = enc.embed_dim, net.decoder_embed.out_features
    patch_dim = net.patch_size**2 * net.in_chans
    fwd = batch * (
        2 * n * patch_dim * d  # patch embedding (all patches are embedded before dropping)
        + len(enc.blocks) * (visible + 1) * vit_flops_per_token(d, visible + 1)
        + (visible + 1) * 2 * d * dd  # decoder embed
        + len(net.decoder_blocks) * (n + 1) * vit_flops_per_token(dd, n + 1)
        + (n + 1) * 2 * dd * patch_dim  # prediction head
    )
    return 3.0 * fwd


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def build(args, algorithms: str):
    model = ComposerMAE(args.encoder, img_size=args.img_size, patch_size=args.patch_size)
    algos = []
    if "magma" in algorithms:
        from magma_composer.algorithms import MAGMA

        depth = len(model.encoder.blocks)
        algos.append(MAGMA(reference_layers=[depth - 2], target_layer=depth - 1, weight=1.0))
    if "uniformity" in algorithms:
        from magma_composer.algorithms import Uniformity

        algos.append(Uniformity(weight=0.01))
    return model, algos


def bare_step_fn(model, algos, args, device):
    """A step that fires the algorithms' events as the Trainer does, without the Trainer."""
    from composer.core import Event, State
    from composer.loggers import Logger

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    state = State(model=model, rank_zero_seed=0, run_name="bench", device=None, max_duration="1ep", algorithms=algos)
    state.optimizers = opt
    logger = Logger(state, [])
    for a in algos:
        a.apply(Event.INIT, state, logger)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    batch = (images, torch.zeros(args.batch, dtype=torch.long, device=device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def fire(event):
        for a in algos:
            if a.match(event, state):
                a.apply(event, state, logger)

    def step():
        state.batch = batch
        fire(Event.BEFORE_TRAIN_BATCH)
        fire(Event.BEFORE_FORWARD)
        with autocast:
            state.outputs = model(state.batch)
        fire(Event.AFTER_FORWARD)
        with autocast:
            state.loss = model.loss(state.outputs, state.batch)
        fire(Event.AFTER_LOSS)
        total = sum(state.loss.values())
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        fire(Event.BATCH_END)

    return step


def time_steps(step, n: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="vit_base_patch16_224" if cuda else "vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224 if cuda else 32)
    p.add_argument("--patch-size", type=int, default=16 if cuda else 4)
    p.add_argument("--batch", type=int, default=256 if cuda else 64)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    p.add_argument("--steps", type=int, default=10 if cuda else 3)
    p.add_argument("--repeats", type=int, default=5 if cuda else 3)
    p.add_argument("--configs", default="mae,mae+magma+uniformity")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    configs = args.configs.split(",")
    steps, flops = {}, {}
    for name in configs:
        model, algos = build(args, name)
        model.to(device)
        flops[name] = mae_step_flops(model, args.batch)
        steps[name] = bare_step_fn(model, algos, args, device)
        for _ in range(3):  # warm-up
            steps[name]()
    times = {name: [] for name in configs}
    for _ in range(args.repeats):  # interleaved: round-robin over the configurations
        for name in configs:
            times[name].append(time_steps(steps[name], args.steps, device))
    peak = peak_flops()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"device {device_name}; {args.encoder} {args.img_size}px/{args.patch_size}, batch {args.batch}, "
        f"{args.precision}; median of {args.repeats} x {args.steps} steps"
    )
    results = {}
    base = statistics.median(times[configs[0]])
    for name in configs:
        t = statistics.median(times[name])
        row = {
            "step_s": t,
            "images_per_s": args.batch / t,
            "ratio_to_first": t / base,
            "tflops": flops[name] / t / 1e12,
        }
        if peak:
            row["mfu"] = flops[name] / t / peak
        results[name] = row
        mfu = f"  MFU {row['mfu']:.1%}" if peak else ""
        print(
            f"{name:28s} {t * 1e3:8.1f} ms/step  {row['images_per_s']:8.1f} img/s  {row['tflops']:7.1f} TFLOP/s"
            f"{mfu}  ratio {row['ratio_to_first']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
