"""What every script does with its command line: refuse with one line, and check each number against its range.

Exit codes, the same in every script: 2 when the command cannot run as given (a flag out of range, a missing or
unusable file: fix the command; argparse uses 2 for its own refusals), 1 when the work itself failed (disk full),
3 when training diverged, 130 when Ctrl-C stopped it (the shell's code for SIGINT).
"""
import argparse
import datetime
import math
import os
import re
import signal
import sys
import time


def quiet_interrupt():
    """Ctrl-C that a script does not handle itself (loading a model, reading a corpus, scoring) ends it with one line
    instead of a traceback; Python then exits by SIGINT as before (the shell's 130). Files being written are cleaned
    up first, by their with-blocks, as the interrupt unwinds through them."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        else:
            previous(kind, value, tb)

    sys.excepthook = hook


class PathList(argparse.Action):
    """A flag that takes a list of files, given once. Given twice (`--train_paths a --train_paths b`), argparse keeps
    the last list and silently drops the files of the first; adding them up would silently change what a wrapper
    that repeats a flag to override it trains on. Either would be data the user did not mean: refused instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is not None and current is not self.default:
            parser.error(f"{option_string} given twice; name all its files after one {option_string} (e.g. "
                         f"{option_string} {' '.join(current[:1] + list(values[:1])) or 'a.jsonl.gz b.jsonl.gz'})")
        setattr(namespace, self.dest, list(values))


def fail(message, code=2):
    """Print `error: message` (one line, no traceback) and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


PEER_WAIT_S = 30  # fail_once: how long the other ranks wait for rank 0's line


def fail_once(message, code=2, local=False):
    """fail() for what every process of a torchrun finds alike (the same command line, checkpoint or verdict): rank 0
    says it, the others wait for its line and leave with the same code. local=True: once per machine (LOCAL_RANK 0),
    for what each machine finds for itself, its devices. (What one rank can meet alone, a file missing on its node,
    stays fail().)"""
    if os.environ.get("LOCAL_RANK" if local else "RANK", "0") != "0":
        # torchrun stops every process as soon as one leaves: a rank that left first could cut rank 0 off before its
        # line was out (seen on a slow host: no line at all). So wait for rank 0 to say it and end the run, dying at
        # once by the signal torchrun then sends (whatever handler the loop installed); the bound is for a rank 0 that
        # never does, on another machine
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        time.sleep(PEER_WAIT_S)
        sys.exit(code)
    fail(message, code)


INTERVAL = re.compile(r"^([\[(])\s*(-inf|[-+0-9._e]+)\s*,\s*(inf|[-+0-9._e]+)\s*([\])])$")


def parse_interval(interval):
    """'[0, 1)' -> (0, 1, True, False): the bounds (None: unbounded) and whether each is included."""
    m = INTERVAL.match(interval)
    if not m:
        raise ValueError(f"not an interval: {interval!r}")
    low, high = (None if b.endswith("inf") else _number(b) for b in m.group(2, 3))
    return low, high, m[1] == "[", m[4] == "]"


def in_words(interval):
    """'[1, inf)' -> 'at least 1', '(0, inf)' -> 'greater than 0', '[0, 1)' -> 'at least 0 and less than 1',
    '[1, 1000]' -> 'between 1 and 1,000'."""
    low, high, low_in, high_in = parse_interval(interval)
    if low is not None and high is not None and low_in and high_in:
        return f"between {low:,} and {high:,}"
    words = ([f"{'at least' if low_in else 'greater than'} {low:,}"] if low is not None else []) + \
        ([f"{'at most' if high_in else 'less than'} {high:,}"] if high is not None else [])
    return " and ".join(words) or "a number"


def contains(interval, value):
    low, high, low_in, high_in = parse_interval(interval)
    above = low is None or (low <= value if low_in else low < value)
    below = high is None or (value <= high if high_in else value < high)
    return above and below


def range_error(args, ranges):
    """The first flag outside its range as a one-line message (`--lr must be greater than 0, got nan`), or None.

    ranges: {flag name: interval} or {flag name: (interval, what a value at its edge means)}, intervals written as in
    mathematics: '[1, inf)', '(0, inf)', '[0, 1)'. A flag left at None is not checked; NaN and inf are in no range."""
    for name, spec in ranges.items():
        interval, meaning = (spec, None) if isinstance(spec, str) else spec
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and contains(interval, value)):
            return f"--{name} must be {in_words(interval)}" + (f" ({meaning})" if meaning else "") + f", got {value}"
    return None


def _number(text):
    try:
        return int(text)
    except ValueError:
        return float(text)


def one_line_when_a_peer_is_lost(master, survivor, save_dir, advice="the same command plus --resume auto"):
    """Under torchrun: a collective that fails because another process died or quit ends this one with a single line
    from rank 0 (survivor() says which checkpoint is intact) instead of a traceback from every rank. A rank that
    failed for its own reason (fail()) has already said why. When rank 0 itself is the process lost, one of the others
    says it: each process counts itself in torchrun's store (its agent holds it, so it outlives rank 0), rank 0 at
    once, the others after a moment; the first to count speaks."""
    import torch.distributed as dist
    previous = sys.excepthook  # (quiet_interrupt's, for Ctrl-C)

    def first_to_speak():
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=5), wait_for_workers=False)
            # (a key per torchrun restart: --max_restarts starts the workers again on the same store)
            return store.add(f"trm_peer_lost_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", 1) == 1
        except Exception:  # no store to ask (a hook must not fail in turn): rank 0 speaks, the others stay quiet
            return master

    def hook(kind, value, tb):
        if not (isinstance(value, RuntimeError) and ("gloo" in str(value) or "NCCL" in str(value)
                                                     or isinstance(value, dist.DistError))):
            return previous(kind, value, tb)
        if master:
            first_to_speak()
            print(f"error: another training process stopped (it crashed, was killed or refused to start; its own "
                  f"output says why); {survivor()}. Continue with {advice}.",
                  file=sys.stderr)
        else:
            time.sleep(2)  # rank 0, if it lives, meets the same failure and counts first
            if first_to_speak():
                print(f"error: the training process of rank 0 stopped (torchrun's report names how); the checkpoints "
                      f"it saved in {save_dir} are whole, as each is written completely or not at all. Continue with "
                      f"{advice}.", file=sys.stderr)

    sys.excepthook = hook
