"""A run's state in a checkpoint: what the trainer writes, whether a command can continue it, and putting it back.

Everything that makes a resumed run continue bit-identically travels together: weights, EMA, optimizer moments, the
loader's place in its epoch and every random generator. The checks come before the corpus is tokenized, so a command
that cannot continue a checkpoint is told in seconds.
"""
import random

import torch

from trm.flags import ARCH_FLAGS
from trm.optim import resume_problem
from trm.tokenizer import Tokenizer


def resume_error(ckpt, ckpt_path, tokenizer, args):
    """A one-line reason why this command cannot continue the checkpoint (its tokenizer or optimizer differ), or
    None."""
    if ckpt.get("tokenizer") and (theirs := Tokenizer.from_state(ckpt["tokenizer"])).fingerprint() != \
            tokenizer.fingerprint():
        trained = ("--tokenizer byte" if theirs.kind == "byte" else
                   f"a SentencePiece model of {theirs.vocab_size:,} pieces")
        given = ("--tokenizer byte" if args.tokenizer == "byte" else
                 f"--sp_model {args.sp_model} ({tokenizer.vocab_size:,} pieces)")
        return (f"the checkpoint {ckpt_path} was trained with a different tokenizer ({trained}) than this command's "
                f"{given}; resume with the tokenizer the run started with")
    return resume_problem(ckpt, args.optimizer)


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


def restore(ckpt, model, optimizer, ema, loader, device):
    """Put a checkpoint's state back into the run's objects and generators; returns (step, tokens_seen, the last
    evaluation's metrics or None)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    random.setstate(ckpt["rng"]["python"])
    return ckpt["step"], ckpt["tokens_seen"], ckpt.get("metrics")
