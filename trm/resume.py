"""A run's state in a checkpoint: what the trainer writes, whether a command can continue it, and putting it back.

Everything that makes a resumed run continue bit-identically travels together: weights, EMA, optimizer moments, the
loader's place in its epoch and every random generator. The checks come before the corpus is tokenized, so a command
that cannot continue a checkpoint is told in seconds.
"""
import os
import random

import torch

from trm.flags import ARCH_FLAGS
from trm.optim import resume_problem
from trm.tokenizer import Tokenizer


def resume_error(ckpt, ckpt_path, tokenizer, args):
    """A one-line reason why this command cannot continue the checkpoint (its tokenizer, optimizer or the order of its
    training files differ, or it would train nothing), or None."""
    if ckpt.get("tokenizer") and (theirs := Tokenizer.from_state(ckpt["tokenizer"])).fingerprint() != \
            tokenizer.fingerprint():
        trained = ("--tokenizer byte" if theirs.kind == "byte" else
                   f"a SentencePiece model of {theirs.vocab_size:,} pieces")
        given = ("--tokenizer byte" if args.tokenizer == "byte" else
                 f"--sp_model {args.sp_model} ({tokenizer.vocab_size:,} pieces)")
        return (f"the checkpoint {ckpt_path} was trained with a different tokenizer ({trained}) than this command's "
                f"{given}; resume with the tokenizer the run started with")
    trained_on = (ckpt.get("args") or {}).get("train_paths") or []
    if list(trained_on) != list(args.train_paths) and sorted(trained_on) == sorted(args.train_paths):
        # the files' order is the token stream's: as many windows, so the loader could not tell, but the rest of the
        # epoch would train some text twice and skip other text
        return (f"the checkpoint {ckpt_path} was trained on these --train_paths in another order "
                f"({' '.join(trained_on)}); the order is the corpus's: give the files in that order to continue it")
    if args.max_steps < ckpt["step"]:  # (equal is a run to finish: its last evaluation and final checkpoint)
        started = (ckpt.get("args") or {}).get("max_steps")
        return (f"--max_steps {args.max_steps:,} is below the step of {ckpt_path} ({ckpt['step']:,}), so nothing "
                f"would be trained; continue the run with a larger --max_steps" +
                (f" (it was started with {started:,})" if started else "") +
                ", or start a new one with --overwrite or another --save_dir")
    return resume_problem(ckpt, args.optimizer)


def run_ended(ckpt, ckpt_path, args):
    """A note when the checkpoint is the final one of a run that this command's own limits end where it ended (its
    --max_steps reached, or its --max_minutes spent), or None. There is nothing to train, and finishing it again would
    only rewrite final_step_N.pt as a second copy beside best.pt, its hard link until then."""
    final = os.path.join(os.path.dirname(ckpt_path), f"final_step_{ckpt['step']}.pt")
    if not os.path.exists(final) or not os.path.samefile(ckpt_path, final):  # (best.pt may be the final one's link)
        return None  # (a step_N.pt at --max_steps is a run to finish: its last evaluation and final checkpoint)
    reached = ([f"--max_steps {args.max_steps:,}"] if ckpt["step"] >= args.max_steps else []) + \
        ([f"--max_minutes {args.max_minutes:g}"] if args.max_minutes and
         ckpt.get("train_seconds", 0.0) >= 60 * args.max_minutes else [])
    if not reached:
        return None
    return (f"nothing to train: {ckpt_path} ended this run at step {ckpt['step']:,} ({' and '.join(reached)}); to "
            f"train on, raise {' and '.join(limit.split()[0] for limit in reached)}; to start over, leave out "
            f"--resume and add --overwrite")


SCHEDULE_FLAGS = ("lr", "lr_schedule", "lr_cooldown", "warmup_steps", "max_steps", "max_minutes")


def schedule_changes(ckpt, args):
    """A resumed run follows the command line's schedule (so --max_steps can extend it): a line naming the schedule
    flags that differ from the checkpoint's command, so that one left out of a resume (--lr_schedule wsd, say) is
    seen before the rate jumps, or None."""
    was, shown = ckpt.get("args") or {}, lambda value: "unset" if value is None else value
    changed = [f"--{name} {shown(getattr(args, name))} (was {shown(was[name])})" for name in SCHEDULE_FLAGS
               if name in was and was[name] != getattr(args, name)]
    return "the schedule follows this command, not the checkpoint's: " + ", ".join(changed) if changed else None


def keep_checkpoint_settings(args, parser, config, ckpt, log):
    """A resumed run keeps its checkpoint's architecture, window length and seed (which orders its windows and depth
    draws: another would reshuffle the epoch mid-run). `args` takes them; a command line that asks for others is told
    so, in a warning per setting."""
    def keep(name, kept, why=""):
        given = getattr(args, name)
        if given != kept and given != parser.get_default(name):
            log(f"warning: --{name} {given} ignored: the resumed run keeps its checkpoint's {name} {kept}{why} (a new "
                f"run, e.g. with --overwrite, can change it)")
        setattr(args, name, kept)

    for name in ARCH_FLAGS:
        keep(name, getattr(config, name))
    if ckpt is not None:
        keep("seed", ckpt["loader"].get("seed", ckpt["args"].get("seed", args.seed)), ", which orders its windows")


def rng_state(device):
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def every_rank_rng(device, world_size):
    """Every rank's generators, in rank order, for rank 0's checkpoint; None for one process. All ranks call this at
    the same step: under DDP each rank draws its own dropout noise, and a resumed run continues each rank's stream."""
    if world_size == 1:
        return None
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state(device))
    return states


def restore(ckpt, model, optimizer, ema, loader, device, rank=0, world_size=1):
    """Put a checkpoint's state back into the run's objects and generators; returns (step, tokens_seen, the last
    evaluation's metrics or None, whether this rank's generators were restored). They are not when the checkpoint
    holds no state for this rank: it was written by another number of processes (or before checkpoints kept every
    rank's), and then the caller seeds them afresh."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    elif ema is not None:  # an EMA switched on at the resume starts from the resumed weights, not the random init's
        ema.model.load_state_dict(ckpt["model"])
    loader.load_state_dict(ckpt["loader"])
    ranks = ckpt.get("rng_ranks")
    restored = world_size == 1 or bool(ranks) and len(ranks) == world_size
    rng = ranks[rank] if world_size > 1 and restored else ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda"):
        # one state per GPU of the machine that saved it; this one may have fewer (another machine, fewer processes
        # under CUDA_VISIBLE_DEVICES), and a state for a GPU it has not would end the resume with an IndexError
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])
    random.setstate(rng["python"])
    return ckpt["step"], ckpt["tokens_seen"], ckpt.get("metrics"), restored
