"""A save directory belongs to one training run.

Two runs writing into one folder lose work: the second overwrites the first's step_N.pt and metrics.jsonl, and
`--resume auto` then continues whichever has the higher step number. So:
- a trainer holds a lock on the folder (`.lock`, fcntl.flock) for its whole life: a second live trainer is refused.
  The kernel drops the lock when the process ends, even by kill -9, so a stale `.lock` file never blocks anyone;
- every run has an id, written to `run.json` and into each checkpoint; `--resume auto` continues the folder's run,
  from its newest readable checkpoint;
- a fresh run refuses a folder that holds another run's checkpoints unless told `--overwrite`, which moves the old
  run's files to a sibling folder (`<save_dir>.replaced-<time>/`) rather than deleting them.
"""
import fcntl
import filecmp
import glob
import json
import math
import os
import secrets
import shutil
import time

import torch.distributed as dist

from trm.atomic import AtomicFile, NotAFileError, check_target, remove_stale_tmp, tmp_name
from trm.checkpoint import (CheckpointError, checkpoint_step, list_checkpoints, load_checkpoint, prune_checkpoints,
                            save_checkpoint)

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
RUN_FILES = ("run.json", "metrics.jsonl", "training_curves.png", "best.pt")  # a run's files besides its checkpoints
RESUME_KEYS = ("config", "model", "optimizer", "step", "tokens_seen", "loader", "rng")


class SaveDirError(RuntimeError):
    pass


def resume_advice(overwrite=False):
    """How to continue a run: its command plus --resume auto, less --overwrite (the two refuse each other)."""
    return "the same command without --overwrite, plus --resume auto" if overwrite else \
        "the same command plus --resume auto"


def open_save_dir(save_dir, resume, log, ddp=False, master=True):
    """Rank 0 claims save_dir, clears what killed trainers left there and finds the checkpoint to resume; the other
    ranks load the one it found. Returns (lock or None, checkpoint or None, its path or None)."""
    lock = ckpt = path = None
    if master:
        lock = claim(save_dir)
        for stale in remove_stale_tmp(save_dir):  # with the lock held: no other trainer writes here
            log(f"removed {stale} (a partial file of a trainer that was killed while writing it)")
        ckpt, path = find_checkpoint(save_dir, resume, log)
    if ddp:
        shared = [path]
        dist.broadcast_object_list(shared)
        if not master and shared[0] is not None:
            path, ckpt = shared[0], load_resumable(shared[0])
    return lock, ckpt, path


def claim(save_dir):
    """Create save_dir, prove it writable and lock it. Returns the open lock file: the lock lasts as long as it stays
    open (at the latest until the process ends). Raises SaveDirError with a one-line reason."""
    if os.path.isfile(save_dir):
        raise SaveDirError(f"--save_dir {save_dir} is a file, not a folder; name the folder to write checkpoints in "
                           f"(e.g. {os.path.dirname(save_dir) or '.'})")
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = tmp_name(os.path.join(save_dir, ".write_test"))
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
        lock = open(os.path.join(save_dir, LOCK_FILE), "a+")
    except OSError as e:
        raise SaveDirError(f"cannot write in --save_dir {save_dir} ({e.strerror or e})") from None
    try:  # now, not at the first save an hour in: a file the run will replace that is a FIFO, a device, a folder
        for path in [os.path.join(save_dir, name) for name in RUN_FILES] + list_checkpoints(save_dir):
            check_target(path)
    except NotAFileError as e:
        lock.close()
        raise SaveDirError(f"--save_dir {save_dir} holds {e.filename}: {e.strerror}; remove it or choose another "
                           f"--save_dir") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise SaveDirError(f"another trainer{f' (pid {holder})' if holder else ''} is using --save_dir {save_dir}; "
                           f"wait for it to finish or stop it, or choose another --save_dir") from None
    except OSError:
        pass  # a filesystem without locks (some network mounts): train unguarded rather than not at all
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def read_run(save_dir):
    """run.json as a dict ({} when absent or unreadable)."""
    try:
        with open(os.path.join(save_dir, RUN_FILE)) as f:
            run = json.load(f)
        return run if isinstance(run, dict) else {}
    except (OSError, ValueError):
        return {}


def read_run_id(save_dir):
    return read_run(save_dir).get("run_id")


