"""metrics.jsonl (one JSON object per log or evaluation step), the training_curves.png drawn from it, and with
--tensorboard the same numbers as TensorBoard scalars."""
import json
import math
import os
import sys
import time

import torch

from trm.atomic import AtomicFile

# bf16 dense matmul rates used for MFU. Hopper: the rate measured on this project's H100/H200 machines, not the
# 989 TFLOP/s datasheet figure (the issue tracker's baselines use the same number).
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device):
    """The GPU's peak FLOP/s for MFU, or None (CPU, or a GPU not in the table: the log line then shows no MFU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# a redraw of the curves takes 0.14-0.2 s on this CPU with a 50,000-step run's history (BENCHMARKS.md): after each of
# the procedure's 100 evaluations that was 15-21 s of the run; at most once a minute it is at most 12 s an hour
PLOT_EVERY = 60.0  # seconds

TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard"


def tensorboard_missing():
    """The one-line error for --tensorboard on a Python without the tensorboard package, or None."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard imports it only when a writer is made)
        return None
    except ImportError:
        return TENSORBOARD_MISSING


def resumed_log(ckpt_path, save_dir):
    """The log a resume's history comes from when it is not the save dir's: that of the resumed checkpoint's own
    folder, where the checkpoint lies outside the save dir and its folder has one; else None (the save dir's)."""
    if ckpt_path is None:
        return None
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    log = os.path.join(folder, "metrics.jsonl")
    inside = os.path.isdir(save_dir) and os.path.samefile(folder, save_dir)
    return log if not inside and os.path.isfile(log) else None


class MetricsLog:
    def __init__(self, save_dir, title, valid_label="validation loss", tensorboard_dir=None):
        self.path = os.path.join(save_dir, "metrics.jsonl")
        self.curves_path = os.path.join(save_dir, "training_curves.png")
        self.title, self.valid_label = title, valid_label  # of the curves' plot
        self.tensorboard_dir, self.tensorboard = tensorboard_dir, None
        self.history = []
        self.drawn, self.drawn_at = 0, -math.inf  # entries in the last drawing, and when it was drawn

    def start(self, resume_step=None, source=None):
        """A fresh run starts an empty log; a resumed one keeps its history up to the resumed step and drops what came
        after (a later, abandoned stretch would otherwise be logged twice). Where trm/run_dir.py moved that stretch's
        checkpoints aside (abandoned_after_step_N/), its whole log goes there with them: what it learned stays
        comparable with the new stretch, and resuming it later has its curves. source: the log the history comes from
        when it is another folder's (a checkpoint resumed from outside the save dir continues its own run's curves,
        not whatever log the save dir held). Only the process that logs calls this
        (rank 0 under DDP), so only it writes TensorBoard events."""
        self.history = []
        if resume_step is not None and source is not None:
            self.history = [h for h in self.read(source) if h["step"] <= resume_step]
        elif resume_step is not None and os.path.exists(self.path):
            old = self.read()
            self.history = [h for h in old if h["step"] <= resume_step]
            aside = os.path.join(os.path.dirname(self.path), f"abandoned_after_step_{resume_step}")
            if len(old) > len(self.history) and os.path.isdir(aside):
                with AtomicFile(os.path.join(aside, "metrics.jsonl"), "w") as f:
                    f.writelines(json.dumps(h) + "\n" for h in old)
        with AtomicFile(self.path, "w") as f:  # a crash here leaves the old log, never an empty one
            f.writelines(json.dumps(h) + "\n" for h in self.history)
        if self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides what an earlier session logged after the resumed step, as the log drops it
            self.tensorboard = SummaryWriter(self.tensorboard_dir, purge_step=None if resume_step is None else
                                             resume_step + 1)

    def read(self, path=None):
        """The entries on file (this log's, or the log at `path`). A line that does not parse (the trainer died in the
        middle of appending it) is dropped with a warning rather than making every resume fail."""
        path = path or self.path
        entries, torn = [], []
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    torn.append(n)
        if torn:
            print(f"warning: {path}: dropped {len(torn)} unreadable line(s) (line {torn[0]}"
                  f"{', ...' if len(torn) > 1 else ''}), e.g. one cut short by a crash", file=sys.stderr)
        return [e for e in entries if isinstance(e, dict) and "step" in e]

    def append(self, entry):
        self.history.append(entry)
        line = (json.dumps(entry) + "\n").encode()
        # unbuffered, and cut back on failure: a full disk writes part of a line (a short write) and then fails; the
        # file keeps whole lines only, and the error names it (a failed write has no file name of its own)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # (the mode open() gives)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                while line:
                    line = line[os.write(fd, line):]
            except OSError as e:
                os.ftruncate(fd, end)
                e.filename = e.filename or self.path
                raise
        finally:
            os.close(fd)
        if self.tensorboard is not None:  # every number of the entry, as train/loss, eval/bits_per_byte, ...
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])
            self.tensorboard.flush()  # log steps only: cheap, and a killed run's events are on disk

    def plot(self, force=False):
        """Redraw the curves when there is something new, at most once every PLOT_EVERY seconds unless forced (the end
        of a run, so that the last drawing holds everything)."""
        now = time.monotonic()
        if len(self.history) == self.drawn or not force and now - self.drawn_at < PLOT_EVERY:
            return
        self.drawn, self.drawn_at = len(self.history), now
        self.draw()

    def draw(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        train = [h for h in self.history if h["kind"] == "train"]
        valid = [h for h in self.history if h["kind"] == "eval" and "eval_depth" not in h]
        # --depth_warmup's evaluations score the shallower model being trained, another function than the full-depth
        # one: drawn apart (hollow, dashed), so the switch to full depth does not read as a jump of one curve
        shallow = [h for h in self.history if h["kind"] == "eval" and "eval_depth" in h]
        ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", lw=1)
        if valid:
            ax.plot([h["step"] for h in valid], [h["loss"] for h in valid], "o-", label=self.valid_label, lw=1.5)
        if shallow:
            deep = sorted({h["eval_depth"].get("deep_steps") for h in shallow} - {None})
            ax.plot([h["step"] for h in shallow], [h["loss"] for h in shallow], "o--", mfc="none", lw=1,
                    label=f"{self.valid_label}, warm-up" + (f" ({'/'.join(map(str, deep))} deep step"
                                                           f"{'s' * (deep != [1])})" if deep else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            with AtomicFile(self.curves_path) as f:
                fig.savefig(f, format="png", dpi=110)
        finally:
            plt.close(fig)
