"""The trainer's flags: checked before any work starts (a bad value is one line naming the flag and its range), and
what --compile auto resolves to.

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


# Tokens per micro-step up to which a CUDA step is launch-bound: at the procedure's batch 4 x 512 = 2,048 the GPU waits
# on kernel launches, and CUDA graphs (one launch per step) ran 6x faster on an H100; at 64 x 512 plain torch.compile
# is compute-bound and graphs only cost memory (BENCHMARKS.md, step 3 speed).
GRAPH_TOKENS = 8192


def choose_compile(requested, device_type, tokens_per_micro_step, not_compilable=None):
    """(torch.compile?, CUDA graphs?, why) for --compile auto|on|off|graphs. not_compilable: why this run's step cannot
    be compiled (e.g. an optimizer step inside the forward pass), or None."""
    if requested == "off":
        return False, False, "--compile off"
    if not_compilable:
        return False, False, f"not compiled: {not_compilable}"
    if requested == "on":
        return True, False, "--compile on"
    if requested == "graphs":
        graphs = device_type == "cuda"
        return True, graphs, "--compile graphs" + ("" if graphs else f" (no CUDA graphs on {device_type})")
    if device_type != "cuda":
        return False, False, f"--compile auto: not compiled on {device_type}"
    if tokens_per_micro_step <= GRAPH_TOKENS:
        return True, True, (f"--compile auto: CUDA graphs, as {tokens_per_micro_step:,} tokens per micro-step <= "
                            f"{GRAPH_TOKENS:,} make the step launch-bound")
    return True, False, (f"--compile auto: torch.compile without CUDA graphs, as {tokens_per_micro_step:,} tokens per "
                         f"micro-step > {GRAPH_TOKENS:,} make the step compute-bound")
