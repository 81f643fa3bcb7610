"""trm/cli.py: every script's range check says the flag, its range in words and the value, in one style; Ctrl-C
is one line; a list of files may be given in several pieces."""
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trm.cli import in_words, range_error
from trm.flags import trainer_parser

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.mark.parametrize("raised,expected", [("KeyboardInterrupt", "interrupted (Ctrl-C)"),
                                             ("ValueError('x')", "Traceback")])
def test_ctrl_c_where_a_script_does_not_catch_it_is_one_line(raised, expected):
    code = f"from trm.cli import quiet_interrupt; quiet_interrupt(); raise {raised}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert expected in r.stderr
    if raised == "KeyboardInterrupt":  # no traceback, and the exit the shell reads as Ctrl-C (130)
        assert "Traceback" not in r.stderr and r.returncode == -signal.SIGINT, (r.returncode, r.stderr)


def test_a_list_of_files_given_twice_is_refused_not_cut_to_the_last(capsys):
    # argparse alone trains on b.jsonl.gz only, silently
    p = trainer_parser("train_trm_lm.py\n\nexample")
    for flag in ("--train_paths", "--valid_paths"):
        with pytest.raises(SystemExit) as stop:
            p.parse_args([flag, "a.jsonl.gz", flag, "b.jsonl.gz"])
        assert stop.value.code == 2
        assert f"error: {flag} given twice; name all its files after one {flag} (e.g. {flag} a.jsonl.gz b.jsonl.gz)" \
            in capsys.readouterr().err
    assert p.parse_args(["--train_paths", "a", "b"]).train_paths == ["a", "b"]
    assert p.parse_args([]).train_paths[0] == "train_0.jsonl.gz"  # the default
    assert p.parse_args(["--valid_paths"]).valid_paths == []  # none: no evaluation, as before


def fail_once_as(rank, wait_s):
    # a process that installed a SIGTERM handler that only takes note (as the training loop's does), then meets a
    # verdict every rank meets alike
    code = ("import signal, trm.cli as cli; signal.signal(signal.SIGTERM, lambda *a: None); "
            f"cli.PEER_WAIT_S = {wait_s}; cli.fail_once('bad flag', code=2)")
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_other_ranks_wait_for_rank_0s_line_and_die_at_once_when_torchrun_ends_them():
    # torchrun stops every process at the first exit: a rank 1 that left at once cut rank 0 off before its line
    # (CI on a slow host: no "error:" line at all)
    assert fail_once_as(0, 60).communicate(timeout=60) == ("", "error: bad flag\n")
    other = fail_once_as(1, 60)
    with pytest.raises(subprocess.TimeoutExpired):
        other.wait(timeout=8)  # (long past a start-up's skew between ranks)
    other.send_signal(signal.SIGTERM)  # what torchrun sends once rank 0 has left
    assert other.wait(timeout=5) == -signal.SIGTERM and other.communicate() == ("", "")


def test_a_rank_whose_rank_0_never_speaks_leaves_silently_with_the_code_after_the_wait():
    other = fail_once_as(1, 1)
    assert other.wait(timeout=60) == 2 and other.communicate() == ("", "")
