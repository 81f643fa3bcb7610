"""The learning-rate schedule: a linear warm-up to --lr, then a cosine or linear decay to 10% of it (or constant).

The decay follows whichever runs out first, steps or the --max_minutes budget: `time_frac` is the share of the time
budget spent (0 without one), so a run stopped by the clock still ends at the bottom of its schedule.
"""
import math


def lr_at(step, lr, warmup_steps, max_steps, schedule="cosine", time_frac=0.0):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    frac = min(1.0, max((step - warmup_steps) / max(1, max_steps - warmup_steps), time_frac))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return lr * (0.1 + 0.9 * shape)