def load_resumable(path):
    """A checkpoint that has what resuming needs (generation-only files lack the optimizer, the data position...)."""
    state = load_checkpoint(path, map_location="cpu")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it has no {', '.join(missing)} (not written by "
                              f"train_trm_lm.py, or written for generation only)")
    return state


def find_checkpoint(save_dir, resume, log):
    """(checkpoint, path) for --resume, or (None, None) for a fresh run. 'auto' takes the newest readable checkpoint
    of the run that owns save_dir (a damaged one, or one of another run, is reported and skipped); a path must load
    (CheckpointError otherwise)."""
    if not resume:
        return None, None
    if resume != "auto":
        return load_resumable(resume), resume
    owner = read_run_id(save_dir)
    for path in list_checkpoints(save_dir):
        try:
            state = load_resumable(path)
        except CheckpointError as e:
            log(f"warning: {e}; skipping it")
            continue
        if owner and state.get("run_id") not in (None, owner):  # None: written before checkpoints had run ids
            log(f"warning: skipping {path}: it belongs to run {state['run_id']}, not to {owner} that owns {save_dir}")
            continue
        return state, path
    return None, None


def take_ownership(save_dir, ckpt, ckpt_path, resume, overwrite, log, command=None):
    """Make save_dir this run's and return the run id: refuse a folder that holds another run's checkpoints (unless
    `overwrite`: its files are moved to a sibling folder), and after an explicit resume from an earlier checkpoint of
    this folder, move the later ones aside (into abandoned_after_step_N/), so that --resume auto continues this
    stretch and not the abandoned one. command: the run's arguments, kept in run.json so that the same command run
    again after a crash is recognised as the same run. Raises SaveDirError."""
    here = list_checkpoints(save_dir)
    inside = ckpt_path is not None and os.path.samefile(os.path.dirname(os.path.abspath(ckpt_path)), save_dir)
    run_id = (ckpt.get("run_id") if ckpt is not None else None) or new_run_id()
    if overwrite and inside:
        raise SaveDirError(f"--overwrite would move away {ckpt_path}, the checkpoint to resume from; resume without "
                           f"--overwrite, or copy it elsewhere first")
    theirs = here and not inside and not (ckpt is not None and read_run_id(save_dir) == run_id)
    if theirs and not overwrite:
        before = read_run(save_dir).get("command") if command is not None else None
        now = same_command(command) if command is not None else None
        same = resume != "auto" and now is not None and before == now
        reordered = resume != "auto" and now is not None and not same and in_order(before) == in_order(now)
        newest = os.path.basename(here[0])
        finished = same and newest.startswith("final_")  # (the same command again after it ended)
        found = (f"no readable checkpoint of its run (see the warnings above), only {newest}" if resume == "auto" else
                 f"the checkpoints of an earlier run of this same command, which finished ({newest})" if finished else
                 f"the checkpoints of an earlier run of this same command (newest {newest}), which stopped before its "
                 f"end" if same else
                 f"the checkpoints of a run of this command with its files in another order (newest {newest}; a "
                 f"shell's glob puts train_10 before train_2, and the order is the corpus's)" if reordered else
                 f"another run's checkpoints (newest {newest})")
        advice = ("train it further with a larger --max_steps plus --resume auto, or " if finished else
                  "give the files in that run's order (its run.json) with --resume auto to continue it, or "
                  if reordered else
                  "continue it with the same command plus --resume auto, or " if resume != "auto" else "")
        raise SaveDirError(f"--save_dir {save_dir} holds {found}; {advice}start over with --overwrite (moves its "
                           f"files to {os.path.normpath(save_dir)}.replaced-<time>/)")
    if overwrite:
        moved, dest = move_aside(save_dir)
        if moved:
            log(f"--overwrite: moved the previous run's {len(moved)} files ({_size(dest) / 1e9:.2f} GB) to {dest}/ "
                f"(delete it when you no longer need it)")
            if len(earlier := glob.glob(glob.escape(os.path.normpath(save_dir)) + ".replaced-*")) > 1:
                log(f"note: each --overwrite keeps the run it replaces: {len(earlier)} such folders now hold "
                    f"{sum(map(_size, earlier)) / 1e9:.2f} GB; `rm -r {os.path.normpath(save_dir)}.replaced-*` "
                    f"deletes them all")
    elif inside and resume != "auto":  # (later files that auto skipped are damaged or another run's: left alone)
        later = [p for p in here if checkpoint_step(p) > ckpt["step"]]
        if later:
            dest = os.path.join(save_dir, f"abandoned_after_step_{ckpt['step']}")
            os.makedirs(dest, exist_ok=True)
            for p in later:
                os.replace(p, os.path.join(dest, os.path.basename(p)))
            log(f"resuming at step {ckpt['step']}: moved the {len(later)} later checkpoints "
                f"({', '.join(os.path.basename(p) for p in later[:3])}{', ...' if len(later) > 3 else ''}) to {dest}/")
            abandon_best(save_dir, ckpt, dest, log)
    with AtomicFile(os.path.join(save_dir, RUN_FILE), "w") as f:
        json.dump({"run_id": run_id, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": same_command(command) if command is not None else None}, f)
    return run_id


def abandon_best(save_dir, ckpt, dest, log):
    """best.pt from the stretch after the resumed checkpoint goes aside with it (export and generation take best.pt
    first), and best.pt is again the resumed run's own best: the checkpoint its record names if that file is still
    here, else none until the run improves on it. (best.pt may be the only copy of a pruned step, so its own step,
    not its file name, says which stretch it is from.)"""
    best = os.path.join(save_dir, "best.pt")
    if not os.path.exists(best):
        return
    try:
        step = load_checkpoint(best)["step"]
    except (CheckpointError, KeyError):
        return  # not a checkpoint this code can place: left as it is
    if step <= ckpt["step"]:
        return
    os.replace(best, os.path.join(dest, "best.pt"))
    own = (ckpt.get("best") or {}).get("step")
    path = next((p for p in list_checkpoints(save_dir) if checkpoint_step(p) == own), None)
    if path is not None:
        link_best(save_dir, path)
    log(f"best.pt (step {step}) was of that stretch and moved there too; " +
        (f"best.pt is {os.path.basename(path)} again" if path is not None else
         f"best.pt comes back when this run improves on its best so far (step {own})" if own is not None else
         "best.pt comes back at this run's next evaluation"))


def in_order(command):
    """A run.json command with its lists sorted: two that differ only in the order of their files compare equal."""
    if not isinstance(command, dict):
        return None
    return {k: sorted(v, key=str) if isinstance(v, list) else v for k, v in command.items()}


def same_command(args):
    """The arguments that make a run, as run.json keeps them: all but --resume and --overwrite, which only say how to
    start it."""
    return json.loads(json.dumps({k: v for k, v in sorted(args.items()) if k not in ("resume", "overwrite")},
                                 default=str))


def new_run_id():
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def aside_name(save_dir):
    return os.path.normpath(save_dir) + time.strftime(".replaced-%Y%m%d-%H%M%S")


def move_aside(save_dir):
    """Move a run's files (checkpoints, its logs, abandoned stretches) to a new sibling folder; others stay."""
    names = [os.path.basename(p) for p in list_checkpoints(save_dir)]
    names += [n for n in RUN_FILES if os.path.exists(os.path.join(save_dir, n))]
    names += [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(save_dir), "abandoned_after_step_*"))]
    if not names:
        return [], None
    dest = aside_name(save_dir)
    while os.path.exists(dest):
        dest += "+"
    os.makedirs(dest)
    for n in names:
        shutil.move(os.path.join(save_dir, n), os.path.join(dest, n))
    return names, dest


