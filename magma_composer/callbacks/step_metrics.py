"""A logger that keeps every training metric under the step it belongs to.

Composer stamps a metric with the batch counter at the moment it is logged, and the counter advances before
``Event.BATCH_END``: a value logged inside step ``i`` (the loss, PCA masking's monitor at ``AFTER_LOSS``) carries
``i``, one logged at ``BATCH_END`` (MAGMA's and uniformity's diagnostics, the learning rate) carries ``i + 1``.
:class:`StepMetrics` instead files each value under the step whose ``BATCH_START`` came last, whichever event logs
it. Composer's own ``time/*`` counters are logged by the training loop between steps (at an epoch's start, and once
after the last step), so they keep the counter's value.
"""

from __future__ import annotations

from typing import Any

from composer.core import Event, State
from composer.loggers import Logger, LoggerDestination

__all__ = ["StepMetrics"]


class StepMetrics(LoggerDestination):
    """Every numeric metric logged during training, as one row per 0-based step index.

    Example:
        .. code-block:: python

            steps = StepMetrics()
            trainer = Trainer(..., loggers=[steps])
            trainer.fit()
            steps.rows()  # [{"step": 0, "loss/train/total": ..., "magma/term": ...}, ...]
    """

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict[int, dict[str, Any]] = {}
        self._step: int | None = None  # the step in progress: from its BATCH_START to the next one

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            self._step = int(state.timestamp.batch)
        elif event in (Event.EPOCH_END, Event.FIT_END):
            self._step = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):  # a table or an image: not a per-step number
                continue
            at = step if name.startswith("time/") or self._step is None else self._step
            if at is None:
                continue
            self._rows.setdefault(int(at), {"step": int(at)})[name] = number

    def rows(self) -> list[dict[str, Any]]:
        """The rows in step order: ``{"step": i, name: value, ...}``."""
        return [self._rows[s] for s in sorted(self._rows)]
