"""Weight schedules for the regularisers, as pure functions of Composer's training time.

A schedule maps the trainer's ``state.timestamp`` (and ``state.max_duration``, for times in ``"dur"``)
to a weight. It keeps no state of its own, so a run resumed from a checkpoint gets exactly the weight
an uninterrupted run would get at the same timestamp.

Times are Composer time strings, parsed with :meth:`composer.core.Time.from_timestring`:
``"10ep"`` (epochs), ``"500ba"`` (batches), ``"1000sp"`` (samples), ``"5iter"``, ``"100tok"`` or
``"0.25dur"`` (a fraction of ``max_duration``). A boundary in ``"ep"`` is reached when that epoch
starts (``timestamp.epoch`` counts completed epochs), so ``start: 10ep`` switches a weight on for the
eleventh epoch, and weights given in epochs change only at epoch boundaries; use ``"ba"`` (or
``"dur"`` with ``max_duration`` in batches) for a smooth ramp.

From YAML, the ``weight`` option of :class:`~magma_composer.algorithms.magma.MAGMA` and
:class:`~magma_composer.algorithms.uniformity.Uniformity` takes a number or a mapping:

.. code-block:: yaml

    weight: 0.01                                               # constant
    weight: {type: warmup, start: 10ep, end: 110ep, value: 1.0}  # the published MAGMA schedule
    weight: {type: linear, start: 0ba, end: 1000ba, start_value: 0.0, end_value: 1.0}
    weight: {type: intervals, intervals: [[0ep, 10ep, 0.5], [10ep, 20ep, 1.0]]}
    weight: {type: triangle, start: 0ep, peak: 100ep, end: 200ep, value: 1.0}   # the MAGMA code's triangle
    weight: {type: step, value: 1.0, milestones: [100ep, 200ep], gamma: 0.1, start: 5ep}  # the MAGMA code's step
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

from composer.core import Time, Timestamp, TimeUnit

if TYPE_CHECKING:
    from composer.core import State

__all__ = [
    "WeightSchedule",
    "Constant",
    "Warmup",
    "Linear",
    "Intervals",
    "Triangle",
    "Step",
    "build_schedule",
    "parse_time",
    "SCHEDULE_TYPES",
]

TimeLike = Union[str, Time]
_UNITS_OK = (TimeUnit.ITERATION, TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN, TimeUnit.DURATION)


def parse_time(value: TimeLike, what: str = "time") -> Time:
    """Parses a Composer time string (``"10ep"``, ``"500ba"``, ``"0.25dur"``) or passes a ``Time`` through.

    Args:
        value (str | Time): the time.
        what (str): the option's name, for error messages.

    Raises:
        ValueError: if ``value`` is not a time string, is negative, or is in seconds (wall-clock time would
            make the schedule depend on the machine's speed).
    """
    if isinstance(value, Time):
        time = value
    elif isinstance(value, str):
        try:
            time = Time.from_timestring(value.strip())
        except ValueError:
            raise ValueError(
                f"{what}={value!r} is not a Composer time string; write e.g. '10ep', '500ba', '2048sp' or '0.25dur'"
            ) from None
    else:
        raise TypeError(
            f"{what} must be a Composer time string such as '10ep', '500ba' or '0.25dur', got {value!r} "
            f"({type(value).__name__})"
        )
    if time.unit not in _UNITS_OK:
        valid = ", ".join(repr(u.value) for u in _UNITS_OK)
        raise ValueError(f"{what}={value!r}: unit {time.unit.value!r} is not supported; use one of {valid}")
    if time.value < 0:
        raise ValueError(f"{what}={value!r} must not be negative")
    return time


def _elapsed(unit: TimeUnit, timestamp: Timestamp, max_duration: Time | None) -> float:
    """Training progress in ``unit`` (a fraction of ``max_duration`` for ``"dur"``)."""
    if unit == TimeUnit.DURATION:
        if max_duration is None:
            raise ValueError("a schedule time in 'dur' needs the trainer's max_duration, which is not set")
        return timestamp.get(max_duration.unit).value / max_duration.value
    return float(timestamp.get(unit).value)


def _reached(time: Time, timestamp: Timestamp, max_duration: Time | None) -> bool:
    return _elapsed(time.unit, timestamp, max_duration) >= time.value


def _check_weight(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}={value!r} must be a finite number >= 0")
    return value


def _check_window(start: Time, end: Time, what: str) -> None:
    if start.unit == end.unit and not start.value < end.value:
        raise ValueError(f"{what}: start={start} must come before end={end}")


class WeightSchedule(ABC):
    """A regulariser weight as a pure function of training time.

    Call it with the trainer's state (``schedule(state)``) or, equivalently, use :meth:`value_at`.
    """

    def __call__(self, state: State) -> float:
        max_duration = state.max_duration
        # a 'dur' time of a run measured in epochs: count progress in batches, not whole epochs
        if max_duration is not None and max_duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
            max_duration = Time(int(max_duration.value) * int(state.dataloader_len), TimeUnit.BATCH)
        return self.value_at(state.timestamp, max_duration)

    @abstractmethod
    def value_at(self, timestamp: Timestamp, max_duration: Time | None = None) -> float:
        """The weight at ``timestamp`` (``max_duration`` is needed only for times in ``"dur"``)."""


class Constant(WeightSchedule):
    """The same weight throughout training.

    Args:
        value (float): the weight, ``>= 0``.
    """

    def __init__(self, value: float) -> None:
        self.value = _check_weight(value, "weight.value")

    def value_at(self, timestamp: Timestamp, max_duration: Time | None = None) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Constant(value={self.value!r})"


class Warmup(WeightSchedule):
    """The published MAGMA schedule: ``value`` on ``[start, end)``, 0 before and after.

    Args:
        start (str | Time): when the weight switches on, e.g. ``"10ep"``.
        end (str | Time): when it switches off again, e.g. ``"110ep"``.
        value (float): the weight inside the window.
    """

    def __init__(self, start: TimeLike, end: TimeLike, value: float = 1.0) -> None:
        self.start = parse_time(start, "weight.start")
        self.end = parse_time(end, "weight.end")
        _check_window(self.start, self.end, "weight (warmup)")
        self.value = _check_weight(value, "weight.value")

    def value_at(self, timestamp: Timestamp, max_duration: Time | None = None) -> float:
        if _reached(self.start, timestamp, max_duration) and not _reached(self.end, timestamp, max_duration):
            return self.value
        return 0.0

    def __repr__(self) -> str:
        return f"Warmup(start={str(self.start)!r}, end={str(self.end)!r}, value={self.value!r})"


class Linear(WeightSchedule):
    """A linear ramp from ``start_value`` at ``start`` to ``end_value`` at ``end``, constant outside.

    ``start`` and ``end`` must be in the same unit. Before ``start`` the weight is ``start_value``; from
    ``end`` on it is ``end_value``.

    Args:
        start (str | Time): the ramp's beginning.
        end (str | Time): the ramp's end.
        start_value (float): the weight up to ``start``.
        end_value (float): the weight from ``end`` on.
    """

    def __init__(self, start: TimeLike, end: TimeLike, start_value: float = 0.0, end_value: float = 1.0) -> None:
        self.start = parse_time(start, "weight.start")
        self.end = parse_time(end, "weight.end")
        if self.start.unit != self.end.unit:
            raise ValueError(
                f"weight (linear): start={self.start} and end={self.end} must be in the same unit to interpolate"
            )
        _check_window(self.start, self.end, "weight (linear)")
        self.start_value = _check_weight(start_value, "weight.start_value")
        self.end_value = _check_weight(end_value, "weight.end_value")

    def value_at(self, timestamp: Timestamp, max_duration: Time | None = None) -> float:
        now = _elapsed(self.start.unit, timestamp, max_duration)
        if now <= self.start.value:
            return self.start_value
        if now >= self.end.value:
            return self.end_value
        frac = (now - self.start.value) / (self.end.value - self.start.value)
        return self.start_value + frac * (self.end_value - self.start_value)

    def __repr__(self) -> str:
        return (
            f"Linear(start={str(self.start)!r}, end={str(self.end)!r}, start_value={self.start_value!r}, "
            f"end_value={self.end_value!r})"
        )


class Intervals(WeightSchedule):
    """A piecewise-constant weight: ``value`` on each ``[start, end)`` window, 0 outside all of them.

    Windows in the same unit must not overlap; where windows in different units overlap, the first one
    listed wins.

    Args:
        intervals (list): ``[[start, end, value], ...]``, e.g. ``[["0ep", "10ep", 0.5], ["10ep", "20ep", 1.0]]``.
    """

    def __init__(self, intervals: Sequence[Sequence[Any]]) -> None:
        if isinstance(intervals, (str, bytes)) or not isinstance(intervals, Sequence) or not intervals:
            raise ValueError(f"weight.intervals must be a non-empty list of [start, end, value], got {intervals!r}")
        self.intervals: list[tuple[Time, Time, float]] = []
        for k, item in enumerate(intervals):
            what = f"weight.intervals[{k}]"
            if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3:
                raise ValueError(f"{what} must be [start, end, value], got {item!r}")
            start, end = parse_time(item[0], f"{what}.start"), parse_time(item[1], f"{what}.end")
            _check_window(start, end, what)
            self.intervals.append((start, end, _check_weight(item[2], f"{what}.value")))
        for i, (s1, e1, _) in enumerate(self.intervals):
            for s2, e2, _ in self.intervals[i + 1 :]:
                if len({s1.unit, e1.unit, s2.unit, e2.unit}) == 1 and s1.value < e2.value and s2.value < e1.value:
                    raise ValueError(f"weight.intervals: [{s1}, {e1}) overlaps [{s2}, {e2})")

    def value_at(self, timestamp: Timestamp, max_duration: Time | None = None) -> float:
        for start, end, value in self.intervals:
            if _reached(start, timestamp, max_duration) and not _reached(end, timestamp, max_duration):
                return value
        return 0.0

    def __repr__(self) -> str:
        items = ", ".join(f"[{str(s)!r}, {str(e)!r}, {v!r}]" for s, e, v in self.intervals)
        return f"Intervals(intervals=[{items}])"


class Triangle(WeightSchedule):
    """The MAGMA code's ``triangle`` schedule: a linear rise to ``value`` at ``peak`` and a linear fall after it.

    The weight is ``start_value`` before ``start``, rises linearly to ``value`` at ``peak``, falls linearly to
    ``end_value`` at ``end`` and stays there. The original (``TriangleScheduler`` of the MAGMA code, keys
    ``start_weight``, ``max_weight``, ``end_weight``, ``start_epoch``, ``mid_epoch``, ``end_epoch``) is this
    function evaluated at whole epochs; times in ``"ep"`` reproduce it exactly, ``"ba"`` or ``"dur"`` make it
    smooth. ``start == peak`` (a jump, then the fall) and ``peak == end`` (the rise, then a drop) are allowed.

    Args:
        start (str | Time): where the rise begins.
        peak (str | Time): where the weight is ``value``; ``start <= peak <= end``, all three in one unit.
        end (str | Time): where the fall ends; after ``start``.
        value (float): the weight at ``peak``.
        start_value (float): the weight up to ``start``.
        end_value (float): the weight from ``end`` on.
    """

    def __init__(
        self,
        start: TimeLike,
        peak: TimeLike,
        end: TimeLike,
        value: float = 1.0,
        start_value: float = 0.0,
        end_value: float = 0.0,
    ) -> None:
        self.start = parse_time(start, "weight.start")
        self.peak = parse_time(peak, "weight.peak")
        self.end = parse_time(end, "weight.end")
        if len({self.start.unit, self.peak.unit, self.end.unit}) != 1:
            raise ValueError(
                f"weight (triangle): start={self.start}, peak={self.peak} and end={self.end} must be in the same "
                "unit to interpolate"
            )
        _check_window(self.start, self.end, "weight (triangle)")
        if not self.start.value <= self.peak.value <= self.end.value:
            raise ValueError(
                f"weight (triangle): peak={self.peak} must lie between start={self.start} and end={self.end}"
            )
        self.value = _check_weight(value, "weight.value")
        self.start_value = _check_weight(start_value, "weight.start_value")
        self.end_value = _check_weight(end_value, "weight.end_value")

    def value_at(self, timestamp: Timestamp, max_duration: Time | None = None) -> float:
        now = _elapsed(self.start.unit, timestamp, max_duration)
        start, peak, end = self.start.value, self.peak.value, self.end.value
        if now < start:
            return self.start_value
        if now < peak:  # so peak > start
            return self.start_value + (now - start) / (peak - start) * (self.value - self.start_value)
        if now < end:  # so end > peak
            return self.value + (now - peak) / (end - peak) * (self.end_value - self.value)
        return self.end_value

    def __repr__(self) -> str:
        return (
            f"Triangle(start={str(self.start)!r}, peak={str(self.peak)!r}, end={str(self.end)!r}, "
            f"value={self.value!r}, start_value={self.start_value!r}, end_value={self.end_value!r})"
        )


class Step(WeightSchedule):
    """The MAGMA code's ``step`` schedule: ``value`` from ``start``, multiplied by ``gamma`` at every milestone.

    The weight is 0 before ``start``; from ``start`` on it is ``value * gamma ** k``, where ``k`` counts the
    milestones reached so far (a milestone before ``start`` counts too, as in the original). The original
    (``StepScheduler`` of the MAGMA code, keys ``weight``, ``steps``, ``scale``) had ``scale`` 0.1 by default and a
    ``warmup_epochs`` of 5 that its YAML could not change: its weight was always 0 for the first five epochs, which
    ``start: 5ep`` reproduces. Its state was the list of milestones not yet passed; here the weight is a pure
    function of the time, so a resumed run gets the same weight.

    Args:
        value (float): the weight from ``start`` until the first milestone.
        milestones (list): Composer times (``["100ep", "200ep"]``) at which the weight is multiplied by ``gamma``;
            increasing where they share a unit.
        gamma (float): the factor applied at each milestone, ``>= 0``.
        start (str | Time): when the weight switches on (0 before).
    """

    def __init__(
        self, milestones: Sequence[TimeLike], value: float = 1.0, gamma: float = 0.1, start: TimeLike = "0ba"
    ) -> None:
        if isinstance(milestones, (str, bytes, Time)) or not isinstance(milestones, Sequence) or not milestones:
            raise ValueError(f"weight.milestones must be a non-empty list of Composer times, got {milestones!r}")
        self.milestones = [parse_time(m, f"weight.milestones[{k}]") for k, m in enumerate(milestones)]
        for k, (a, b) in enumerate(zip(self.milestones, self.milestones[1:])):
            if a.unit == b.unit and not a.value < b.value:
                raise ValueError(f"weight.milestones: {b} (item {k + 1}) must come after {a}; list them in order")
        self.value = _check_weight(value, "weight.value")
        self.gamma = _check_weight(gamma, "weight.gamma")
        self.start = parse_time(start, "weight.start")

    def value_at(self, timestamp: Timestamp, max_duration: Time | None = None) -> float:
        if not _reached(self.start, timestamp, max_duration):
            return 0.0
        passed = sum(_reached(m, timestamp, max_duration) for m in self.milestones)
        return self.value * self.gamma**passed

    def __repr__(self) -> str:
        milestones = ", ".join(repr(str(m)) for m in self.milestones)
        return f"Step(milestones=[{milestones}], value={self.value!r}, gamma={self.gamma!r}, start={str(self.start)!r})"


SCHEDULE_TYPES: dict[str, type[WeightSchedule]] = {
    "constant": Constant,
    "warmup": Warmup,
    "linear": Linear,
    "intervals": Intervals,
    "triangle": Triangle,
    "step": Step,
}

_REQUIRED = {
    "constant": {"value"},
    "warmup": {"start", "end"},
    "linear": {"start", "end"},
    "intervals": {"intervals"},
    "triangle": {"start", "peak", "end"},
    "step": {"milestones"},
}
_OPTIONAL = {
    "constant": set(),
    "warmup": {"value"},
    "linear": {"start_value", "end_value"},
    "intervals": set(),
    "triangle": {"value", "start_value", "end_value"},
    "step": {"value", "gamma", "start"},
}


def build_schedule(spec: Union[float, Mapping[str, Any], WeightSchedule], what: str = "weight") -> WeightSchedule:
    """Builds a weight schedule from a number, a YAML mapping, or an existing schedule.

    Args:
        spec: a number (a constant weight); a mapping with ``type`` (one of ``constant``, ``warmup``,
            ``linear``, ``intervals``, ``triangle``, ``step``) and that type's keys; or a :class:`WeightSchedule`.
        what (str): the option's name, for error messages.

    Raises:
        ValueError / TypeError: naming the offending key or value and what is valid.

    Example:
        >>> build_schedule({'type': 'warmup', 'start': '10ep', 'end': '110ep', 'value': 1.0})
        Warmup(start='10ep', end='110ep', value=1.0)
    """
    if isinstance(spec, WeightSchedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(_check_weight(spec, what))
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"{what} must be a number or a mapping such as {{type: warmup, start: 10ep, end: 110ep, value: 1.0}}, "
            f"got {spec!r} ({type(spec).__name__})"
        )
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in SCHEDULE_TYPES:
        raise ValueError(f"{what}.type={kind!r} is not a schedule type; valid types are {sorted(SCHEDULE_TYPES)}")
    missing = _REQUIRED[kind] - set(spec)
    if missing:
        raise ValueError(f"{what} (type {kind}) is missing {sorted(missing)}")
    unknown = set(spec) - _REQUIRED[kind] - _OPTIONAL[kind]
    if unknown:
        valid = sorted(_REQUIRED[kind] | _OPTIONAL[kind] | {"type"})
        raise ValueError(f"{what} (type {kind}): unknown keys {sorted(unknown)}; valid keys are {valid}")
    return SCHEDULE_TYPES[kind](**spec)
