"""The trainer's flags, checked before any work starts: a bad value is one line naming the flag and its range.

Every number is checked, because each wrong one fails late or silently: --grad_clip -1 trains uphill, --lr nan
trains nothing, a negative --keep_last deletes checkpoints.
"""
import math

AT_LEAST_1 = ("batch_size", "grad_accum", "max_seq_len", "max_steps", "eval_every", "log_every", "eval_tokens",
              "d_model", "n_heads", "n_layers", "latent_steps", "deep_steps", "supervision_steps")
AT_LEAST_0 = ("warmup_steps", "save_every", "keep_last", "num_workers", "seed", "grad_deep_steps")
REAL_RANGES = {  # flag: (test, the range as the message states it)
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1) (0 = no EMA)"),
    "max_minutes": (lambda v: v >= 0, ">= 0 (0 = no time budget)"),
    "act_weight": (lambda v: v >= 0, ">= 0 (0 = no halting head)"),
    "train_halt_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "depth_warmup": (lambda v: 0 <= v < 1, "in [0, 1) (0 = off)"),
}


def check_flags(args, world_size=1):
    """The first problem with the flags as a one-line message, or None."""
    for name in AT_LEAST_1:
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    for name in AT_LEAST_0:
        if getattr(args, name) < 0:
            return f"--{name} must be at least 0, got {getattr(args, name)}"
    for name, (ok, text) in REAL_RANGES.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            return f"--{name} must be a finite number {text}, got {value}"
    if args.sup_update == "each" and (world_size > 1 or args.grad_accum > 1):
        return "--sup_update each runs one process without --grad_accum (its optimizer steps inside the forward pass)"
    if args.train_halt_threshold is not None and not args.act_weight:
        return "--train_halt_threshold needs --act_weight > 0"
    if args.overwrite and args.resume == "auto":
        return "--overwrite starts a new run and --resume auto continues the old one: choose one"
    return None
