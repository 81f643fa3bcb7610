"""The trainer's flags checked before any work starts: a bad value is one line naming the flag and its range."""


def check_flags(args, world_size=1):
    """The first problem with the flags as a one-line message, or None."""
    for name in ("batch_size", "grad_accum", "max_seq_len", "max_steps", "eval_every", "log_every", "d_model",
                 "n_heads", "n_layers", "latent_steps", "deep_steps", "supervision_steps"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    if args.sup_update == "each" and (world_size > 1 or args.grad_accum > 1):
        return "--sup_update each runs one process without --grad_accum (its optimizer steps inside the forward pass)"
    if not 0 <= args.dropout < 1 or not 0 <= args.ema_decay < 1 or args.lr <= 0 or args.max_minutes < 0 \
            or args.act_weight < 0:
        return "--dropout and --ema_decay must be in [0, 1), --lr positive, --max_minutes and --act_weight >= 0"
    if args.train_halt_threshold is not None and (not args.act_weight or not 0 <= args.train_halt_threshold <= 1):
        return "--train_halt_threshold needs --act_weight > 0 and a value in [0, 1]"
    if args.grad_deep_steps < 0 or not 0 <= args.depth_warmup < 1:
        return "--grad_deep_steps must be >= 0 (0 = every deep step) and --depth_warmup in [0, 1)"
    return None
