"""Weight schedules: values at the boundaries in every unit, YAML specs, errors, and purity (resume)."""

from types import SimpleNamespace

import pytest
import yaml
from composer.core import Time, Timestamp

from magma_composer.schedules import Constant, Linear, Step, Triangle, Warmup, build_schedule


def at(schedule, max_duration=None, **progress):
    """The schedule's value at a timestamp (``epoch=``, ``batch=``, ``sample=``...)."""
    duration = Time.from_timestring(max_duration) if max_duration else None
    return schedule.value_at(Timestamp(**progress), duration)


@pytest.mark.parametrize(
    "unit_key, start, end",
    [
        ("epoch", "10ep", "110ep"),
        ("batch", "500ba", "600ba"),
        ("sample", "1000sp", "2000sp"),
        ("iteration", "2iter", "3iter"),
    ],
)
def test_warmup_boundaries_each_unit(unit_key, start, end):
    s = Warmup(start, end, value=2.0)
    lo, hi = Time.from_timestring(start).value, Time.from_timestring(end).value
    assert at(s, **{unit_key: 0}) == 0.0
    assert at(s, **{unit_key: lo - 1}) == 0.0
    assert at(s, **{unit_key: lo}) == 2.0  # on at start (inclusive)
    assert at(s, **{unit_key: hi - 1}) == 2.0
    assert at(s, **{unit_key: hi}) == 0.0  # off at end (exclusive)
    assert at(s, **{unit_key: hi + 100}) == 0.0


def test_warmup_published_imagenet100_schedule():
    s = build_schedule({"type": "warmup", "start": "10ep", "end": "110ep", "value": 1.0})
    values = [at(s, epoch=e, batch=e * 50) for e in range(400)]
    assert values[:10] == [0.0] * 10
    assert values[10:110] == [1.0] * 100
    assert values[110:] == [0.0] * 290


def test_duration_units_use_max_duration_in_its_own_unit():
    s = Warmup("0.25dur", "0.5dur", value=1.0)
    # max_duration in epochs: 0.25dur of 400ep is epoch 100
    assert at(s, "400ep", epoch=99) == 0.0
    assert at(s, "400ep", epoch=100) == 1.0
    assert at(s, "400ep", epoch=199) == 1.0
    assert at(s, "400ep", epoch=200) == 0.0
    # max_duration in batches: 0.25dur of 1000ba is batch 250
    assert at(s, "1000ba", batch=249) == 0.0
    assert at(s, "1000ba", batch=250) == 1.0
    assert at(s, "1000ba", batch=500) == 0.0
    with pytest.raises(ValueError, match="max_duration"):
        at(s, batch=3)


def test_linear_ramp_values():
    s = Linear("100ba", "200ba", start_value=0.5, end_value=1.5)
    assert at(s, batch=0) == 0.5
    assert at(s, batch=100) == 0.5
    assert at(s, batch=150) == pytest.approx(1.0)
    assert at(s, batch=175) == pytest.approx(1.25)
    assert at(s, batch=200) == 1.5
    assert at(s, batch=10_000) == 1.5
    d = Linear("0dur", "0.5dur", start_value=0.0, end_value=1.0)
    assert at(d, "100ba", batch=25) == pytest.approx(0.5)
    assert at(d, "100ba", batch=80) == 1.0


def test_intervals_and_constant():
    s = build_schedule(
        {"type": "intervals", "intervals": [["0ep", "2ep", 0.5], ["5ep", "6ep", 2.0], ["100ba", "101ba", 7.0]]}
    )
    assert [at(s, epoch=e) for e in range(8)] == [0.5, 0.5, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0]
    assert at(s, epoch=3, batch=100) == 7.0  # a window in another unit
    assert at(Constant(0.01), epoch=123, batch=4) == 0.01
    assert build_schedule(0.01).value_at(Timestamp()) == 0.01
    assert build_schedule(1).value_at(Timestamp()) == 1.0


def test_yaml_specs_and_repr_round_trip():
    spec = yaml.safe_load("{type: warmup, start: 10ep, end: 110ep, value: 1.0}")
    s = build_schedule(spec)
    assert repr(s) == "Warmup(start='10ep', end='110ep', value=1.0)"
    assert eval(repr(s)).value_at(Timestamp(epoch=50)) == 1.0  # repr is valid Python
    linear = build_schedule(yaml.safe_load("{type: linear, start: 0ba, end: 10ba, end_value: 2.0}"))
    assert at(linear, batch=5) == pytest.approx(1.0)
    assert build_schedule(s) is s


