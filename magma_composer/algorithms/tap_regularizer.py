"""The event handling shared by the batch-wide regularisers that read an encoder's features.

:class:`TapRegularizer` is the base of :class:`~magma_composer.algorithms.magma.MAGMA` and
:class:`~magma_composer.algorithms.uniformity.Uniformity`. A subclass says which features it needs
(:meth:`TapRegularizer._request`) and how to turn them into a term (:meth:`TapRegularizer._compute`);
the base does the rest, the same way for both:

* ``INIT``: finds the model's encoder (its timm ViT, else its ``encoder`` attribute, see
  :func:`~magma_composer.models.taps.find_encoder`) and asks its shared
  :class:`~magma_composer.models.FeatureTap` for the features (hooks added now, before DDP/FSDP
  wrapping); a later ``fit()`` after ``FIT_END`` re-adds them at ``FIT_START``.
* ``BEFORE_TRAIN_BATCH``: evaluates the weight schedule once for the batch; warns once if the
  microbatch is smaller than the per-device batch (the term then sees one microbatch at a time).
* ``BEFORE_FORWARD`` / ``AFTER_FORWARD``: arms and disarms the tap, only while the weight is not 0,
  so evaluation forwards and activation recomputation are never recorded.
* ``AFTER_LOSS``: computes the term and adds ``weight * term`` to ``state.loss`` under the
  subclass's key (a model's plain tensor loss becomes ``{'loss': tensor}`` first; a ``'total'`` entry,
  if the model supplies one, is increased too, since the trainer then uses only it).
* ``BATCH_END``: logs the weight, the unweighted term and the subclass's diagnostics. They are kept
  on the device until now, after the trainer has synchronised for its own loss logging, so logging
  adds no device synchronisation to the step.
* ``FIT_END``: removes the hooks.

Degenerate batches (e.g. fewer than 3 samples for MAGMA) make the functional form return a zero
term with ``valid`` false: nothing is added to the gradient, the step logs a warning, and no NaN
can reach the weights.
"""

from __future__ import annotations

import logging
import warnings
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from magma_composer.models.taps import FeatureTap, get_feature_tap
from magma_composer.options import OptionError
from magma_composer.schedules import WeightSchedule, build_schedule

__all__ = ["TapRegularizer", "TermRecord"]

log = logging.getLogger(__name__)

_EVENTS = frozenset(
    {
        Event.INIT,
        Event.FIT_START,
        Event.BEFORE_TRAIN_BATCH,
        Event.BEFORE_FORWARD,
        Event.AFTER_FORWARD,
        Event.AFTER_LOSS,
        Event.BATCH_END,
        Event.FIT_END,
    }
)


