"""MixUpOrCutMix: both branches against a hand computation on real images, the switch frequency and the Beta draws,
reproducibility from (seed, rank, step) without touching a global RNG, the options, and a real fine-tuning Trainer
run with Composer's LabelSmoothing in either order."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.algorithms import LabelSmoothing
from composer.core import Algorithm, Event

from magma_composer.data.loader import build_image_dataloader
from magma_composer.evaluate.classifier import EncoderClassifier, soft_target_cross_entropy
from magma_composer.evaluate.mixing import (
    MixUpOrCutMix,
    check_mixing_options,
    mix_targets,
    mixing_generator,
    mixup_or_cutmix_batch,
)
from magma_composer.models import ComposerMAE
from magma_composer.options import OptionError
from tests.conftest import TINY_MODEL

NUM_CLASSES = 10


def loader(remote, batch: int = 16):
    return build_image_dataloader(batch, remote=str(remote), split="train", image_size=32, num_workers=0)


@pytest.fixture(scope="module")
def real_batch(demo_mds):
    images, labels = next(iter(loader(demo_mds)))
    assert images.shape == (16, 3, 32, 32) and images.is_floating_point() and labels.dtype == torch.int64
    return images, labels


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, NUM_CLASSES).float()


def test_mixup_branch_equals_the_hand_computation(real_batch):
    x, y = real_batch
    mixed, y_perm, draw = mixup_or_cutmix_batch(x, y, mixing_generator(3, 0, 0), cutmix_alpha=0.0)
    assert not draw.cutmix and draw.bbox is None and 0.0 < draw.lam < 1.0
    perm = draw.indices
    assert sorted(perm.tolist()) == list(range(16)) and not torch.equal(perm, torch.arange(16))
    torch.testing.assert_close(mixed, draw.lam * x + (1 - draw.lam) * x[perm])
    assert torch.equal(y_perm, y[perm])
    q = mix_targets(torch.zeros(16, NUM_CLASSES), y, draw)
    torch.testing.assert_close(q, draw.lam * one_hot(y) + (1 - draw.lam) * one_hot(y)[perm])
    torch.testing.assert_close(q.sum(1), torch.ones(16))


def test_cutmix_branch_equals_the_hand_computation(real_batch):
    x, y = real_batch
    boxes = 0
    for step in range(20):
        mixed, y_perm, draw = mixup_or_cutmix_batch(x, y, mixing_generator(3, 0, step), mixup_alpha=0.0)
        assert draw.cutmix
        top, left, bottom, right = draw.bbox
        area = (bottom - top) * (right - left)
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert draw.lam == pytest.approx(1 - area / 32**2)  # the area kept after clipping
        expected = x.clone()
        expected[:, :, top:bottom, left:right] = x[draw.indices][:, :, top:bottom, left:right]
        assert torch.equal(mixed, expected)
        assert torch.equal(y_perm, y[draw.indices])
        q = mix_targets(torch.zeros(16, NUM_CLASSES), y, draw)
        torch.testing.assert_close(q, draw.lam * one_hot(y) + (1 - draw.lam) * one_hot(y)[draw.indices])
        boxes += 0 < area < 32**2
    assert boxes >= 10  # Beta(1, 1) areas: most boxes are neither empty nor the whole image


def test_cutmix_box_follows_the_published_rule(real_batch):
    """The box redrawn by hand from the documented order of draws: branch, Beta seed, permutation, centre."""
    x, y = real_batch
    for step in range(10):
        _, _, draw = mixup_or_cutmix_batch(x, y, mixing_generator(5, 1, step), mixup_alpha=0.0)
        g = mixing_generator(5, 1, step)
        torch.rand((), generator=g)
        lam0 = np.random.default_rng(int(torch.randint(2**62, (), generator=g))).beta(1.0, 1.0)
        assert torch.equal(torch.randperm(16, generator=g), draw.indices)
        cy, cx = (int(torch.randint(32, (), generator=g)) for _ in range(2))
        cut = int(32 * math.sqrt(1 - lam0))
        expected = (max(cy - cut // 2, 0), max(cx - cut // 2, 0), min(cy + cut // 2, 32), min(cx + cut // 2, 32))
        assert draw.bbox == expected


def test_label_smoothing_before_or_after_mixing_gives_the_same_targets(real_batch):
    from composer.algorithms.label_smoothing import smooth_labels

    x, y = real_batch
    logits = torch.zeros(16, NUM_CLASSES)
    for step in range(4):
        _, _, draw = mixup_or_cutmix_batch(x, y, mixing_generator(0, 0, step))
        after = smooth_labels(logits, mix_targets(logits, y, draw), smoothing=0.1)
        before = mix_targets(logits, smooth_labels(logits, y, smoothing=0.1), draw)
        torch.testing.assert_close(after, before)
        mixed = draw.lam * one_hot(y) + (1 - draw.lam) * one_hot(y)[draw.indices]
        torch.testing.assert_close(after, 0.9 * mixed + 0.1 / NUM_CLASSES)  # timm's smoothed mixed targets


@pytest.mark.parametrize(("options", "p"), [({}, 0.5), ({"switch_prob": 0.3}, 0.3)])
def test_switch_frequency_and_the_beta_draws(options, p):
    x, y = torch.rand(4, 1, 4, 4), torch.arange(4)
    n = 2000
    draws = [mixup_or_cutmix_batch(x, y, mixing_generator(11, 0, step), **options)[2] for step in range(n)]
    cutmix = sum(d.cutmix for d in draws)
    assert abs(cutmix - n * p) <= 5 * math.sqrt(n * p * (1 - p))  # binomial, 5 standard deviations
    # MixUp's lambda ~ Beta(0.8, 0.8), not folded to max(lam, 1 - lam): mean 1/2, variance 1 / (4 (2a + 1))
    lam = torch.tensor([d.lam for d in draws if not d.cutmix], dtype=torch.float64)
    assert abs(lam.mean().item() - 0.5) <= 5 * math.sqrt(1 / (4 * 2.6) / len(lam))
    assert lam.var().item() == pytest.approx(1 / (4 * 2.6), rel=0.15)
    assert (lam < 0.5).float().mean().item() == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize(("options", "cutmix"), [({"mixup_alpha": 0.0}, True), ({"cutmix_alpha": 0.0}, False)])
def test_a_disabled_branch_is_never_drawn(options, cutmix):
    x, y = torch.rand(4, 1, 4, 4), torch.arange(4)
    assert all(
        mixup_or_cutmix_batch(x, y, mixing_generator(0, 0, s), **options)[2].cutmix == cutmix for s in range(200)
    )


def test_draws_are_a_pure_function_of_seed_rank_and_step_and_leave_global_rngs_alone(real_batch):
    x, y = real_batch
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    def run(*keys):
        mixed, _, draw = mixup_or_cutmix_batch(x, y, mixing_generator(*keys))
        return mixed, draw

    results = {keys: run(*keys) for keys in [(1, 0, 0), (1, 0, 1), (2, 0, 0), (1, 1, 0), (1, 0, 0, 1)]}
    for keys in results:
        again_mixed, again = run(*keys)
        assert torch.equal(again_mixed, results[keys][0]) and torch.equal(again.indices, results[keys][1].indices)
        assert (again.cutmix, again.lam, again.bbox) == (
            results[keys][1].cutmix,
            results[keys][1].lam,
            results[keys][1].bbox,
        )
    draws = [(d.lam, tuple(d.indices.tolist())) for _, d in results.values()]
    assert len(set(draws)) == len(draws)  # another seed, step, rank or microbatch: another draw
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


@pytest.mark.parametrize(
    ("options", "key", "words"),
    [
        ({"mixup_alpha": -0.1}, "mixup_alpha", ">= 0.0"),
        ({"cutmix_alpha": float("nan")}, "cutmix_alpha", "finite number"),
        ({"switch_prob": 1.5}, "switch_prob", r"in \[0.0, 1.0\]"),
        ({"mixup_alpha": 0.0, "cutmix_alpha": 0}, "mixup_alpha", "both 0"),
        ({"mixup_alpha": 0.0, "switch_prob": 0.5}, "switch_prob", "no effect with mixup_alpha: 0"),
        ({"cutmix_alpha": 0.0, "switch_prob": 1.0}, "switch_prob", "no effect with cutmix_alpha: 0"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"seed": 1.5}, "seed", "integer"),
    ],
)
def test_bad_options_are_named(options, key, words):
    with pytest.raises(OptionError, match=words) as info:
        MixUpOrCutMix(**options)
    assert info.value.key == key


def test_options_that_name_the_remaining_branch_are_accepted():
    assert check_mixing_options(0.0, 1.0, 1.0) == 1.0 and check_mixing_options(0.8, 0.0, 0.0) == 0.0
    assert check_mixing_options(0.8, 1.0, None) == 0.5 and check_mixing_options(0.8, 1.0, 0.2) == 0.2


class Recorder(Algorithm):
    """Listed first: sees the batch before the mixing, the mixed input at AFTER_FORWARD (reverse order, last) and
    the loss at AFTER_LOSS (last)."""

    def __init__(self, mixing: MixUpOrCutMix) -> None:
        self.mixing = mixing
        self.steps: list[dict] = []

    def match(self, event, state):
        return event in (Event.BEFORE_FORWARD, Event.AFTER_FORWARD, Event.AFTER_LOSS)

    def apply(self, event, state, logger):
        if event == Event.BEFORE_FORWARD:
            images, labels = state.batch[0], state.batch[1]
            self.steps.append({"x": images.clone(), "y": labels.clone(), "step": int(state.timestamp.batch)})
        elif event == Event.AFTER_FORWARD:
            self.steps[-1].update(mixed=state.batch[0].clone(), draw=self.mixing.last_draw)
        else:
            self.steps[-1].update(loss=float(state.loss), outputs=state.outputs.detach().clone())


@pytest.mark.parametrize("smoothing_first", [True, False], ids=["smoothing-first", "mixing-first"])
def test_finetuning_run_with_label_smoothing_sees_mixed_smoothed_targets(demo_mds, smoothing_first):
    torch.manual_seed(0)
    model = EncoderClassifier(
        ComposerMAE(**TINY_MODEL, mask_seed=0).encoder,
        NUM_CLASSES,
        pool="mean",
        fc_norm=True,
        freeze_encoder=False,
        head_init_std=1.0,  # spread logits: the losses of different targets differ clearly
    )
    mixing = MixUpOrCutMix()  # seed: the run's
    smoothing = LabelSmoothing(smoothing=0.1)
    recorder = Recorder(mixing)
    algorithms = [recorder, smoothing, mixing] if smoothing_first else [recorder, mixing, smoothing]
    trainer = Trainer(
        model=model,
        train_dataloader=loader(demo_mds),
        max_duration="4ba",
        algorithms=algorithms,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        progress_bar=False,
        log_to_console=False,
        device="cpu",
        seed=2,  # its draws for steps 0-3: both branches (checked below)
    )
    trainer.fit()
    assert [s["step"] for s in recorder.steps] == [0, 1, 2, 3]
    for s in recorder.steps:
        x, y, draw = s["x"], s["y"], s["draw"]
        assert not y.is_floating_point()  # the model's forward saw class indices
        # the draw is the step's own: a resumed run at this step draws the same
        expected_mixed, _, expected_draw = mixup_or_cutmix_batch(x, y, mixing_generator(2, 0, s["step"], 0))
        assert torch.equal(draw.indices, expected_draw.indices) and draw.lam == expected_draw.lam
        assert torch.equal(s["mixed"], expected_mixed)
        # the loss saw (1 - s) (lam y + (1 - lam) y[perm]) + s / C
        q = 0.9 * (draw.lam * one_hot(y) + (1 - draw.lam) * one_hot(y)[draw.indices]) + 0.1 / NUM_CLASSES
        assert math.isfinite(s["loss"])
        assert s["loss"] == pytest.approx(soft_target_cross_entropy(s["outputs"], q).item(), rel=1e-5)
        # and neither the labels alone nor the unsmoothed mixed targets
        for other in (one_hot(y), (q - 0.1 / NUM_CLASSES) / 0.9):
            assert abs(s["loss"] - soft_target_cross_entropy(s["outputs"], other).item()) > 1e-3
    assert {s["draw"].cutmix for s in recorder.steps} == {True, False}  # the run exercised both branches
