"""StepMetrics files every training metric under the step it belongs to, whichever event logs it."""

from __future__ import annotations

import torch
from composer import Callback, Trainer
from composer.core import Event
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.callbacks import StepMetrics


class LogsAtTwoEvents(Callback):
    """Logs the index of the step in progress inside the step (AFTER_LOSS) and after it (BATCH_END)."""

    def __init__(self) -> None:
        self.step = -1

    def run_event(self, event: Event, state, logger) -> None:
        if event == Event.BATCH_START:
            self.step = int(state.timestamp.batch)
        elif event == Event.AFTER_LOSS:
            logger.log_metrics({"probe/in_step": self.step})
        elif event == Event.BATCH_END:
            logger.log_metrics({"probe/after_step": self.step, "probe/text": "not a number"})


def test_metrics_logged_inside_and_after_a_step_share_its_row():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 4), torch.randint(0, 2, (12,)))
    steps = StepMetrics()
    Trainer(
        model=ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2),
        train_dataloader=DataLoader(data, batch_size=4),  # 3 steps an epoch: 5 steps end inside the 2nd epoch
        max_duration="5ba",
        callbacks=[LogsAtTwoEvents()],
        loggers=[steps],
        progress_bar=False,
        device="cpu",
    ).fit()
    rows = steps.rows()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    for i, r in enumerate(rows[:5]):
        assert r["probe/in_step"] == r["probe/after_step"] == r["time/batch"] == i
        assert "loss/train/total" in r and "probe/text" not in r
    assert rows[3]["time/epoch"] == 1  # logged when the 2nd epoch starts, before its first step
    # after the last step the loop logs its counters once more: they keep the counter's value, not step 4's row
    assert rows[5]["time/batch"] == 5 and not any(k.startswith(("probe/", "loss/")) for k in rows[5])
