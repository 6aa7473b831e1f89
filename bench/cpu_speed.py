"""CPU training speed: bf16 autocast against float32, torch threads against loader workers, torch.compile.

Three measurements, each side by side in one run so that machine load hits every configuration alike:

``precision``
    Real Composer Trainers in one process, each a ViT-T/4 MAE at 32 px (batch 64, the regularisers of MU-MAE on
    request) with the published 512 x 8 decoder or a 128 x 2 one, in float32 or under the package's CPU bf16
    autocast (:func:`magma_composer.precision.cpu_autocast`, what ``precision: amp_bf16`` does on a CPU), with 1 or
    all torch threads. They take turns (round-robin, the order rotating every turn; the first turn warms up and
    is discarded); each turn times ``--steps`` train steps from ``BATCH_START`` to ``BATCH_END``. Printed: the
    median step per configuration and, per decoder, the paired ratios (median over turns of the per-turn ratio)
    fp32 / bf16 and 1 thread / all threads.

``compile``
    The same model and batch in bf16, eager against ``torch.compile`` (inductor), round-robin after compiling;
    the compile time is printed separately (it is paid once per run).

``loader``
    Whole training runs from a recipe (``magma_composer.train.build_trainer``, the MU-MAE CIFAR-10 settings at
    ViT-T/4 with a 128 x 2 decoder, batch 128) on real MDS shards (``--data``, default ``data/cifar10-mds``, else
    the demo data), for each (torch threads, loader workers) pair in ``--grid``: the median step time over
    ``--loader-steps`` steps after two warm-up steps, the pairs run in the order given and then reversed, the two
    medians averaged.

Usage::

    python bench/cpu_speed.py precision --repeats 4
    python bench/cpu_speed.py compile --repeats 4
    python bench/cpu_speed.py loader --data data/cifar10-mds
    python bench/cpu_speed.py all --json docs/bench-cpu-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from composer import Callback, Trainer

from magma_composer.algorithms.magma import MAGMA
from magma_composer.algorithms.uniformity import Uniformity
from magma_composer.models import ComposerMAE
from magma_composer.precision import cpu_autocast, cpu_supports_bf16

ENCODER = {"embed_dim": 192, "depth": 12, "num_heads": 3}  # ViT-T
DECODERS = {"512x8": (512, 8, 16), "128x2": (128, 2, 4)}


class StepTimer(Callback):
    """Wall time of each train step, BATCH_START to BATCH_END."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self._start = 0.0

    def batch_start(self, state, logger) -> None:
        self._start = time.perf_counter()

    def batch_end(self, state, logger) -> None:
        self.wall.append(time.perf_counter() - self._start)


def make_model(decoder: str) -> ComposerMAE:
    torch.manual_seed(0)
    dim, depth, heads = DECODERS[decoder]
    return ComposerMAE(
        ENCODER, img_size=32, patch_size=4, decoder_dim=dim, decoder_depth=depth, decoder_heads=heads, mask_seed=0
    )


def make_trainer(model: ComposerMAE, batches: list, regularisers: bool, name: str) -> tuple[Trainer, StepTimer]:
    timer = StepTimer()
    algorithms = [MAGMA(reference_layers=[10], target_layer=11), Uniformity(weight=0.01)] if regularisers else []
    trainer = Trainer(
        model=model,
        train_dataloader=batches,
        device_train_microbatch_size=len(batches[0][0]),
        algorithms=algorithms,
        callbacks=[timer],
        optimizers=torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05),
        precision="fp32",  # Composer's; the model autocasts itself (as magma_composer.train does on a CPU)
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        run_name=f"cpu-speed-{name}",
        seed=0,
    )
    return trainer, timer


def batches_of(batch_size: int, steps: int) -> list:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=g)
    return [(images, torch.zeros(batch_size, dtype=torch.long))] * steps


def round_robin(runs: dict[str, tuple], repeats: int, steps: int) -> dict[str, list[float]]:
    """``runs``: name -> (trainer, timer, threads). Returns name -> the per-turn median step times."""
    names = list(runs)
    per_turn: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(repeats + 1):  # turn 0 warms up and is discarded
        order = names[turn % len(names) :] + names[: turn % len(names)]
        for name in order:
            trainer, timer, threads = runs[name]
            torch.set_num_threads(threads)
            trainer.fit(duration=f"{steps}ba")
            if turn:
                per_turn[name].append(statistics.median(timer.wall[-steps:]))
        print(f"  turn {turn}/{repeats} done", file=sys.stderr, flush=True)
    return per_turn


def paired(per_turn: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(per_turn[num], per_turn[den]))


