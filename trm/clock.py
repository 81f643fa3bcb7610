"""The run clock: seconds spent training (evaluation and saving excluded), across resumes, the --max_minutes budget
those seconds are counted against, and the other reason to stop early, Ctrl-C or SIGTERM.

Under DDP every rank must use the same lr and leave the loop at the same step, so the budget's progress and a stop
request are agreed on (rank 0's clock, any rank's signal) every `agree_every` steps rather than read locally.
"""
import collections
import contextlib
import signal
import time

import torch
import torch.distributed as dist


def hms(seconds):
    """H:MM:SS for the ETA, the hours counted past a day (time.strftime's %H wraps round: 25 hours read 01:00:00)."""
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunClock:
    def __init__(self, seconds_before=0.0, max_minutes=0.0, ddp=False, master=True, device="cpu", agree_every=10):
        self.seconds_before = seconds_before  # training seconds of earlier sessions (from the checkpoint)
        self.budget = 60 * max_minutes        # seconds; 0 = no budget
        self.ddp, self.master, self.device, self.agree_every = ddp, master, device, agree_every
        self.start()
        self.last_pause = 0.0
        self.stop_requested = None  # the name of the signal this process received
        self.stop_agreed = None  # under DDP: the name of a signal another rank received (this one stops with it)
        self.budget_frac = seconds_before / self.budget if self.budget else 0.0  # the same on every rank

    def start(self):
        self.t_start = time.time()
        self.spent, self.pauses = collections.Counter(), collections.Counter()  # seconds and pauses, by what for

    def session_seconds(self):
        return time.time() - self.t_start - sum(self.spent.values())

    def seconds(self):
        return self.seconds_before + self.session_seconds()

    def budget_left(self):
        return max(0.0, self.budget - self.seconds()) if self.budget else float("inf")

    def eta(self, steps_left, seconds_per_step):
        """Wall seconds to the end, for the log line: the training left (the steps, or the --max_minutes budget if it
        ends first), stretched by this session's pauses so far, since its evaluations and checkpoints happen on the
        way (on a CPU evaluating can take as long as training: an ETA of training alone promised half the wait)."""
        left = min(steps_left * seconds_per_step, self.budget_left())
        trained = self.session_seconds()
        return left * (time.time() - self.t_start) / trained if trained > 0 else left

    def out_of_time(self):
        return self.budget_frac >= 1

    @contextlib.contextmanager
    def pause(self, what="other"):
        """Time spent inside does not count as training (nor against --max_minutes, nor in tok/s); it is summed by
        `what` ("evaluating", "saving") for the summary."""
        t = time.time()
        try:
            yield
        finally:
            self.last_pause = time.time() - t
            self.spent[what] += self.last_pause
            self.pauses[what] += 1

    def minutes(self, wall, steps, resumed):
        """How a finished run spent its minutes, for its last line: this process's, and for a resumed run its
        `steps` in this session and the training minutes of every session."""
        budget = " (the --max_minutes budget ran out)" if self.out_of_time() else ""
        wall, trained = wall / 60, self.session_seconds() / 60
        if not resumed:
            return f"{budget} in {wall:.1f} min ({trained:.1f} of them training)"
        return (f"{budget} ({steps} in this session: {wall:.1f} min, {trained:.1f} of them training; "
                f"{self.seconds() / 60:.1f} min of training in all)")

    def summary(self, t_process):
        """Where the session's wall seconds went, in one line: training (its first steps compile), evaluating, saving,
        and the rest, of which the start-up (imports, the device, reading and tokenizing the corpus, the model: the
        seconds from t_process, when the process started, to the loop's first step) is named apart."""
        wall = time.time() - t_process
        train, evaluating, saving = self.session_seconds(), self.spent["evaluating"], self.spent["saving"]
        n_eval, n_save = self.pauses["evaluating"], self.pauses["saving"]
        return (f"time: {train:.1f} s training, {evaluating:.1f} s evaluating ({n_eval} evaluation{'s' * (n_eval != 1)}"
                f"), {saving:.1f} s saving ({n_save} checkpoint{'s' * (n_save != 1)}: the loop's stalls and the last "
                f"write), {wall - train - evaluating - saving:.1f} s other (start-up, data; "
                f"{self.t_start - t_process:.1f} s before the first step)")

    def catch_signals(self, log, on_abort=None):
        """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C aborts at once, calling on_abort
        first (to abandon a checkpoint being written in the background: trm/saver.py)."""
        def on_signal(signum, frame):
            if self.stop_requested:
                if on_abort is not None:
                    on_abort()
                raise KeyboardInterrupt
            self.stop_requested = signal.Signals(signum).name
            log(f"\n{self.stop_requested} received: saving a checkpoint after this step (again to abort)")

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)

    def should_stop(self, step, last=False):
        """True when every rank should leave the loop now: a signal was received or the budget is spent. last: the
        loop has ended (its last step): agree whatever the step, so that a signal since the last agreement stops
        every rank alike, not one rank with 128 + N after the others finished."""
        frac = self.seconds() / self.budget if self.budget else 0.0
        if not self.ddp:
            self.budget_frac = frac
            return bool(self.stop_requested) or self.out_of_time()
        if step % self.agree_every and not last:
            return False
        signum = signal.Signals[self.stop_requested].value if self.stop_requested else 0
        shared = torch.tensor([float(signum), frac if self.master else 0.0], device=self.device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        self.budget_frac = shared[1].item()
        if shared[0].item() > 0 and not self.stop_requested:  # (apart: a signal of its own is still a first one)
            self.stop_agreed = signal.Signals(int(shared[0].item())).name
        return shared[0].item() > 0 or self.out_of_time()

    @property
    def interrupted(self):
        """The signal that stopped the run, this rank's or another's (every rank saves and exits alike), or None."""
        return self.stop_requested or self.stop_agreed