def test_pure_function_of_timestamp_survives_a_checkpoint_round_trip():
    spec = {"type": "warmup", "start": "3ba", "end": "5ba", "value": 1.0}
    before = build_schedule(spec)
    stamp = Timestamp(epoch=1, batch=4, sample=64, batch_in_epoch=2, sample_in_epoch=32)
    restored = Timestamp()
    restored.load_state_dict(stamp.state_dict())  # what a checkpoint restores
    after = build_schedule(spec)  # a fresh object, as in a resumed run
    state = SimpleNamespace(timestamp=restored, max_duration=Time.from_timestring("10ba"))
    assert before.value_at(stamp) == after(state) == 1.0
    assert after(SimpleNamespace(timestamp=Timestamp(batch=5), max_duration=None)) == 0.0


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ({"type": "cosine"}, ValueError, "valid types are"),
        ({"start": "1ep", "end": "2ep"}, ValueError, "weight.type=None"),
        ({"type": "warmup", "start": "1ep"}, ValueError, r"missing \['end'\]"),
        ({"type": "warmup", "start": "1ep", "end": "2ep", "lambda": 1}, ValueError, r"unknown keys \['lambda'\]"),
        (
            {"type": "warmup", "start": "ten epochs", "end": "2ep"},
            ValueError,
            "weight.start='ten epochs' is not a Composer",
        ),
        ({"type": "warmup", "start": 10, "end": "2ep"}, TypeError, "weight.start must be a Composer time string"),
        ({"type": "warmup", "start": "5ep", "end": "2ep"}, ValueError, "must come before"),
        ({"type": "warmup", "start": "1sec", "end": "2sec"}, ValueError, "unit 'sec' is not supported"),
        ({"type": "warmup", "start": "1ep", "end": "2ep", "value": -1}, ValueError, "weight.value=-1.0 must be"),
        ({"type": "linear", "start": "1ep", "end": "200ba"}, ValueError, "same unit"),
        ({"type": "intervals", "intervals": [["0ep", "3ep", 1.0], ["2ep", "4ep", 1.0]]}, ValueError, "overlaps"),
        (
            {"type": "intervals", "intervals": [["0ep", "3ep"]]},
            ValueError,
            r"intervals\[0\] must be \[start, end, value\]",
        ),
        ({"type": "constant", "value": True}, TypeError, "must be a number"),
        (True, TypeError, "must be a number or a mapping"),
        ("0.5", TypeError, "must be a number or a mapping"),
        (float("nan"), ValueError, "finite"),
    ],
)
def test_bad_specs_give_clear_errors(spec, error, message):
    with pytest.raises(error, match=message):
        build_schedule(spec)


def test_dur_window_of_an_epoch_run_counts_batches():
    """A 'dur' window inside the first epoch of an epoch-measured run switches on and off within it."""
    from types import SimpleNamespace

    from composer.core import Time, Timestamp

    from magma_composer.schedules import build_schedule

    schedule = build_schedule({"type": "warmup", "start": "0.025dur", "end": "0.275dur", "value": 1.0})
    values = []
    for batch in range(30):  # 3 epochs of 10 batches
        state = SimpleNamespace(
            timestamp=Timestamp(epoch=batch // 10, batch=batch),
            max_duration=Time.from_timestring("3ep"),
            dataloader_len=10,
        )
        values.append(schedule(state))
    assert values == [0.0] + [1.0] * 8 + [0.0] * 21


# ---------------------------------------------------------------------- triangle and step (the MAGMA code's)
def test_triangle_hand_values_in_epochs_match_the_original_at_whole_epochs():
    # the MAGMA code's TriangleScheduler(start_weight=0.2, max_weight=1, end_weight=0.1, 10, 20, 40) at epoch e
    s = build_schedule(
        {
            "type": "triangle",
            "start": "10ep",
            "peak": "20ep",
            "end": "40ep",
            "value": 1.0,
            "start_value": 0.2,
            "end_value": 0.1,
        }
    )
    expected = {0: 0.2, 9: 0.2, 10: 0.2, 15: 0.6, 19: 0.92, 20: 1.0, 30: 0.55, 39: 0.145, 40: 0.1, 400: 0.1}
    for epoch, value in expected.items():
        assert at(s, epoch=epoch, batch=epoch * 7 + 3) == pytest.approx(value), epoch
    # in epochs the weight changes only at epoch boundaries: batches inside an epoch do not move it
    assert at(s, epoch=15, batch=15 * 7) == at(s, epoch=15, batch=15 * 7 + 6)


def test_triangle_defaults_batches_and_dur():
    s = Triangle("100ba", "200ba", "400ba")  # 0 -> 1 -> 0
    assert [at(s, batch=b) for b in (0, 99, 100, 150, 200, 300, 399, 400, 10_000)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.5, 1.0, 0.5, 0.005, 0.0, 0.0]
    )
    d = Triangle("0.1dur", "0.3dur", "0.5dur", value=2.0)
    # max_duration 1000ba: start 100, peak 300, end 500 batches
    assert [at(d, "1000ba", batch=b) for b in (50, 100, 200, 300, 400, 500, 900)] == pytest.approx(
        [0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0]
    )
    # a run measured in epochs counts 'dur' in batches (4 epochs of 250 batches): the same values
    state = SimpleNamespace(timestamp=Timestamp(epoch=0, batch=200), max_duration=Time.from_timestring("4ep"))
    state.dataloader_len = 250
    assert d(state) == pytest.approx(1.0)


