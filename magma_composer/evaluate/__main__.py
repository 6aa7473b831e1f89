"""Evaluate an encoder: ``python -m magma_composer.evaluate PROTOCOL RECIPE.yaml [key.path=value ...]``.

Protocols:

{protocols}

Recipes with the published settings are in yamls/eval/ ({recipes}). The encoder comes from ``encoder.path``: a
Composer checkpoint of ours, a timm state dict (``export_encoder``, or timm's ``vit_*_patch16_224.mae`` weights as
a local .safetensors / .bin file), or facebookresearch/mae's ``mae_pretrain_vit_*.pth``. For example::

    python -m magma_composer.evaluate linear-fast yamls/eval/linear-fast.yaml \\
        encoder.path=runs/demo/<run>/checkpoints/latest-rank0.pt train_data.remote=data/demo test_data.remote=data/demo

On several processes (each extracts its share of the features, or trains on its share)::

    composer -n 8 -m magma_composer.evaluate linear yamls/eval/linear-mae-vitb16.yaml encoder.path=...

Every key is checked before anything is loaded; a bad one ends the command with one line naming it (set
``MAGMA_COMPOSER_DEBUG=1`` for the traceback). Each evaluation writes a JSON record (``output``, default
runs/eval/<run_name>.json) and prints one line with its top-1 and top-5.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _help() -> str:
    from magma_composer.evaluate.recipe import PROTOCOLS

    width = max(map(len, PROTOCOLS))
    protocols = "\n".join(f"    {name:<{width}}  {text}" for name, text in PROTOCOLS.items())
    folder = Path(__file__).resolve().parents[2] / "yamls" / "eval"
    recipes = ", ".join(sorted(p.name for p in folder.glob("*.yaml"))) if folder.is_dir() else "not found here"
    return __doc__.format(protocols=protocols, recipes=recipes)


def main(argv: list[str] | None = None) -> dict:
    """Entry point; returns the evaluation's record."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        raise SystemExit(0 if argv else 2)
    from magma_composer.config import ConfigError
    from magma_composer.evaluate.recipe import PROTOCOLS, load_eval_config, run_evaluation

    protocol = argv[0]
    try:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)} (see --help)")
        if len(argv) < 2 or "=" in argv[1]:
            raise ConfigError(f"give a recipe after the protocol, e.g. yamls/eval/{protocol}.yaml (see --help)")
        cfg, raw = load_eval_config(protocol, argv[1], argv[2:])
        return run_evaluation(protocol, cfg, raw)
    except ConfigError as exc:
        print(f"magma_composer.evaluate: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
