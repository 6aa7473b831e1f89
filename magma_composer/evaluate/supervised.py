"""The supervised protocols (linear probe, MLP probe, fine-tuning) as one Composer Trainer run.

:func:`run_supervised` trains an :class:`~magma_composer.evaluate.classifier.EncoderClassifier` on the training split,
evaluates it on the test split every ``eval_interval`` (and at the end), and reports both the last evaluation and
the best one: papers differ (PMAE's code reported the best epoch, which picks the test maximum and is optimistic;
MAE reports the last), so both are given and the last is the headline.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from composer import Algorithm, Callback, Event, State, Trainer
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from magma_composer.evaluate.classifier import EncoderClassifier, EvalDataError
from magma_composer.options import OptionError
from magma_composer.precision import cpu_autocast, default_precision

__all__ = ["EvaluationRecorder", "run_supervised"]


class EvaluationRecorder(Callback):
    """Records every evaluation's top-1 / top-5 (``history``: ``(label, top1, top5)``, accuracies in percent; the
    label is the training time of the evaluation, ``'3ep'`` at an epoch's end, else ``'120ba'``).

    After the first evaluation that follows at least one whole training epoch (before that, training need not
    have shown every class yet), the classes of the two splits are compared over all ranks: a class in the test
    split that training never showed raises :class:`EvalDataError`.

    Args:
        eval_label (str): the evaluator's label (Composer's default ``'eval'``).
    """

    def __init__(self, eval_label: str = "eval") -> None:
        self.eval_label = eval_label
        self.history: list[tuple[str, float, float]] = []
        self.epochs: list[int] = []
        self.classes_checked = False

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.EVAL_END:
            self._record(state)
        # only conditions that every rank shares decide the check: it is a collective operation
        if event in (Event.EVAL_END, Event.FIT_END) and self._can_check(state):
            self._check_classes(state)

    def _can_check(self, state: State) -> bool:
        return not self.classes_checked and bool(self.history) and state.timestamp.epoch.value >= 1

    def _record(self, state: State) -> None:
        metrics = state.eval_metrics.get(self.eval_label)
        if not metrics:
            return
        # percent, rounded past float32's noise (0.0875 -> 8.75, not 8.749999850988388)
        top1 = round(100.0 * float(metrics["top1"].compute()), 4)
        top5 = round(100.0 * float(metrics["top5"].compute()), 4)
        ts = state.timestamp
        label = f"{ts.epoch.value}ep" if ts.batch_in_epoch.value == 0 else f"{ts.batch.value}ba"
        self.history.append((label, top1, top5))
        self.epochs.append(int(ts.epoch.value))

    def _check_classes(self, state: State) -> None:
        self.classes_checked = True
        model = _unwrap(state.model)
        if not isinstance(model, EncoderClassifier):
            return
        seen = torch.stack([model.seen_classes("training").cpu(), model.seen_classes("test").cpu()]).int()
        seen = state.device.tensor_to_device(seen)
        dist.all_reduce(seen, reduce_operation="MAX")
        train, test = seen[0].bool().cpu(), seen[1].bool().cpu()
        only_test = torch.nonzero(test & ~train).flatten().tolist()
        if only_test:
            raise EvalDataError(
                f"classes differ between splits: the test split has class(es) {only_test} that the training split "
                f"never showed (training has {int(train.sum())} classes, test {int(test.sum())}); use splits of the "
                "same data set"
            )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ComposerModel inside a DistributedDataParallel wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def run_supervised(
    model: EncoderClassifier,
    train_loader: Any,
    test_loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_duration: str,
    algorithms: Sequence[Algorithm] = (),
    loggers: Sequence[LoggerDestination] = (),
    callbacks: Sequence[Callback] = (),
    device: str = "cpu",
    precision: str | None = None,
    seed: int = 17,
    eval_interval: str | None = None,
    progress_bar: bool = True,
    run_name: str | None = None,
    save_folder: str | None = None,
    device_train_microbatch_size: int | None = None,
) -> dict:
    """Trains ``model`` with Composer and reports its test accuracy.

    Composer computes the metrics over all ranks (``composer -n N``); the result is the same on every rank.
    Composer's MixUp, CutMix and LabelSmoothing work as ``algorithms``: the model's loss takes their soft targets.

    Args:
        model (EncoderClassifier): the classifier.
        train_loader: the training split's loader (batches ``(images, labels[, indices])``).
        test_loader: the test split's loader.
        optimizer (torch.optim.Optimizer): e.g. :func:`~magma_composer.evaluate.optim.build_eval_optimizer`.
        scheduler: a Composer scheduler (``magma_composer.train.build_scheduler``), stepped every batch.
        max_duration (str): Composer time, e.g. ``'90ep'``.
        algorithms (Sequence[Algorithm]): Composer algorithms (MixUp, CutMix, LabelSmoothing...).
        loggers (Sequence[LoggerDestination]): Composer loggers.
        callbacks (Sequence[Callback]): more callbacks.
        device (str): ``'cpu'`` or ``'gpu'``.
        precision (str, optional): Composer precision. Default: ``'amp_bf16'`` on a GPU and on a CPU with
            native bf16 (the model autocasts itself there, see :mod:`magma_composer.precision`), else ``'fp32'``.
        seed (int): the run's seed.
        eval_interval (str, optional): Composer time between evaluations (also one at the end of training).
            Default: ``'1ep'``.
        progress_bar (bool): Composer's progress bar.
        run_name (str, optional): the run's name.
        save_folder (str, optional): where Composer saves checkpoints (none if ``None``).
        device_train_microbatch_size (int, optional): microbatch per device (gradient accumulation).

    Returns:
        dict: ``top1``, ``top5`` (percent, at the last evaluation), ``best_top1``, ``best_top5`` (the evaluation
        with the highest top-1, first if tied), ``best_at`` (its label) and ``best_epoch`` (completed training
        epochs then), ``history`` (``[(label, top1, top5)]``), ``evaluations``, ``steps`` (optimizer steps),
        ``samples`` (training samples), ``seconds`` (wall time of training and evaluation), ``run_name``.

    Raises:
        EvalDataError: labels missing or out of range, classes that differ between the splits, images of another
            size than the encoder's.
    """
    from composer.core import Time

    eval_interval = "1ep" if eval_interval is None else eval_interval
    for key, value in (("max_duration", max_duration), ("eval_interval", eval_interval)):
        try:
            Time.from_timestring(value)
        except (ValueError, TypeError):
            raise OptionError(key, f"{value!r} is not a Composer time string such as '90ep' or '500ba'") from None
    recorder = EvaluationRecorder()
    precision = precision or default_precision(device)
    if device == "cpu":  # Composer autocasts only on GPUs: the model autocasts itself, Composer runs in fp32
        cpu_autocast(model, precision)
        precision = "fp32"
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=test_loader,
        eval_interval=eval_interval,
        max_duration=max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=list(algorithms),
        callbacks=[*callbacks, recorder],
        loggers=list(loggers),
        run_name=run_name,
        progress_bar=progress_bar,
        save_folder=save_folder,
        device=device,
        precision=precision,
        seed=seed,
        device_train_microbatch_size=device_train_microbatch_size,
    )
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Composer warns at every data set's shorter last batch; that is expected here, not a problem
            warnings.filterwarnings("ignore", message="Cannot split tensor of length", category=UserWarning)
            trainer.fit()
    finally:
        seconds = time.perf_counter() - start
        trainer.close()
    if not recorder.history:
        raise EvalDataError("the test split gave no evaluation (is it empty?)")
    best = max(range(len(recorder.history)), key=lambda i: (recorder.history[i][1], -i))
    label, top1, top5 = recorder.history[-1]
    return {
        "top1": top1,
        "top5": top5,
        "best_top1": recorder.history[best][1],
        "best_top5": recorder.history[best][2],
        "best_at": recorder.history[best][0],
        "best_epoch": recorder.epochs[best],
        "history": list(recorder.history),
        "evaluations": len(recorder.history),
        "steps": int(trainer.state.timestamp.batch.value),
        "samples": int(trainer.state.timestamp.sample.value),
        "seconds": seconds,
        "run_name": trainer.state.run_name,
    }
