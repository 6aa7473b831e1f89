"""Online linear probe: a linear head trained on detached encoder features during pre-training.

docs/algorithms.md §4. At each ``BATCH_END`` (after the model's optimizer step) the batch's images are encoded
with ``model.extract_features`` (eval mode, no gradient, the run's precision, inside ``torch.random.fork_rng``)
and a linear head ``z -> W z + b`` (float32, zero-initialised, its own Adam optimizer) takes one step on the
cross-entropy of the batch's labels. The head never sees the model's parameters, the model's gradients are
already spent, and no random number of the run is drawn: the encoder's update is bit-identical with and without
the callback (tests/test_online_probe.py). On several ranks the head's gradients are averaged, so every rank
holds the same head.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Union

import torch
import torch.nn.functional as F
from composer.core import Callback, State, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist

from magma_composer.callbacks.interval import parse_interval
from magma_composer.evaluate.classifier import check_labels
from magma_composer.options import check_choice, check_int, check_number

__all__ = ["OnlineLinearProbe", "fork_rng", "online_probe_step"]


@contextlib.contextmanager
def fork_rng(device: torch.device) -> Iterator[None]:
    """Restores the CPU (and ``device``'s CUDA) random state on exit: what runs inside draws nothing from the run."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        yield


def online_probe_step(
    head: torch.nn.Linear, optimizer: torch.optim.Optimizer, features: torch.Tensor, labels: torch.Tensor
) -> tuple[float, int]:
    """One float32 step of ``head`` on detached ``features``; returns ``(mean cross-entropy, correct count)``.

    On several ranks the head's gradients are averaged before the step.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        logits = head(features.detach().float())
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        world = dist.get_world_size()
        if world > 1:
            for p in head.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        optimizer.step()
    return float(loss.detach()), int((logits.detach().argmax(1) == labels).sum())


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images = batch[0]
        # a two-view batch (B x 2 x C x S x S): the probe reads the first view, as the regularisers do
        return (images[:, 0] if images.dim() == 5 else images), torch.as_tensor(batch[1])
    raise TypeError(
        f"OnlineLinearProbe needs (images, labels) batches, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


class OnlineLinearProbe(Callback):
    """Trains a linear head on detached features each step and logs its accuracy (solo-learn's / U-MAE's probe).

    Logged: ``online_probe/train_loss`` (the batch's loss before the head's step), ``online_probe/train_top1``
    (running top-1 over the epoch so far, before each step), and with a ``test_loader``
    ``online_probe/test_top1`` every ``interval`` and at the end of training. The head and its optimizer are saved
    in checkpoints, so a resumed run continues the same head.

    The training data and ``test_loader`` must be labelled: a data set without labels (``has_labels`` false) is
    refused when the Trainer is built (the training data) or at construction (``test_loader``), naming the data set
    and the recipe option to change.

    Args:
        num_classes: the number of classes; every label must be in ``[0, num_classes)``.
        lr: Adam's learning rate for the head.
        weight_decay: Adam's (L2) weight decay on the head.
        pool: ``'cls'`` (the CLS token) or ``'mean'`` (the mean of the patch tokens), passed to
            ``model.extract_features(images, pool=...)``.
        interval (str | int): how often to score the head on ``test_loader`` (``'1ep'``, ``'500ba'``); ``0``: only
            at the end of training.
        test_loader: ``(images, labels)`` batches of the held-out split (the recipe builder passes the
            ``eval_data`` loader); ``None``: no test score.
        max_test_samples: cap on the test images scored (shared out evenly among ranks).
    """

    def __init__(
        self,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        pool: str = "cls",
        interval: Union[str, int] = "1ep",
        test_loader: Any = None,
        max_test_samples: int | None = None,
    ) -> None:
        from magma_composer.callbacks.knn_monitor import require_labels

        require_labels(
            test_loader,
            "callbacks.online_probe",
            "its test data (the recipe's eval_data)",
            "set eval_data.split to a labelled split (e.g. test), or remove online_probe from callbacks",
        )
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.lr = check_number("lr", lr, 0.0, open_min=True)
        self.weight_decay = check_number("weight_decay", weight_decay, 0.0)
        self.pool = check_choice("pool", pool, ("cls", "mean"))
        self.interval = parse_interval(interval)
        self.test_loader = test_loader
        if max_test_samples is not None:
            check_int("max_test_samples", max_test_samples, 1)
        self.max_test_samples = max_test_samples
        self.head: torch.nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None  # a checkpoint's state, applied when the head is built
        self._correct = self._seen = 0
        #: ``[(label, test top-1 %)]``: ``'ep1'``/``'ba500'``..., ``'final'``
        self.history: list[tuple[str, float]] = []
        self.last_train_top1: float | None = None

    # ------------------------------------------------------------------ the head
    def _build(self, dim: int, device: torch.device) -> None:
        with fork_rng(device), torch.no_grad():  # Linear's own initialisation draws random numbers: not the run's
            head = torch.nn.Linear(dim, self.num_classes).to(device)
            head.weight.zero_()  # zeros: the loss is convex in the head, any start will do
            head.bias.zero_()
        self.head = head
        self.optimizer = torch.optim.Adam(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self._pending is not None:
            state, self._pending = self._pending, None
            if tuple(state["head"]["weight"].shape) != tuple(head.weight.shape):
                raise ValueError(
                    f"OnlineLinearProbe: the checkpoint's head is {tuple(state['head']['weight'].shape)} "
                    f"(classes x features), this run's is {tuple(head.weight.shape)}: num_classes or pool changed"
                )
            head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._correct, self._seen = int(state.get("correct", 0)), int(state.get("seen", 0))

    @torch.no_grad()
    def _features(self, state: State, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        from magma_composer.callbacks.knn_monitor import encode_fn

        model = state.model
        was_training = model.training
        model.eval()
        try:
            with fork_rng(device), get_precision_context(state.precision, state.precision_config):
                return encode_fn(model, self.pool, "OnlineLinearProbe")(images.to(device, non_blocking=True))
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ events
    def _check_training_data(self, state: State) -> None:
        from magma_composer.callbacks.knn_monitor import require_labels

        require_labels(
            state.train_dataloader,
            "callbacks.online_probe",
            "the training data (the recipe's train_data)",
            "set train_data.split to a labelled split (e.g. train), or remove online_probe from callbacks "
            "(pre-training on unlabelled images works without it)",
        )

    def after_load(self, state: State, logger: Logger) -> None:
        # AFTER_LOAD runs inside the Trainer's constructor, once the training data is set: a recipe fails at start
        self._check_training_data(state)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._check_training_data(state)  # a loader given to fit() rather than to the Trainer

    def epoch_start(self, state: State, logger: Logger) -> None:
        self._correct = self._seen = 0

    def batch_end(self, state: State, logger: Logger) -> None:
        images, labels = _split_batch(state.batch)
        device = next(state.model.parameters()).device
        check_labels(labels, self.num_classes, "training")
        features = self._features(state, images, device)
        if self.head is None:
            self._build(features.shape[1], device)
        labels = labels.to(device, torch.long)
        loss, correct = online_probe_step(self.head, self.optimizer, features, labels)
        self._correct += correct
        self._seen += len(labels)
        self.last_train_top1 = 100.0 * self._correct / self._seen
        logger.log_metrics({"online_probe/train_loss": loss, "online_probe/train_top1": self.last_train_top1})
        if self._due(state, TimeUnit.BATCH):
            self._test(f"ba{int(state.timestamp.batch)}", state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._due(state, TimeUnit.EPOCH):
            self._test(f"ep{int(state.timestamp.epoch)}", state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._test("final", state, logger)

    def _due(self, state: State, unit: TimeUnit) -> bool:
        if self.test_loader is None or self.interval is None or self.interval.unit != unit:
            return False
        duration = state.max_duration  # the last batch/epoch is scored by fit_end
        if (
            duration is not None
            and duration.unit != TimeUnit.DURATION
            and state.timestamp.get(duration.unit) >= duration
        ):
            return False
        return int(state.timestamp.get(unit)) % self.interval.value == 0

    @torch.no_grad()
    def test_top1(self, state: State) -> float:
        """Top-1 in % of the current head on ``test_loader`` (all ranks' shares together)."""
        if self.head is None:
            raise RuntimeError("OnlineLinearProbe: the head has not seen a training batch yet")
        device = self.head.weight.device
        cap = None if self.max_test_samples is None else math.ceil(self.max_test_samples / dist.get_world_size())
        correct = seen = 0
        with fork_rng(device):  # iterating a loader draws a seed
            for batch in self.test_loader:
                images, labels = _split_batch(batch)
                if cap is not None:
                    images, labels = images[: cap - seen], labels[: cap - seen]
                check_labels(labels, self.num_classes, "test")
                features = self._features(state, images, device)
                logits = self.head(features.float())
                correct += int((logits.argmax(1).cpu() == labels.long().cpu()).sum())
                seen += len(labels)
                if cap is not None and seen >= cap:
                    break
        counts = torch.tensor([correct, seen], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        if counts[1] == 0:
            raise ValueError("OnlineLinearProbe: the test loader yielded no images")
        return 100.0 * float(counts[0] / counts[1])

    def _test(self, label: str, state: State, logger: Logger) -> None:
        if self.test_loader is None or self.head is None:
            return
        top1 = self.test_top1(state)
        self.history.append((label, top1))
        logger.log_metrics({"online_probe/test_top1": top1})

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.head is None:
            return dict(self._pending) if self._pending is not None else {}
        return {
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "correct": self._correct,
            "seen": self._seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint saved before the first batch
            return
        self._pending = state
        if self.head is not None:  # rebuilt on the head's device, from the checkpoint
            device = self.head.weight.device
            self.head = None
            self._build(state["head"]["weight"].shape[1], device)

    def summary(self) -> str:
        """``online probe top-1 (test): ep1 20.00 %  ->  final 31.25 %`` (the running train top-1 without tests)."""
        if self.history:
            return "online probe top-1 (test): " + "  ->  ".join(f"{label} {v:.2f} %" for label, v in self.history)
        if self.last_train_top1 is not None:
            return f"online probe top-1 (train, running): {self.last_train_top1:.2f} %"
        return "online probe: not measured"
