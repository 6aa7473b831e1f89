"""Train-step overhead of MAGMA and uniformity over a plain MAE, measured in one process with real Trainers.

Three Composer Trainers share one process: MAE, MAE + MAGMA, MAE + MAGMA + uniformity (same model
initialisation, same batch). They take turns (round-robin, ``--steps`` batches each per turn, for
``--repeats`` turns after a warm-up turn; the order rotates every turn), so drifts in machine load hit
all three alike. A callback times each train step from ``BATCH_START`` to ``BATCH_END`` (forward, loss,
the algorithms' event handlers, backward, optimiser step; with a CUDA synchronisation at both ends on
a GPU), in wall time and, on CPU, in process CPU time.

Printed for each configuration: the median and minimum step time and three ratios to MAE: of the
medians, the median of the per-turn ratios (each turn's configurations ran back to back, so this
pairs measurements taken under the same load), and, on CPU, of the median CPU times (less sensitive to
other processes competing for the cores).

Configurations (the defaults follow the device):

* CPU: ViT-T (192 wide, 12 blocks, 3 heads), 32 px, patch 4, batch 64, fp32, MAGMA on blocks 10 -> 11.
* GPU: ViT-B/16 (768 wide, 12 blocks, 12 heads), 224 px, batch 256, bf16 autocast, MAGMA on 10 -> 11.

Both use the published decoder (512 wide, 8 blocks, 16 heads) and AdamW. Goal: ratio <= 1.05 on CPU,
<= 1.03 on GPU.

Usage::

    OMP_NUM_THREADS=2 python bench/overhead.py --repeats 8 --steps 1
    python bench/overhead.py --device cuda --repeats 10 --steps 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch
from composer import Callback, Trainer

from magma_composer.algorithms.magma import MAGMA
from magma_composer.algorithms.uniformity import Uniformity
from magma_composer.models import ComposerMAE

PRESETS = {
    "cpu": {"encoder": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "batch_size": 64, "precision": "fp32"},
    "cuda": {
        "encoder": "vit_base_patch16_224",
        "img_size": 224,
        "patch_size": 16,
        "batch_size": 256,
        "precision": "amp_bf16",
    },
}


class StepTimer(Callback):
    """Wall and process CPU time of each train step, BATCH_START to BATCH_END (GPU synchronised at both ends)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def _now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def batch_start(self, state, logger) -> None:
        self._start = self._now()

    def batch_end(self, state, logger) -> None:
        wall, cpu = self._now()
        self.wall.append(wall - self._start[0])
        self.cpu.append(cpu - self._start[1])


def build_trainer(name: str, algorithms: list, preset: dict, device: str, batches: list) -> tuple[Trainer, StepTimer]:
    torch.manual_seed(0)
    model = ComposerMAE(preset["encoder"], img_size=preset["img_size"], patch_size=preset["patch_size"])
    timer = StepTimer(cuda=device == "cuda")
    trainer = Trainer(
        model=model,
        train_dataloader=batches,
        device_train_microbatch_size=preset["batch_size"],
        algorithms=algorithms,
        callbacks=[timer],
        optimizers=torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05),
        precision=preset["precision"],
        device="gpu" if device == "cuda" else "cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        run_name=f"overhead-{name}",
        seed=0,
    )
    return trainer, timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=8, help="timed round-robin turns")
    parser.add_argument("--steps", type=int, default=1, help="train steps per configuration per turn")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    preset = dict(PRESETS[device])
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    g = torch.Generator().manual_seed(0)
    images = torch.randn(preset["batch_size"], 3, preset["img_size"], preset["img_size"], generator=g).to(device)
    labels = torch.zeros(preset["batch_size"], dtype=torch.long, device=device)
    batches = [(images, labels)] * args.steps  # one "epoch" per turn; the same batch every step

    configs = {
        "MAE": [],
        "MAE+MAGMA": [MAGMA(reference_layers=[10], target_layer=11)],
        "MAE+MAGMA+uniformity": [MAGMA(reference_layers=[10], target_layer=11), Uniformity(weight=0.01)],
    }
    trainers = {name: build_trainer(name, algos, preset, device, batches) for name, algos in configs.items()}
    names = list(trainers)
    turns: list[dict[str, tuple[float, float]]] = []  # per turn: median (wall, cpu) step time of each config
    for turn in range(args.repeats + 1):  # turn 0 warms up (allocator, kernels, caches) and is discarded
        order = names[turn % len(names) :] + names[: turn % len(names)]
        for name in order:
            trainer, timer = trainers[name]
            if turn == 1:
                timer.wall.clear()
                timer.cpu.clear()
            trainer.fit(duration=f"{args.steps}ba")
        if turn:
            turns.append(
                {
                    name: (
                        statistics.median(trainers[name][1].wall[-args.steps :]),
                        statistics.median(trainers[name][1].cpu[-args.steps :]),
                    )
                    for name in names
                }
            )

    base_wall = statistics.median(trainers["MAE"][1].wall)
    base_cpu = statistics.median(trainers["MAE"][1].cpu)
    print(
        f"device={device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}), "
        f"threads={torch.get_num_threads()}, preset={preset}, repeats={args.repeats}, steps/turn={args.steps}"
    )
    results = {}
    for name, (_, timer) in trainers.items():
        median, fastest = statistics.median(timer.wall), min(timer.wall)
        paired = statistics.median(t[name][0] / t["MAE"][0] for t in turns)
        results[name] = {
            "median_s": median,
            "min_s": fastest,
            "n": len(timer.wall),
            "ratio_of_medians": median / base_wall,
            "median_paired_ratio": paired,
            "per_turn_wall_s": [t[name][0] for t in turns],
            "per_turn_cpu_s": [t[name][1] for t in turns],
        }
        line = (
            f"{name:22s} median {median * 1e3:9.2f} ms  min {fastest * 1e3:9.2f} ms  (n={len(timer.wall)})  "
            f"ratio {median / base_wall:.4f}  paired {paired:.4f}"
        )
        if device == "cpu":
            cpu_ratio = statistics.median(timer.cpu) / base_cpu
            results[name]["cpu_time_ratio"] = cpu_ratio
            line += f"  cpu-time {cpu_ratio:.4f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device, "preset": preset, "threads": torch.get_num_threads(), "results": results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
