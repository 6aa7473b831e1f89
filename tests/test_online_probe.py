"""The online linear probe: it leaves the model's training untouched, learns, resumes, and refuses bad labels."""

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.callbacks.online_probe import OnlineLinearProbe, online_probe_step
from magma_composer.config import validate
from magma_composer.evaluate.classifier import check_labels
from magma_composer.options import OptionError
from magma_composer.train import build_trainer
from tests.conftest import tiny_recipe


def _fit(recipe: dict) -> Trainer:
    trainer = build_trainer(validate(recipe))
    trainer.fit()
    trainer.close()
    trainer.rng_after_fit = torch.get_rng_state()  # the global generator, seeded by the Trainer
    return trainer


def _probe(trainer: Trainer) -> OnlineLinearProbe:
    return next(cb for cb in trainer.state.callbacks if isinstance(cb, OnlineLinearProbe))


def _eval_data(demo_mds) -> dict:
    return {"remote": str(demo_mds), "split": "test", "batch_size": 40, "num_workers": 0}


def test_model_update_is_bit_identical_with_and_without_the_probe(demo_mds):
    common = dict(max_duration="4ba", eval_data=_eval_data(demo_mds), eval_interval="100ep")
    plain = _fit(tiny_recipe(demo_mds, **common))
    probed = _fit(
        tiny_recipe(
            demo_mds,
            callbacks={"online_probe": {"num_classes": 10, "interval": "2ba"}},
            loggers={"in_memory": {}},
            **common,
        )
    )
    a, b = plain.state.model.state_dict(), probed.state.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        else:  # the model's extra state (its mask generator's position)
            assert a[name] == b[name], name
    # and the probe drew no random number of the run (its test loader's iterations draw a seed each)
    assert torch.equal(plain.rng_after_fit, probed.rng_after_fit)
    probe = _probe(probed)
    assert probe.head is not None and probe.head.weight.abs().sum() > 0  # it did train
    assert [label for label, _ in probe.history] == ["ba2", "final"]
    assert all(0.0 <= top1 <= 100.0 for _, top1 in probe.history)
    logger = next(lg for lg in probed.logger.destinations if isinstance(lg, InMemoryLogger))
    assert len(logger.data["online_probe/train_loss"]) == 4
    assert len(logger.data["online_probe/test_top1"]) == 2
    assert probe.summary().startswith("online probe top-1 (test): ba2 ")


class _Identity(ComposerModel):
    """A model whose features are its input vectors (separable by construction), trained on a dummy loss."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(dim, dim)

    def forward(self, batch):
        return self.net(batch[0])

    def loss(self, outputs, batch, *args, **kwargs):
        return (outputs**2).mean()

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        return images


def _separable(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 8, generator=g)
    x[torch.arange(n), y] += 2.0
    return TensorDataset(x, y)


def test_head_learns_on_separable_features():
    probe = OnlineLinearProbe(num_classes=4, lr=0.05, interval="1ep", test_loader=DataLoader(_separable(200, 1), 50))
    trainer = Trainer(
        model=_Identity(8),
        train_dataloader=DataLoader(_separable(320, 0), batch_size=32, shuffle=True),
        max_duration="3ep",
        optimizers=None,
        callbacks=[probe],
        progress_bar=False,
        log_to_console=False,
        device="cpu",
        seed=0,
    )
    trainer.fit()
    assert [label for label, _ in probe.history] == ["ep1", "ep2", "final"]
    assert probe.history[-1][1] >= 98.0
    assert probe.last_train_top1 >= 95.0


def test_step_learns_and_averages_nothing_on_one_rank():
    ds = _separable(256, 2)
    head = torch.nn.Linear(8, 4)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = [online_probe_step(head, optimizer, ds.tensors[0], ds.tensors[1])[0] for _ in range(60)]
    _, correct = online_probe_step(head, optimizer, ds.tensors[0], ds.tensors[1])
    assert losses[-1] < 0.2 * losses[0]
    assert correct >= 250


def test_resume_continues_the_same_head(demo_mds, tmp_path):
    common = dict(
        scheduler={"warmup": "0ba", "alpha_f": 1.0},
        callbacks={"online_probe": {"num_classes": 10, "interval": 0}},
        seed=11,
    )
    full = _probe(_fit(tiny_recipe(demo_mds, max_duration="6ba", **common)))
    ckpt = tmp_path / "ckpt"
    first = _fit(tiny_recipe(demo_mds, max_duration="3ba", save_folder=str(ckpt), save_interval="3ba", **common))
    (checkpoint,) = ckpt.glob("ep0-ba3-rank0.pt")
    resumed = _probe(_fit(tiny_recipe(demo_mds, max_duration="6ba", load_path=str(checkpoint), **common)))
    # without the saved head and optimizer the resumed head would restart from zero at batch 3
    assert not torch.equal(_probe(first).head.weight, full.head.weight)
    assert torch.equal(resumed.head.weight, full.head.weight)
    assert torch.equal(resumed.head.bias, full.head.bias)
    assert resumed.last_train_top1 == full.last_train_top1  # running counts continue too


def test_labels_outside_num_classes_are_refused(demo_mds):
    trainer = build_trainer(
        validate(tiny_recipe(demo_mds, max_duration="2ba", callbacks={"online_probe": {"num_classes": 5}}))
    )
    with pytest.raises(ValueError, match=r"outside \[0, 5\) = \[0, num_classes=5\)"):
        trainer.fit()
    trainer.close()


def test_label_and_option_checks():
    with pytest.raises(ValueError, match="no labels"):
        check_labels(torch.tensor([0, -1, 2]), 3, "training")
    check_labels(torch.tensor([0, 2]), 3, "training")
    with pytest.raises(OptionError, match="num_classes"):
        OnlineLinearProbe(num_classes=1)
    with pytest.raises(OptionError, match="pool"):
        OnlineLinearProbe(num_classes=3, pool="max")
    with pytest.raises(OptionError, match="lr"):
        OnlineLinearProbe(num_classes=3, lr=0.0)
    with pytest.raises(OptionError, match="interval"):
        OnlineLinearProbe(num_classes=3, interval="2dur")
    probe = OnlineLinearProbe(num_classes=3)
    assert probe.state_dict() == {}  # nothing to save before the first batch
    probe.load_state_dict({})
    assert probe.head is None
