"""kNN monitor: top-1 kNN (and optionally fast linear-probe) accuracy of the encoder's features during training."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence, Union

import torch
from composer.core import Callback, Event, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from magma_composer.callbacks.interval import parse_interval
from magma_composer.callbacks.online_probe import fork_rng
from magma_composer.evaluation import extract_features, knn_top1, linear_probe_top1
from magma_composer.options import OptionError, check_choice, check_int, check_number

__all__ = ["KNNMonitor", "describe_data", "require_labels"]


def describe_data(loader: Any) -> str:
    """Where a loader's images come from, for messages: ``'data/stl10 (split unlabeled)'``."""
    dataset = getattr(loader, "dataset", loader)
    streams = getattr(dataset, "streams", None) or []
    if not streams:
        return f"a {type(dataset).__name__}"
    stream = streams[0]
    where = getattr(stream, "remote", None) or getattr(stream, "local", None) or "?"
    split = getattr(stream, "split", None)
    return f"{where} (split {split})" if split else str(where)


def require_labels(loader: Any, who: str, role: str, remedy: str) -> None:
    """Refuses a loader over a data set without labels (``has_labels`` false: shards without a ``y`` column).

    Args:
        loader: a loader whose ``dataset`` may tell ``has_labels`` (others pass).
        who: the callback, for the message.
        role: what the loader is for (``'the memory bank (train_data)'``).
        remedy: the options to change, in words.

    Raises:
        ValueError: naming the data set and the remedy.
    """
    if getattr(getattr(loader, "dataset", None), "has_labels", True):
        return
    raise ValueError(
        f"{who} needs labelled images, but {role}, {describe_data(loader)}, has no labels (its shards have no 'y' "
        f"column: an unlabelled split such as STL-10's 'unlabeled', or a folder converted with --unlabelled); "
        f"{remedy}"
    )


def encode_fn(model: torch.nn.Module, pool: str = "cls", who: str = "KNNMonitor"):
    """``images -> B x D`` features from ``model.extract_features`` (``pool`` passed on only when not ``'cls'``)."""
    inner = getattr(model, "module", model)  # DDP
    extract = getattr(inner, "extract_features", None)
    if extract is None:
        raise TypeError(
            f"{who} needs a model with extract_features(images) -> B x D (ComposerMAE has it); "
            f"got {type(inner).__name__}"
        )
    if pool == "cls":
        return extract
    if "pool" not in inspect.signature(extract).parameters:
        raise TypeError(f"{who}: pool={pool!r} needs {type(inner).__name__}.extract_features(images, pool=...)")
    return functools.partial(extract, pool=pool)


