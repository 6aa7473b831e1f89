"""kNN monitor: top-1 kNN accuracy of the encoder's features, at the start, during and at the end of training."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from composer.core import Callback, Event, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from magma_composer.callbacks.interval import parse_interval
from magma_composer.evaluation import extract_features, knn_top1
from magma_composer.options import OptionError, check_int, check_number

__all__ = ["KNNMonitor"]


def _encode_fn(model: torch.nn.Module):
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "extract_features"):
        return inner.extract_features
    raise TypeError(
        "KNNMonitor needs a model with extract_features(images) -> B x D (ComposerMAE has it); "
        f"got {type(inner).__name__}"
    )


class KNNMonitor(Callback):
    """Logs the weighted kNN top-1 accuracy (docs/algorithms.md §4) of the model's features.

    Features of ``train_loader`` (the memory bank) and ``test_loader`` (the queries) come from
    ``model.extract_features``; on several ranks each rank encodes its share and the features are
    gathered. Logged as ``knn/top1@k``.

    Args:
        train_loader: ``(images, labels)`` batches with the evaluation transform (the memory bank).
        test_loader: ``(images, labels)`` batches of the held-out split.
        interval (str | int): how often to measure during training (Composer time: ``'1ep'``,
            ``'500ba'``); ``0`` for only at the start and end.
        k (int | Sequence[int]): neighbours; the first is the headline figure.
        temperature (float): vote weight ``exp(sim / temperature)``.
        at_fit_start (bool): also measure the untrained encoder at ``FIT_START``.
        max_train_samples (int, optional): cap on the memory bank size.
        max_test_samples (int, optional): cap on the queries.
        progress (bool): progress bars while encoding.
    """

    def __init__(
        self,
        train_loader: Any,
        test_loader: Any,
        interval: Union[str, int] = 0,
        k: Union[int, Sequence[int]] = (10, 20),
        temperature: float = 0.07,
        at_fit_start: bool = True,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        progress: bool = False,
    ) -> None:
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.ks = [k] if isinstance(k, int) else list(k)
        if not self.ks:
            raise OptionError("k", "must name at least one number of neighbours")
        for i, value in enumerate(self.ks):
            check_int(f"k[{i}]", value, 1)
        self.interval = parse_interval(interval)
        self.temperature = check_number("temperature", temperature, 0.0, open_min=True)
        for key, value in (("max_train_samples", max_train_samples), ("max_test_samples", max_test_samples)):
            if value is not None:
                check_int(key, value, 1)
        self.at_fit_start = at_fit_start
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.progress = progress
        #: ``[(label, {k: accuracy})]``: ``'init'``, ``'ep3'``/``'ba500'``..., ``'final'``
        self.history: list[tuple[str, dict[int, float]]] = []

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, device: torch.device) -> dict[int, float]:
        """Encodes both loaders with ``model.extract_features`` and returns ``{k: top-1 %}`` (same on every rank).

        The model prepares the loaders' images itself (``ComposerMAE.prepare_images``), e.g. PCA masking's
        standardisation.
        """
        was_training = model.training
        model.eval()
        try:
            encode = _encode_fn(model)
            progress = self.progress and dist.get_global_rank() == 0
            bank = extract_features(encode, self.train_loader, device, self.max_train_samples, progress, "kNN bank")
            query = extract_features(encode, self.test_loader, device, self.max_test_samples, progress, "kNN query")
        finally:
            model.train(was_training)
        if dist.get_world_size() > 1:
            gathered = dist.all_gather_object((bank, query))
            bank = tuple(torch.cat([g[0][i] for g in gathered]) for i in range(2))
            query = tuple(torch.cat([g[1][i] for g in gathered]) for i in range(2))
        return knn_top1(*bank, *query, k=self.ks, temperature=self.temperature)

    def _record(self, label: str, state: State, logger: Logger) -> None:
        device = next(state.model.parameters()).device
        result = self.measure(state.model, device)
        self.history.append((label, result))
        logger.log_metrics({f"knn/top1@{k}": v for k, v in result.items()})

    def _due(self, state: State, event: Event) -> bool:
        if self.interval is None:
            return False
        unit = self.interval.unit
        if unit == TimeUnit.EPOCH and event == Event.EPOCH_END:
            return int(state.timestamp.epoch) % self.interval.value == 0
        if unit == TimeUnit.BATCH and event == Event.BATCH_END:
            return int(state.timestamp.batch) % self.interval.value == 0
        return False

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.at_fit_start and not self.history and int(state.timestamp.batch) == 0:
            self._record("init", state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.EPOCH_END) and not self._at_end(state):
            self._record(f"ep{int(state.timestamp.epoch)}", state, logger)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.BATCH_END) and not self._at_end(state):
            self._record(f"ba{int(state.timestamp.batch)}", state, logger)

    @staticmethod
    def _at_end(state: State) -> bool:
        # the last epoch/batch is measured by fit_end; do not measure it twice
        duration = state.max_duration
        if duration is None or duration.unit == TimeUnit.DURATION:
            return False
        return state.timestamp.get(duration.unit) >= duration

    def fit_end(self, state: State, logger: Logger) -> None:
        self._record("final", state, logger)

    def summary(self) -> str:
        """One line per measurement: ``kNN top-1 (k=10) init 23.4 %  final 51.2 %``."""
        if not self.history:
            return "kNN top-1: not measured"
        k0 = self.ks[0]
        parts = [f"{label} {res[k0]:.2f} %" for label, res in self.history]
        return f"kNN top-1 (k={k0}): " + "  ->  ".join(parts)