def _num_samples(batch: Any) -> int | None:
    """Leading dimension of the first tensor in ``batch`` (None if there is none)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            n = _num_samples(item)
            if n is not None:
                return n
    return None


def _loss_dict(loss: Any) -> dict[str, torch.Tensor]:
    """``state.loss`` as a dict, so that a named term can be added to it."""
    if isinstance(loss, dict):
        return loss
    if isinstance(loss, torch.Tensor):
        return {"loss": loss}
    if isinstance(loss, (tuple, list)):
        return {f"loss{i}": item for i, item in enumerate(loss)}
    raise TypeError(f"the model's loss() returned {type(loss).__name__}; expected a tensor, a tuple or a dict")


class TermRecord(NamedTuple):
    """One step's diagnostics of a term, kept on the device until it is logged (0-d float32 tensors).

    Attributes:
        n_valid: how many parts of the term (reference layers x forward calls) were valid, not skipped.
        n_total: how many parts there were.
        term: the unweighted term, averaged over the valid parts (0 if none).
        stats: the subclass's diagnostics by name (``gamma``, ``feature_norm``...), averaged like ``term``.
    """

    n_valid: torch.Tensor
    n_total: torch.Tensor
    term: torch.Tensor
    stats: dict[str, torch.Tensor]


class TapRegularizer(Algorithm):
    """Base class: a weighted, batch-wide loss term computed from features recorded by a :class:`FeatureTap`.

    Subclasses set :attr:`key` (the loss-dict key and metric prefix) and implement :meth:`_request`
    and :meth:`_compute`.

    Args:
        weight (float | dict | WeightSchedule): the weight, or a schedule (see :mod:`magma_composer.schedules`).
        gather (bool): compute the term on the batch gathered from all ranks (see
            :mod:`magma_composer.distributed`).
    """

    key: str = ""

    def __init__(self, weight: Union[float, Mapping[str, Any], WeightSchedule], gather: bool) -> None:
        try:
            self.schedule = build_schedule(weight, "weight")
        except (TypeError, ValueError) as exc:
            raise OptionError("weight", str(exc)) from exc
        if not isinstance(gather, bool):
            raise OptionError("gather", f"expected true or false, got {gather!r}")
        self.gather = gather
        self._tap: FeatureTap | None = None
        self._weight = 0.0
        self._batch = 0
        self._records: list[TermRecord] = []
        self._warned_microbatch = False

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def _check(self, tap: FeatureTap) -> None:
        """Validates the options against the tap's encoder; raises ``ValueError``."""

    @abstractmethod
    def _request(self, tap: FeatureTap) -> None:
        """Asks the tap for the features (called at INIT, after :meth:`_check`)."""

    @abstractmethod
    def _compute(self, tap: FeatureTap) -> tuple[torch.Tensor, TermRecord]:
        """Returns ``(term, record)``: the unweighted scalar term (0 where no part of it was valid) and its
        :class:`TermRecord` (see :meth:`_average_valid`)."""

    @staticmethod
    def _average_valid(
        values: list[torch.Tensor], valids: list[torch.Tensor], stats: dict[str, list[torch.Tensor]]
    ) -> tuple[torch.Tensor, TermRecord]:
        """Averages the parts of a term, and each named diagnostic, over the valid parts (no device sync).

        ``stats`` holds one value per part for each diagnostic; a skipped part's values must be 0.

        Returns:
            ``(term, record)``: the mean of the valid parts (0 if none) and the step's :class:`TermRecord`.
        """
        n_valid = torch.stack(valids).sum()
        denominator = n_valid.clamp_min(1)
        term = torch.stack(values).sum() / denominator
        record = TermRecord(
            n_valid=n_valid.float(),
            n_total=n_valid.new_full((), len(values), dtype=torch.float32),
            term=term.detach().float(),
            stats={name: torch.stack(parts).detach().float().sum() / denominator for name, parts in stats.items()},
        )
        return term, record

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        return event in _EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT or (event == Event.FIT_START and self._tap is None):
            self._setup(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._begin_batch(state)
        elif event == Event.BEFORE_FORWARD:
            if self._weight:
                self._tap.arm()
        elif event == Event.AFTER_FORWARD:
            self._tap.disarm()
        elif event == Event.AFTER_LOSS:
            if self._weight:
                self._add_term(state)
        elif event == Event.BATCH_END:
            self._log(logger)
        elif event == Event.FIT_END and self._tap is not None:
            self._tap.remove()
            self._tap = None

    def check_model(self, model: torch.nn.Module) -> FeatureTap:
        """Checks the options against ``model`` (its ViT's depth, module names, a class token) before training.

        The recipe builder calls it before the Trainer starts, and ``INIT`` calls it again.

        Returns:
            FeatureTap: the model's tap.

        Raises:
            ValueError: an option does not fit the model's encoder (a block index out of range, an int index on
                an encoder that is not a ViT, a module name it does not have, no class token...), prefixed with
                the algorithm's name.
        """
        try:
            tap = get_feature_tap(model)
            self._check(tap)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
        return tap

    def _setup(self, state: State) -> None:
        tap = self.check_model(state.model)
        self._request(tap)
        self._tap = tap

    def _begin_batch(self, state: State) -> None:
        self._weight = float(self.schedule(state))
        self._batch = int(state.timestamp.batch.value)
        self._records = []
        microbatch = state.device_train_microbatch_size
        if not self._weight or self._warned_microbatch or microbatch is None:
            return
        n = _num_samples(state.batch)
        if n is not None and microbatch < n:
            self._warned_microbatch = True
            warnings.warn(
                f"{type(self).__name__}: the microbatch ({microbatch}) is smaller than the per-device batch ({n}), "
                f"so the batch-wide {self.key} term sees {microbatch} samples at a time. Set "
                f"device_train_microbatch_size to the per-device batch size for a term over the whole batch.",
                stacklevel=2,
            )

    def _add_term(self, state: State) -> None:
        term, record = self._compute(self._tap)
        weighted = self._weight * term
        loss = _loss_dict(state.loss)
        loss[self.key] = loss[self.key] + weighted if self.key in loss else weighted
        if "total" in loss:
            loss["total"] = loss["total"] + weighted
        state.loss = loss
        self._records.append(record)

    def _log(self, logger: Logger) -> None:
        name = type(self).__name__
        metrics = {f"{self.key}/weight": self._weight}
        if self._records:
            names = list(self._records[0].stats)
            columns = ["n_valid", "n_total", "term", *names]
            flat = [[r.n_valid, r.n_total, r.term, *(r.stats[n] for n in names)] for r in self._records]
            # one transfer for all records; the trainer has synchronised already
            rows = [dict(zip(columns, row)) for row in torch.stack([torch.stack(f) for f in flat]).tolist()]
            self._records = []
            n_valid = sum(row["n_valid"] for row in rows)
            n_total = sum(row["n_total"] for row in rows)
            if n_valid < n_total:
                log.warning(
                    "%s: term skipped for %d of %d evaluations in batch %d: %s",
                    name,
                    n_total - n_valid,
                    n_total,
                    self._batch,
                    self._skip_reason(),
                )
            metrics[f"{self.key}/skipped"] = n_total - n_valid
            if n_valid:
                for name in columns[2:]:
                    metrics[f"{self.key}/{name}"] = sum(row[name] * row["n_valid"] for row in rows) / n_valid
        logger.log_metrics(metrics, step=self._batch)

    def _skip_reason(self) -> str:
        return "degenerate batch"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> dict[str, Any]:
        return {"weight": self.schedule, "gather": self.gather}
