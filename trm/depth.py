"""Depth overrides: the test-time depth flags, and the schedules that pick each training step's depth.

The trained depth lives in TRMConfig; an override is the **depth keywords (latent_steps, deep_steps,
supervision_steps) that TRM.forward, TRM.rounds and TRM.flops_per_token take ({} or None values = the trained depth).
Every draw of a schedule depends on (seed, step) alone, so a resumed run draws the same depths as an uninterrupted one.
"""
import itertools
import math

import numpy as np

DEPTH_KEYS = ("supervision_steps", "deep_steps", "latent_steps")


def add_depth_flags(parser):
    """--supervision_steps, --deep_steps, --latent_steps of the scripts that run a trained model (generate.py,
    trm/evaluate.py): changing the depth at test time changes no weights."""
    for name, what in zip(DEPTH_KEYS, ("supervision rounds", "deep steps per round", "z updates per latent recursion")):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{what} at test time (as trained unless given)")


def depth_flags(args):
    """The **depth keywords those flags give."""
    return {name: getattr(args, name) for name in DEPTH_KEYS}


def depth_refused(model, depth, path):
    """The one-line reason the depth flags given cannot apply to `model`, or None: a GPT has no recursion to deepen
    (it ran as trained, and the header named the flags' depth)."""
    given = [f"--{name}" for name, value in depth.items() if value is not None]
    if given and not model.config.recursive:
        return f"{' '.join(given)} set the depth of a TRM's recursion; {path} is a GPT (--arch gpt), which has none"
    return None


def random_depth(config, seed, step):
    """--random_depth: latent_steps uniform in 1..2n, deep_steps in 1..2T and supervision_steps in 1..2 N_sup.

    Looped LMs extrapolate to deeper inference only when trained at varied depths; rounds are what inference varies,
    so they are drawn too.
    """
    rng = np.random.default_rng([seed, step, 0x7E7])
    return {name: int(rng.integers(1, top + 1)) for name, top in _random_depth_max(config).items()}


def random_depth_grid(config):
    """Every depth random_depth can draw, equally likely (e.g. to count the mean FLOPs of a step)."""
    tops = _random_depth_max(config)
    return [dict(zip(tops, d)) for d in itertools.product(*(range(1, t + 1) for t in tops.values()))]


def _random_depth_max(config):
    return {"latent_steps": 2 * config.latent_steps, "deep_steps": 2 * config.deep_steps,
            "supervision_steps": 2 * config.supervision_steps}


def random_deep_steps(config, seed, step):
    """--random_depth deep: deep_steps uniform in 1..2T, everything else as trained.

    Only 2T depths exist, so a compiled model keeps one graph per depth (compiled once each, then reused): random
    depth at the compiled speed, where drawing all three counts leaves the compiler too many graphs to keep.
    """
    rng = np.random.default_rng([seed, step, 0xD33])
    return {"deep_steps": int(rng.integers(1, 2 * config.deep_steps + 1))}


def random_deep_steps_grid(config):
    return [{"deep_steps": t} for t in range(1, 2 * config.deep_steps + 1)]


def depth_warmup(config, progress, until):
    """--depth_warmup F: one deep step per round for the first F of training (progress in [0, 1]), then the full
    depth, so the early steps, where the model learns most per token, are cheap (the looped runs of Parameter Golf
    gained when looping started about a third of the way in)."""
    return {"deep_steps": 1} if progress < until else {}


def for_step(config, mode, warmup, seed, step, progress):
    """The depth overrides for one training step ({} = the trained depth): the trainer's one call.

    mode: --random_depth (None, "all" or "deep"); warmup: --depth_warmup; progress: the run's fraction done.
    """
    if not config.recursive:
        return {}
    if mode == "all":
        return random_depth(config, seed, step)
    if mode == "deep":
        return random_deep_steps(config, seed, step)
    return trained_depth(config, mode, warmup, progress)


def flops_ahead(config, mode, warmup, step, max_steps, flops_at):
    """The FLOPs of the steps from `step` to max_steps, each at the depth it will run (flops_at(depth): a step's), for
    the log's ETA; None where the steps so far already price those ahead. Inside --depth_warmup they do not: its
    shallow steps made the full-depth ones ahead look as cheap (an ETA of a fraction of the wait). Random depths draw
    every step anew, so the steps so far are their mean."""
    if not (config.recursive and warmup and mode is None):
        return None
    left = max(0, max_steps - step)
    shallow = min(left, max(0, math.ceil(warmup * max_steps) - step))  # progress = step / max_steps < warmup
    return shallow * flops_at({"deep_steps": 1}) + (left - shallow) * flops_at({})


def trained_depth(config, mode, warmup, progress):
    """The depth the model is being trained at, which is what the trainer's evaluations score ({} = the configured
    depth). During --depth_warmup that is one deep step: a model trained at one step and scored at two is another
    function, and far worse: on an H200 a TRM-384 at step 3,000 of its warm-up scored 7.45 nats at the full depth,
    near the unigram level, where the same model trained at one deep step throughout scored 4.26 at its own; scored at
    the full depth, the collapse guard stopped that healthy run. Random depths train the configured depth."""
    depth = depth_warmup(config, progress, warmup) if config.recursive and warmup and mode is None else {}
    return {} if depth.get("deep_steps") == config.deep_steps else depth  # (--deep_steps 1: no warm-up at all)


def grid(config, mode):
    """The depths for_step draws among, equally likely, for the mean FLOPs of a step ([{}]: the trained depth)."""
    if not config.recursive or mode is None:
        return [{}]
    return random_depth_grid(config) if mode == "all" else random_deep_steps_grid(config)