def bench_precision(args: argparse.Namespace) -> dict:
    cores = os.cpu_count() or 1
    batches = batches_of(args.batch_size, args.steps)
    runs = {}
    for decoder in DECODERS:
        for precision in ("fp32", "amp_bf16"):
            for threads in sorted({1, cores}):
                name = f"{decoder}/{precision}/{threads}t"
                model = make_model(decoder)
                cpu_autocast(model, precision)
                trainer, timer = make_trainer(model, batches, args.regularisers, name.replace("/", "-"))
                runs[name] = (trainer, timer, threads)
    per_turn = round_robin(runs, args.repeats, args.steps)
    result = {"median_step_s": {name: statistics.median(v) for name, v in per_turn.items()}, "ratios": {}}
    for name, value in result["median_step_s"].items():
        print(f"{name:24s} median step {value:7.3f} s")
    for decoder in DECODERS:
        ratios = {
            f"{decoder} fp32/bf16 ({cores}t)": paired(
                per_turn, f"{decoder}/fp32/{cores}t", f"{decoder}/amp_bf16/{cores}t"
            ),
            f"{decoder} fp32/bf16 (1t)": paired(per_turn, f"{decoder}/fp32/1t", f"{decoder}/amp_bf16/1t"),
            f"{decoder} 1t/{cores}t (bf16)": paired(per_turn, f"{decoder}/amp_bf16/1t", f"{decoder}/amp_bf16/{cores}t"),
            f"{decoder} fp32 1t / bf16 {cores}t": paired(
                per_turn, f"{decoder}/fp32/1t", f"{decoder}/amp_bf16/{cores}t"
            ),
        }
        for key, value in ratios.items():
            print(f"  {key:34s} {value:.2f}x")
        result["ratios"].update(ratios)
    result["per_turn_s"] = per_turn
    return result


def bench_compile(args: argparse.Namespace) -> dict:
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    batches = batches_of(args.batch_size, args.steps)
    runs = {}
    compile_s = None
    for mode in ("eager", "compiled"):
        model = make_model(args.compile_decoder)
        cpu_autocast(model, "amp_bf16")
        if mode == "compiled":
            model.net = torch.compile(model.net)
        trainer, timer = make_trainer(model, batches, args.regularisers, f"compile-{mode}")
        if mode == "compiled":
            start = time.perf_counter()
            trainer.fit(duration="1ba")  # the first step compiles
            compile_s = time.perf_counter() - start
        runs[mode] = (trainer, timer, cores)
    per_turn = round_robin(runs, args.repeats, args.steps)
    ratio = paired(per_turn, "eager", "compiled")
    medians = {name: statistics.median(v) for name, v in per_turn.items()}
    print(
        f"decoder {args.compile_decoder}, bf16, {cores} threads: eager {medians['eager']:.3f} s, compiled "
        f"{medians['compiled']:.3f} s per step; eager/compiled {ratio:.2f}x; first compiled step {compile_s:.1f} s"
    )
    return {"median_step_s": medians, "eager_over_compiled": ratio, "first_compiled_step_s": compile_s}


def bench_loader(args: argparse.Namespace) -> dict:
    from magma_composer.config import load_config
    from magma_composer.train import build_trainer

    data = args.data if Path(args.data).exists() else "data/demo"
    if not Path(data).exists():
        raise SystemExit(f"no data at {args.data} or data/demo: build the demo data (make demo) or convert CIFAR-10")
    grid = [tuple(int(v) for v in pair.split(",")) for pair in args.grid.split()]
    recipe = Path(__file__).resolve().parents[1] / "yamls" / "cifar10" / "mu-mae-vit-tiny.yaml"
    medians: dict[str, list[float]] = {}
    for threads, workers in grid + grid[::-1]:
        overrides = [
            f"train_data.remote={data}",
            f"train_data.num_workers={workers}",
            f"cpu_threads={threads}",
            "train_data.batch_size=128",
            "device_train_microbatch_size=128",
            "model.decoder_dim=128",
            "model.decoder_depth=2",
            "model.decoder_heads=4",
            f"max_duration={args.loader_steps + 2}ba",
            "eval_data=null",
            "eval_interval=null",
            "save_interval=null",
            "callbacks={}",
            "save_folder=null",
            "autoresume=false",
            "progress_bar=false",
            "log_to_console=false",
            "loggers={}",
            f"run_name=cpu-speed-loader-{threads}t{workers}w",
        ]
        cfg = load_config(str(recipe), overrides)
        trainer = build_trainer(cfg)
        timer = StepTimer()
        trainer.state.callbacks.append(timer)
        trainer.fit()
        trainer.close()
        key = f"{threads}t/{workers}w"
        medians.setdefault(key, []).append(statistics.median(timer.wall[2:]))
        print(f"  threads {threads}, workers {workers}: median step {medians[key][-1]:.3f} s", file=sys.stderr)
    result = {key: statistics.mean(v) for key, v in medians.items()}
    best = min(result.values())
    for key, value in result.items():
        print(f"threads/workers {key:8s} step {value:.3f} s  ({value / best:.2f}x the fastest)")
    return {"data": data, "step_s": result, "runs": medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["precision", "compile", "loader", "all"])
    parser.add_argument("--repeats", type=int, default=4, help="timed round-robin turns")
    parser.add_argument("--steps", type=int, default=1, help="train steps per configuration per turn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--regularisers", action="store_true", help="train MU-MAE (MAGMA 10 -> 11 + uniformity)")
    parser.add_argument("--compile-decoder", choices=list(DECODERS), default="128x2")
    parser.add_argument("--data", default="data/cifar10-mds")
    parser.add_argument("--grid", default="1,1 2,1 2,0 2,2", help="space-separated THREADS,WORKERS pairs")
    parser.add_argument("--loader-steps", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"cpu: {platform.processor() or 'cpu'}, {os.cpu_count()} cores, native bf16: {cpu_supports_bf16()}, "
        f"torch {torch.__version__}"
    )
    results = {}
    for what in ("precision", "compile", "loader") if args.what == "all" else (args.what,):
        print(f"== {what}")
        results[what] = globals()[f"bench_{what}"](args)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
