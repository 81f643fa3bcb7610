"""trm/cli.py: every script's range check says the flag, its range in words and the value, in one style."""
from types import SimpleNamespace

import pytest

from trm.cli import in_words, range_error

WORDS = [("[1, inf)", "at least 1"), ("(0, inf)", "greater than 0"), ("[0, 1)", "at least 0 and less than 1"),
         ("[1, 1024]", "between 1 and 1,024"), ("[0.98, 1.0]", "between 0.98 and 1.0")]


@pytest.mark.parametrize("interval,words", WORDS)
def test_intervals_in_words(interval, words):
    assert in_words(interval) == words


@pytest.mark.parametrize("value", [0, -1, 1.0, float("nan"), float("inf")])
def test_values_outside_are_refused_with_flag_range_meaning_and_value(value):
    message = range_error(SimpleNamespace(ema_decay=value), {"ema_decay": ("[0, 1)", "0 = no EMA")})
    if value == 0:
        assert message is None
    else:
        assert message == f"--ema_decay must be at least 0 and less than 1 (0 = no EMA), got {value}"


def test_edges_and_unset_flags():
    ranges = {"lr": "(0, inf)", "top_p": "[0, 1]", "seed": "[0, 4294967295]"}
    assert range_error(SimpleNamespace(lr=1e-9, top_p=1, seed=2**32 - 1), ranges) is None
    assert range_error(SimpleNamespace(lr=None, top_p=0, seed=None), ranges) is None  # None: the flag was not given
    assert range_error(SimpleNamespace(lr=0.0, top_p=0, seed=0), ranges) == "--lr must be greater than 0, got 0.0"
    assert "--seed must be between 0 and 4,294,967,295" in range_error(SimpleNamespace(lr=1, top_p=0, seed=-1), ranges)