def _size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


class RunDir:
    """The checkpoints this run writes: each one whole or not at all, best.pt on the lowest validation loss, older
    step files pruned (never the one just written), and a failure told with what survived it."""

    def __init__(self, save_dir, keep_last, log, resumed_from=None, best=None, overwrite=False):
        self.save_dir, self.keep_last, self.log = save_dir, keep_last, log
        self.advice = resume_advice(overwrite)
        self.saved = [resumed_from] if resumed_from else []  # the newest is what a crash leaves
        self.best = dict(best or {})  # {"loss", "step"} of best.pt
        self.best_unchecked = resumed_from is not None

    def save(self, state, name, val_loss=None, quiet=False):
        """Write state as `name`; val_loss: the validation loss of exactly these weights, if they were evaluated."""
        path = os.path.join(self.save_dir, name)
        if self.best_unchecked:  # at the first save, not in __init__: only the saving rank, and off the training thread
            self.best_unchecked = False
            try:
                self.restore_best(state.get("run_id"))
            except OSError as e:
                raise SaveDirError(self.failure(e, os.path.join(self.save_dir, "best.pt"), state["step"])) from None
        improved = val_loss is not None and val_loss < self.best.get("loss", math.inf)
        if improved:
            self.best = {"loss": val_loss, "step": state["step"]}
        try:
            save_checkpoint({**state, "best": self.best}, path)
            self.saved.append(path)
            if not quiet:
                self.log(f"saved {path}" + (" (best.pt: the lowest validation loss so far)" if improved else ""))
            if improved:
                link_best(self.save_dir, path)
            for old in prune_checkpoints(self.save_dir, self.keep_last, keep=[path]):
                self.log(f"removed {old} (--keep_last {self.keep_last}; best.pt and final checkpoints stay)")
        except (OSError, CheckpointError) as e:
            raise SaveDirError(self.failure(e, path, state["step"])) from None
        return path

    def restore_best(self, run_id):
        """After a resume: best.pt is the checkpoint the resumed record names, if that file is still here. A checkpoint
        records itself as the best before best.pt is linked to it, so a run stopped in between (killed, or the copy
        fallback on a full disk) left best.pt on an older, worse checkpoint, and the resumed run, trusting the record,
        would only replace it on beating the lost one."""
        step = self.best.get("step")
        best = os.path.join(self.save_dir, "best.pt")
        source = next((p for p in list_checkpoints(self.save_dir) if checkpoint_step(p) == step), None)
        if step is None or source is None:  # (pruned: best.pt may be its only copy)
            return
        try:
            if os.path.samefile(best, source) or filecmp.cmp(best, source, shallow=False):  # (a copy: no hard links)
                return
        except OSError:  # none: set below
            pass
        try:
            if load_checkpoint(source).get("run_id") not in (None, run_id):  # another run's file of the same step
                return
        except CheckpointError:
            return
        link_best(self.save_dir, source)
        self.log(f"best.pt is {source} again (step {step}, the lowest validation loss so far): the run had stopped "
                 f"before best.pt was updated to it")

    def survivor(self):
        return f"the last good checkpoint {self.saved[-1]} is intact" if self.saved else \
            "no checkpoint of this run was saved yet"

    def failure(self, e, path, step):
        """Disk full, a read-only or vanished folder: what happened and what survived, in one sentence."""
        why = (f"could not write {getattr(e, 'filename', None) or path}: {e.strerror}"
               if isinstance(e, OSError) and e.strerror else str(e).split(";")[0])
        return (f"{why}. Stopped at step {step}; {self.survivor()}. Free some space (or fix the folder), then continue "
                f"with {self.advice}.")