class KNNMonitor(Callback):
    """Logs the weighted kNN top-1 accuracy (docs/algorithms.md §4) of the model's features.

    Features of ``train_loader`` (the memory bank) and ``test_loader`` (the queries) come from
    ``model.extract_features``; on several ranks each rank encodes its share and the features are
    gathered. Logged as ``knn/top1@k``; with ``linear_probe``, the fast linear probe
    (:func:`magma_composer.evaluate.linear.fit_linear_probe`, default options) on the same features is logged
    as ``linear_probe/top1``. Measuring consumes no random numbers of the run (``torch.random.fork_rng``).

    Both loaders need labelled data sets: one without labels (``has_labels`` false) is refused at construction, with
    a message naming the data set and the recipe option to change.

    Args:
        train_loader: ``(images, labels)`` batches with the evaluation transform (the memory bank).
        test_loader: ``(images, labels)`` batches of the held-out split.
        interval (str | int): how often to measure during training (Composer time: ``'1ep'``,
            ``'500ba'``); ``0`` for only at the start and end.
        k (int | Sequence[int]): neighbours; the first is the headline figure.
        temperature (float): vote weight ``exp(sim / temperature)``.
        at_fit_start (bool): also measure the untrained encoder at ``FIT_START``.
        max_train_samples (int, optional): cap on the memory bank size: the first images of each pass, the same
            images at every measurement when the loader yields the same order each pass (this package's evaluation
            data sets do, ``train=False``).
        max_test_samples (int, optional): cap on the queries, likewise.
        progress (bool): progress bars while encoding.
        linear_probe (bool): also measure the fast linear probe's top-1 on the same features.
        pool (str): ``'cls'`` (the CLS token) or ``'mean'`` (the mean of the patch tokens); passed to
            ``model.extract_features(images, pool=...)``.
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
        linear_probe: bool = False,
        pool: str = "cls",
    ) -> None:
        # at construction: a recipe fails before training starts, not at the first measurement
        require_labels(
            train_loader,
            "callbacks.knn_monitor",
            "its memory bank (the recipe's train_data)",
            "set train_data.split to a labelled split (e.g. train), or remove knn_monitor from callbacks",
        )
        require_labels(
            test_loader,
            "callbacks.knn_monitor",
            "its queries (the recipe's eval_data)",
            "set eval_data.split to a labelled split (e.g. test), or remove knn_monitor from callbacks",
        )
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
        self.linear_probe = bool(linear_probe)
        self.pool = check_choice("pool", pool, ("cls", "mean"))
        #: ``[(label, {k: accuracy})]``: ``'init'``, ``'ep3'``/``'ba500'``..., ``'final'``
        self.history: list[tuple[str, dict[int, float]]] = []
        #: ``[(label, linear-probe top-1)]`` at the same measurements, with ``linear_probe``
        self.probe_history: list[tuple[str, float]] = []

    @torch.no_grad()
    def features(self, model: torch.nn.Module, device: torch.device) -> tuple[tuple, tuple]:
        """``((bank features, labels), (query features, labels))`` from ``model.extract_features``, all ranks'.

        The model prepares the loaders' images itself (``ComposerMAE.prepare_images``), e.g. PCA masking's
        standardisation.
        """
        was_training = model.training
        model.eval()
        try:
            encode = encode_fn(model, self.pool)
            progress = self.progress and dist.get_global_rank() == 0
            with fork_rng(device):  # iterating a loader draws a seed: the run's random numbers stay untouched
                bank = extract_features(encode, self.train_loader, device, self.max_train_samples, progress, "kNN bank")
                query = extract_features(encode, self.test_loader, device, self.max_test_samples, progress, "kNN query")
        finally:
            model.train(was_training)
        if dist.get_world_size() > 1:
            gathered = dist.all_gather_object((bank, query))
            bank = tuple(torch.cat([g[0][i] for g in gathered]) for i in range(2))
            query = tuple(torch.cat([g[1][i] for g in gathered]) for i in range(2))
        return bank, query

    def measure(self, model: torch.nn.Module, device: torch.device) -> dict[int, float]:
        """Encodes both loaders and returns ``{k: top-1 %}`` (same on every rank)."""
        bank, query = self.features(model, device)
        return knn_top1(*bank, *query, k=self.ks, temperature=self.temperature)

    def _record(self, label: str, state: State, logger: Logger) -> None:
        device = next(state.model.parameters()).device
        bank, query = self.features(state.model, device)
        result = knn_top1(*bank, *query, k=self.ks, temperature=self.temperature)
        self.history.append((label, result))
        metrics = {f"knn/top1@{k}": v for k, v in result.items()}
        if self.linear_probe:
            # the same deterministic fit on every rank (identical gathered features): no broadcast needed
            probe = linear_probe_top1(*bank, *query, device=device)
            self.probe_history.append((label, probe))
            metrics["linear_probe/top1"] = probe
        logger.log_metrics(metrics)

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
        """``kNN top-1 (k=10): init 23.40 %  ->  final 51.20 %``, and a line for the linear probe if measured."""
        if not self.history:
            return "kNN top-1: not measured"
        k0 = self.ks[0]
        features = "" if self.pool == "cls" else " on the mean of the patch tokens"
        parts = [f"{label} {res[k0]:.2f} %" for label, res in self.history]
        lines = [f"kNN top-1 (k={k0}){features}: " + "  ->  ".join(parts)]
        if self.probe_history:
            lines.append(
                f"linear-probe top-1{features}: "
                + "  ->  ".join(f"{label} {v:.2f} %" for label, v in self.probe_history)
            )
        return "\n".join(lines)
