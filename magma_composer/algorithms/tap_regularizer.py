"""The event handling shared by the batch-wide regularisers that read a timm ViT's features.

:class:`TapRegularizer` is the base of :class:`~magma_composer.algorithms.magma.MAGMA` and
:class:`~magma_composer.algorithms.uniformity.Uniformity`. A subclass says which features it needs
(:meth:`TapRegularizer._request`) and how to turn them into a term (:meth:`TapRegularizer._compute`);
the base does the rest, the same way for both:

* ``INIT``: finds the model's timm ViT and asks its shared :class:`~magma_composer.models.FeatureTap`
  for the features (hooks added now, before DDP/FSDP wrapping); a later ``fit()`` after ``FIT_END``
  re-adds them at ``FIT_START``.
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
from typing import Any, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from magma_composer.models.taps import FeatureTap, get_feature_tap
from magma_composer.schedules import WeightSchedule, build_schedule

__all__ = ["TapRegularizer"]

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


class TapRegularizer(Algorithm):
    """Base class: a weighted, batch-wide loss term computed from features recorded by a :class:`FeatureTap`.

    Subclasses set :attr:`key` (the loss-dict key and metric prefix) and :attr:`stat_names` (the
    diagnostics that follow ``n_valid, n_total, term`` in each record), and implement :meth:`_request`
    and :meth:`_compute`.

    Args:
        weight (float | dict | WeightSchedule): the weight, or a schedule (see :mod:`magma_composer.schedules`).
        gather (bool): compute the term on the batch gathered from all ranks (see
            :mod:`magma_composer.distributed`).
    """

    key: str = ""
    stat_names: tuple[str, ...] = ()

    def __init__(self, weight: Union[float, Mapping[str, Any], WeightSchedule], gather: bool) -> None:
        self.schedule = build_schedule(weight, "weight")
        if not isinstance(gather, bool):
            raise TypeError(f"gather must be true or false, got {gather!r}")
        self.gather = gather
        self._tap: FeatureTap | None = None
        self._weight = 0.0
        self._batch = 0
        self._records: list[torch.Tensor] = []
        self._warned_microbatch = False

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def _request(self, tap: FeatureTap) -> None:
        """Validates the options against the ViT and asks the tap for the features (called at INIT)."""

    @abstractmethod
    def _compute(self, tap: FeatureTap) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(term, record)``: the unweighted scalar term (0 where no part of it was valid) and a
        detached float32 vector ``[n_valid, n_total, term, *stats]`` for logging (``term`` and the stats
        averaged over the valid parts)."""

    @staticmethod
    def _average_valid(
        values: list[torch.Tensor], valids: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Averages the parts of a term over the valid ones (no device sync).

        Returns:
            ``(term, denominator, head)``: the mean of the valid parts (0 if none), the number of valid parts
            (at least 1, to average the stats with), and the record's first entries ``[n_valid, n_total, term]``.
        """
        n_valid = torch.stack(valids).sum()
        denominator = n_valid.clamp_min(1)
        term = torch.stack(values).sum() / denominator
        head = [n_valid.float(), n_valid.new_full((), len(values), dtype=torch.float32), term.detach().float()]
        return term, denominator, head

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

    def _setup(self, state: State) -> None:
        try:
            tap = get_feature_tap(state.model)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
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
            rows = torch.stack(self._records).tolist()  # the trainer has synchronised already
            self._records = []
            n_valid = sum(row[0] for row in rows)
            n_total = sum(row[1] for row in rows)
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
                for j, stat in enumerate(("term",) + self.stat_names, start=2):
                    metrics[f"{self.key}/{stat}"] = sum(row[j] * row[0] for row in rows) / n_valid
        logger.log_metrics(metrics, step=self._batch)

    def _skip_reason(self) -> str:
        return "degenerate batch"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> dict[str, Any]:
        return {"weight": self.schedule, "gather": self.gather}
