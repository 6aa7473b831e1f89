"""``gather=True`` under DDP on 2 CPU ranks equals one process on the concatenated batch.

Runs ``tests/scripts/gather_check.py`` twice: with the Composer launcher on 2 ranks (gloo), and in
this process on the whole batch. MAGMA and uniformity gather the features with gradient
(``magma_composer.distributed``), so every rank computes the term of the global batch; the loss
values and every parameter's gradient (after DDP's averaging) must equal the single-process ones.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "gather_check.py"
COMPOSER = Path(sys.executable).parent / "composer"


def _run(cmd, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {e.timeout} s (a hung collective?)")
    assert proc.returncode == 0 and out.exists(), f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gathered_terms_and_gradients_match_a_single_process(tmp_path):
    if not COMPOSER.exists():
        pytest.skip(f"the composer launcher is not installed beside {sys.executable}")
    spec = importlib.util.spec_from_file_location("gather_check", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        script.run(str(tmp_path / "single.pt"), samples=16, parts=2)
    finally:
        torch.set_num_threads(threads)
    single = torch.load(tmp_path / "single.pt", weights_only=False)
    ddp = _run(
        [str(COMPOSER), "-n", "2", "--master_port", str(free_port()), str(SCRIPT), "--out", str(tmp_path / "ddp.pt")],
        tmp_path / "ddp.pt",
    )
    assert ddp["world_size"] == 2 and ddp["local_batch"] == 8 and single["local_batch"] == 16

    # every rank computes the global terms; the per-rank MAE losses average to the global one
    for key in ("magma", "uniformity"):
        assert ddp["losses"][key] == pytest.approx(single["losses"][key], rel=1e-6), key
    for key in ("mae", "magma", "uniformity"):
        assert ddp["mean_losses"][key] == pytest.approx(single["losses"][key], rel=1e-6), key
    # without gathering, a rank's term would be a different number (the test can see the difference)
    assert abs(ddp["local_magma"] - single["losses"]["magma"]) > 1e-3 * abs(single["losses"]["magma"])

    assert ddp["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 50
    for name, expected in single["grads"].items():
        scale = expected.abs().max().clamp_min(1e-12)
        assert (ddp["grads"][name] - expected).abs().max() / scale < 1e-6, name