def test_triangle_jump_and_drop_edges():
    jump = Triangle("10ba", "10ba", "20ba", value=1.0)  # start == peak: straight to the top, then the fall
    assert [at(jump, batch=b) for b in (9, 10, 15, 20)] == pytest.approx([0.0, 1.0, 0.5, 0.0])
    drop = Triangle("10ba", "20ba", "20ba", value=1.0)  # peak == end: the rise, then back to end_value
    assert [at(drop, batch=b) for b in (10, 15, 19, 20)] == pytest.approx([0.0, 0.5, 0.9, 0.0])


def test_step_hand_values():
    # the MAGMA code's StepScheduler(weight=1, steps=[3, 6], scale=0.1) with its fixed warmup_epochs=5
    s = build_schedule({"type": "step", "value": 1.0, "milestones": ["3ep", "6ep"], "gamma": 0.1, "start": "5ep"})
    values = [at(s, epoch=e) for e in range(9)]
    # 0 before epoch 5; the milestone at 3 already passed when it switches on, so it starts at 0.1
    assert values == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.01, 0.01, 0.01])
    plain = Step(["100ba", "200ba", "300ba"], value=2.0, gamma=0.5)  # on from the start by default
    assert [at(plain, batch=b) for b in (0, 99, 100, 199, 200, 300, 5000)] == pytest.approx(
        [2.0, 2.0, 1.0, 1.0, 0.5, 0.25, 0.25]
    )
    d = Step(["0.5dur"], value=1.0, gamma=0.0, start="0.25dur")  # gamma 0: switched off at the milestone
    assert [at(d, "200ba", batch=b) for b in (0, 49, 50, 99, 100, 199)] == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    mixed = Step(["2ep", "50ba"], value=1.0, gamma=0.1)  # milestones in different units each count once reached
    assert at(mixed, epoch=1, batch=49) == 1.0
    assert at(mixed, epoch=1, batch=50) == pytest.approx(0.1)
    assert at(mixed, epoch=2, batch=60) == pytest.approx(0.01)


def test_triangle_and_step_repr_round_trip_and_purity():
    for spec in (
        {"type": "triangle", "start": "1ep", "peak": "2ep", "end": "5ep", "value": 0.5, "end_value": 0.25},
        {"type": "step", "milestones": ["2ep", "4ep"], "value": 1.0, "gamma": 0.5, "start": "1ep"},
    ):
        s = build_schedule(spec)
        again = eval(repr(s))  # repr is valid Python
        for epoch in range(7):
            assert again.value_at(Timestamp(epoch=epoch)) == s.value_at(Timestamp(epoch=epoch))
        # a pure function of the time: a late query first, then an early one, gives the early value again
        late, early = s.value_at(Timestamp(epoch=6)), s.value_at(Timestamp(epoch=1))
        assert early == build_schedule(spec).value_at(Timestamp(epoch=1)) and late == s.value_at(Timestamp(epoch=6))


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ({"type": "triangle", "start": "0ep", "end": "2ep"}, ValueError, r"missing \['peak'\]"),
        ({"type": "triangle", "start": "0ep", "peak": "5ba", "end": "2ep"}, ValueError, "same unit"),
        ({"type": "triangle", "start": "0ep", "peak": "3ep", "end": "2ep"}, ValueError, "peak=3ep must lie between"),
        ({"type": "triangle", "start": "2ep", "peak": "2ep", "end": "2ep"}, ValueError, "must come before"),
        ({"type": "triangle", "start": "0ep", "peak": "1ep", "end": "2ep", "value": -1}, ValueError, "weight.value"),
        ({"type": "triangle", "start": "0ep", "peak": "1ep", "end": "2ep", "max_weight": 1}, ValueError, "unknown"),
        ({"type": "step", "value": 1.0}, ValueError, r"missing \['milestones'\]"),
        ({"type": "step", "milestones": []}, ValueError, "non-empty list"),
        ({"type": "step", "milestones": "10ep"}, ValueError, "non-empty list"),
        ({"type": "step", "milestones": ["20ep", "10ep"]}, ValueError, "must come after 20ep"),
        ({"type": "step", "milestones": ["10ep", "10ep"]}, ValueError, "must come after"),
        ({"type": "step", "milestones": ["10 epochs"]}, ValueError, r"weight.milestones\[0\]='10 epochs'"),
        ({"type": "step", "milestones": [10]}, TypeError, r"weight.milestones\[0\] must be a Composer time"),
        ({"type": "step", "milestones": ["10ep"], "gamma": -0.1}, ValueError, "weight.gamma=-0.1"),
        ({"type": "step", "milestones": ["10ep"], "start": "1sec"}, ValueError, "unit 'sec' is not supported"),
        ({"type": "step", "milestones": ["10ep"], "scale": 0.1}, ValueError, r"unknown keys \['scale'\]"),
    ],
)
def test_triangle_and_step_bad_specs(spec, error, message):
    with pytest.raises(error, match=message):
        build_schedule(spec)