def link_best(save_dir, path):
    """best.pt: the checkpoint with the lowest validation loss so far, as a hard link to its file (no extra disk while
    that file exists, and it outlives the file's pruning); a copy where the filesystem has no hard links."""
    best = os.path.join(save_dir, "best.pt")
    check_target(best)  # (written by link, not AtomicFile: the same refusal)
    tmp = tmp_name(best)
    try:
        # a link of a trainer killed before its os.replace, whose pid this one has (a restarted container: same host
        # and pid, so not "stale"): os.link would fail on it and the copy would write into the checkpoint it names
        os.remove(tmp)
    except FileNotFoundError:
        pass
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, best)
    except BaseException:
        try:  # a partial copy (disk full) is not left behind at a checkpoint's size
            os.remove(tmp)
        except OSError:
            pass
        raise


def disk_warning(save_dir, free_bytes, checkpoint_bytes, n_kept):
    """A warning when save_dir's disk cannot hold the checkpoints this run keeps, or None."""
    need = checkpoint_bytes * n_kept
    if free_bytes >= need:
        return None
    return (f"{save_dir} has {free_bytes / 1e9:.1f} GB free, but this run keeps about {n_kept} checkpoints of "
            f"{checkpoint_bytes / 1e6:,.0f} MB ({need / 1e9:.1f} GB): free some space or lower --keep_last")
