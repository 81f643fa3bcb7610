"""trm/clock.py: the ETA of the log line is the wall clock's, for runs of any length."""
from trm import clock as clock_module
from trm.clock import RunClock, hms


def test_the_eta_counts_its_hours_past_a_day():
    assert [hms(s) for s in (0, 59.9, 3600 * 23 + 61, 3600 * 25, 3600 * 250 + 1)] == \
        ["00:00:00", "00:00:59", "23:01:01", "25:00:00", "250:00:01"]


def test_the_eta_includes_the_pauses_to_come_and_ends_with_the_budget(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(clock_module.time, "time", lambda: now[0])
    clock = RunClock()
    assert clock.eta(100, 0.2) == 20.0  # no pause yet: the training left
    now[0] += 10  # training
    with clock.pause("evaluating"):
        now[0] += 10
    now[0] += 10  # training: 20 s of the session's 30 went to it
    assert clock.eta(100, 0.2) == 30.0  # 20 s of training left, and half as much again evaluating
    resumed = RunClock(seconds_before=30.0, max_minutes=1.0)  # a budget of 60 training seconds, 30 spent before
    now[0] += 20
    assert resumed.eta(1000, 0.2) == 10.0  # the budget ends first
