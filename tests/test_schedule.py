"""trm/schedule.py: the learning rate each step gets, by steps and by the clock, for every --lr_schedule."""
import pytest

from trm.schedule import WSD_COOLDOWN, lr_at

LR, WARMUP, STEPS = 1e-3, 10, 110


def rates(schedule, **kw):
    return [lr_at(s, LR, WARMUP, STEPS, schedule, **kw) for s in range(STEPS)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_the_warm_up_climbs_to_the_top_and_nothing_goes_above_it(schedule):
    lrs = rates(schedule)
    assert lrs[:WARMUP] == sorted(lrs[:WARMUP]) and lrs[0] == LR / WARMUP
    assert lrs[WARMUP] == LR and max(lrs) == LR
    after = lrs[WARMUP:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # never back up once decaying


@pytest.mark.parametrize("schedule,floor", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0), ("wsd", 0.0)])
def test_each_schedule_ends_where_it_says(schedule, floor):
    assert lr_at(STEPS, LR, WARMUP, STEPS, schedule) == pytest.approx(floor * LR)


@pytest.mark.parametrize("cooldown", [None, 0.2, 1.0])
def test_wsd_holds_the_top_rate_until_its_cool_down_then_falls_linearly_to_zero(cooldown):
    share = cooldown or WSD_COOLDOWN
    lrs = rates("wsd", cooldown=cooldown)
    start = WARMUP + round((1 - share) * (STEPS - WARMUP))  # the first step of the cool-down
    assert lrs[WARMUP:start + 1] == pytest.approx([LR] * (start + 1 - WARMUP)) and lrs[start + 1] < LR
    falls = [a - b for a, b in zip(lrs[start:], lrs[start + 1:])]
    assert falls and all(f == pytest.approx(LR / (share * (STEPS - WARMUP))) for f in falls)  # one line down to 0
    assert lrs[-1] == pytest.approx(LR / (share * (STEPS - WARMUP)))  # one step before the end: one step's fall left


def test_wsd_on_the_clock_cools_down_by_the_time_spent_not_the_steps():
    # a --max_minutes run ends by the clock long before --max_steps: the cool-down follows the budget's share
    assert lr_at(50, LR, WARMUP, 10**6, "wsd", time_frac=0.5) == LR
    assert lr_at(50, LR, WARMUP, 10**6, "wsd", time_frac=0.8) == pytest.approx(LR * 0.2 / WSD_COOLDOWN)
    assert lr_at(50, LR, WARMUP, 10**6, "wsd", time_frac=1.0) == 0.0
