"""Train several recipes with the same budget and compare their kNN and linear-probe top-1 (docs/results.md).

Each recipe is trained in turn, in this process, with the same overrides (budget, data, model size),
and its KNNMonitor measures the encoder before and after training on the same data (kNN, and the fast
linear probe with ``callbacks.knn_monitor.linear_probe=true``). Prints a Markdown table and optionally
writes the numbers as JSON.

Example (the CIFAR-10 comparison of docs/results.md)::

    python experiments/compare_knn.py yamls/cifar10/{mae,m-mae,u-mae,mu-mae}-vit-tiny.yaml \\
        --set max_duration=6ep train_data.max_samples=10000 ...
"""

from __future__ import annotations

import argparse
import json
import time

from magma_composer.config import load_config
from magma_composer.train import build_trainer


def run(recipe: str, overrides: list[str]) -> dict:
    cfg = load_config(recipe, overrides)
    start = time.perf_counter()
    trainer = build_trainer(cfg)
    trainer.fit()
    knn = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "KNNMonitor")
    history = {label: res for label, res in knn.history}
    result = {
        "recipe": recipe,
        "run_name": cfg.run_name,
        "algorithms": sorted(cfg.algorithms),
        "batches": int(trainer.state.timestamp.batch),
        "seconds": time.perf_counter() - start,
        "knn": history,
        "linear_probe": dict(knn.probe_history),
    }
    trainer.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--set", nargs="*", default=[], help="overrides applied to every recipe (key.path=value)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    results = []
    for recipe in args.recipes:
        results.append(run(recipe, args.set))
        print(json.dumps(results[-1]), flush=True)
    ks = sorted({int(k) for r in results for res in r["knn"].values() for k in res})
    probe = all(r["linear_probe"] for r in results)
    heads = [f"kNN@{k} init -> final" for k in ks] + (["linear probe init -> final"] if probe else [])
    print("\n| recipe | algorithms | batches | minutes | " + " | ".join(heads) + " |")
    print("|---|---|---|---|" + "---|" * len(heads))
    for r in results:
        cells = [f"{r['knn']['init'][k]:.2f} -> {r['knn']['final'][k]:.2f}" for k in ks]
        if probe:
            cells.append(f"{r['linear_probe']['init']:.2f} -> {r['linear_probe']['final']:.2f}")
        algos = " + ".join(["mae", *r["algorithms"]])
        print(f"| {r['recipe']} | {algos} | {r['batches']} | {r['seconds'] / 60:.1f} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"overrides": args.set, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
