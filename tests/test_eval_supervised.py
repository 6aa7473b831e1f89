"""run_supervised: each protocol end to end for a few steps on the demo data, the frozen encoder left unchanged,
Composer's MixUp / CutMix / LabelSmoothing with the soft-target loss, label and class errors."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from composer.algorithms import CutMix, LabelSmoothing, MixUp
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.data.loader import build_image_dataloader
from magma_composer.evaluate.classifier import EncoderClassifier, EvalDataError
from magma_composer.evaluate.optim import build_eval_optimizer
from magma_composer.evaluate.supervised import run_supervised
from magma_composer.models import ComposerMAE
from magma_composer.train import build_scheduler
from tests.conftest import TINY_MODEL, free_port


def encoder(seed: int = 0):
    torch.manual_seed(seed)
    return ComposerMAE(**TINY_MODEL, mask_seed=0).encoder


def loaders(remote: Path, batch: int = 32, **train_options):
    common = {"remote": str(remote), "image_size": 32, "num_workers": 0}
    train = build_image_dataloader(batch, split="train", train=True, **common, **train_options)
    test = build_image_dataloader(batch, split="test", train=False, **common)
    return train, test


def check_result(result: dict, evaluations: int) -> None:
    history = result["history"]
    assert result["evaluations"] == len(history) == evaluations
    assert (result["top1"], result["top5"]) == history[-1][1:]
    best = max(h[1] for h in history)
    assert result["best_top1"] == best and result["best_at"] == next(h[0] for h in history if h[1] == best)
    for _, top1, top5 in history:
        assert 0.0 <= top1 <= top5 <= 100.0
    assert result["seconds"] > 0


@pytest.mark.parametrize(
    ("optimizer", "model_options", "train_options"),
    [
        ({"name": "lars", "base_lr": 0.1}, {"batch_norm": True}, {}),  # MAE's linear probe
        ({"name": "sgd", "base_lr": 0.1}, {}, {"crop_scale": [0.08, 1.0], "hflip": True}),  # PMAE's
        ({"name": "sgd", "base_lr": 0.1}, {"head": "mlp", "mlp_hidden_dim": 32}, {}),  # PMAE's MLP probe
    ],
    ids=["mae-linear", "pmae-linear", "mlp"],
)
def test_probes_train_the_head_and_leave_the_encoder_bit_identical(demo_mds, optimizer, model_options, train_options):
    model = EncoderClassifier(encoder(), num_classes=10, **model_options)
    before = copy.deepcopy(model.encoder.state_dict())
    head_before = copy.deepcopy(model.head.state_dict())
    train, test = loaders(demo_mds, **train_options)
    opt = build_eval_optimizer(model, 32, **optimizer)
    result = run_supervised(model, train, test, opt, build_scheduler("2ba"), "2ep", progress_bar=False, seed=1)
    check_result(result, evaluations=2)
    assert result["steps"] == 10 and result["samples"] == 320  # 160 images, batch 32, 2 epochs
    assert [h[0] for h in result["history"]] == ["1ep", "2ep"]
    after = model.encoder.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())


def test_finetuning_with_layer_decay_drop_path_mixup_cutmix_label_smoothing(demo_mds):
    model = EncoderClassifier(
        encoder(), num_classes=10, pool="mean", fc_norm=True, freeze_encoder=False, drop_path=0.1, head_init_std=2e-5
    )
    before = copy.deepcopy(model.encoder.state_dict())
    train, test = loaders(demo_mds, batch=16, auto_augment="rand-m9-mstd0.5-inc1", random_erase=0.25)
    opt = build_eval_optimizer(model, 16, name="adamw", base_lr=5e-4, weight_decay=0.05, layer_decay=0.65)
    losses = []

    class LossRecorder(MixUp):  # reads the loss the algorithms' soft targets gave (a MixUp with alpha 0)
        def __init__(self):
            super().__init__(alpha=0.0)

        def match(self, event, state):
            return event.name == "AFTER_LOSS"

        def apply(self, event, state, logger):
            target = state.batch[1]
            losses.append((float(state.loss), target.is_floating_point(), tuple(target.shape)))

    algorithms = [MixUp(alpha=0.8), CutMix(alpha=1.0), LabelSmoothing(smoothing=0.1), LossRecorder()]
    result = run_supervised(
        model, train, test, opt, build_scheduler("2ba"), "4ba", algorithms=algorithms, progress_bar=False
    )
    check_result(result, evaluations=1)  # the evaluation at the end of training
    assert result["history"][0][0] == "4ba" and result["best_epoch"] == 0
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v, _, _ in losses)
    assert all(soft and shape == (16, 10) for _, soft, shape in losses)  # the loss saw mixed, smoothed targets
    after = model.encoder.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)  # the encoder trains


def tensor_loader(labels, batch: int = 10):
    labels = torch.as_tensor(labels)
    x = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, labels), batch_size=batch, shuffle=False)


def short_run(train_labels, test_labels, duration: str, num_classes: int = 10) -> dict:
    model = EncoderClassifier(encoder(), num_classes=num_classes)
    opt = build_eval_optimizer(model, 10, lr=0.01)
    return run_supervised(
        model,
        tensor_loader(train_labels),
        tensor_loader(test_labels),
        opt,
        build_scheduler(),
        duration,
        progress_bar=False,
    )


def test_classes_only_in_the_test_split_are_an_error_after_one_epoch():
    train = [0] * 10 + [1] * 10  # sorted: the first batch shows class 0 only
    # less than an epoch: training has not shown class 1 yet, which is no reason to complain
    assert short_run(train, [0, 1] * 5, "1ba")["evaluations"] == 1
    assert short_run(train, [0, 1] * 5, "1ep")["history"][0][0] == "1ep"
    with pytest.raises(EvalDataError, match=r"classes differ between splits.*\[2\]"):
        short_run(train, [0, 1, 2] * 4, "1ep")


@pytest.mark.parametrize(
    ("train", "test", "words"),
    [
        ([-1] * 20, [0] * 10, "training data has no labels"),
        ([0] * 20, [-1] * 10, "test data has no labels"),
        ([0] * 19 + [12], [0] * 10, "class index 12, outside"),
    ],
)
def test_labels_missing_or_out_of_range_are_clear_errors(train, test, words):
    with pytest.raises(EvalDataError, match=words):
        short_run(train, test, "2ep")


def test_bad_durations_name_their_key():
    from magma_composer.options import OptionError

    with pytest.raises(OptionError) as info:
        short_run([0, 1] * 10, [0, 1] * 5, "two epochs")
    assert info.value.key == "max_duration"


_RANK_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from composer.utils import dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
sys.path.insert(0, sys.argv[1])
from tests.test_eval_supervised import encoder
from magma_composer.evaluate.classifier import EncoderClassifier, EvalDataError
from magma_composer.evaluate.optim import build_eval_optimizer
from magma_composer.evaluate.supervised import run_supervised
from magma_composer.train import build_scheduler

dist.initialize_dist("cpu")
def loader(labels):
    x = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, torch.tensor(labels))
    return DataLoader(data, batch_size=5, sampler=DistributedSampler(data, shuffle=False))
out = {}
# the test split is dealt so that each rank tests the classes the other rank trains on: only the classes of all
# ranks together match; the extra class 4 is on rank 1 only
for case, test in (("same", [1, 0, 3, 2] * 5), ("extra", [1, 0, 3, 2] * 4 + [1, 0, 1, 4])):
    model = EncoderClassifier(encoder(), num_classes=5)
    opt = build_eval_optimizer(model, 10, lr=0.01)
    # DistributedSampler deals samples round-robin: rank 0 trains on classes 0 and 2 only, rank 1 on 1 and 3
    try:
        result = run_supervised(model, loader([0, 1, 2, 3] * 5), loader(test), opt, build_scheduler(), "1ep",
                                progress_bar=False)
        out[case] = result["history"]
    except EvalDataError as exc:
        out[case] = str(exc)
with open(sys.argv[2] + f".{dist.get_global_rank()}", "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_agree_and_compare_classes_over_all_ranks(tmp_path):
    import os
    import subprocess

    composer = Path(sys.executable).parent / "composer"
    if not composer.exists():
        pytest.skip(f"the composer launcher is not installed beside {sys.executable}")
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [str(composer), "-n", "2", "--master_port", str(free_port()), str(script), str(root), str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    import json

    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # metrics synced by Composer, the class check on both ranks
    assert isinstance(ranks[0]["same"], list) and ranks[0]["same"][0][0] == "1ep"
    assert "classes differ" in ranks[0]["extra"] and "[4]" in ranks[0]["extra"]
