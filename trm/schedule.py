"""The learning-rate schedule: a linear warm-up to --lr, then a cosine or linear decay to 10% of it, constant, or
wsd: held at --lr, then a linear cool-down to 0 over the last --lr_cooldown of the run.

wsd (warm-up, stable, decay) is the shape of the speedrun-style trainers (modded-nanogpt holds the rate and cools
down over the last 40%): at the top rate for longest, and ending at 0, where the cosine stops at 10%.

The decay follows whichever runs out first, steps or the --max_minutes budget: `time_frac` is the share of the time
budget spent (0 without one), so a run stopped by the clock still ends at the bottom of its schedule.
"""
import math

WSD_COOLDOWN = 0.4  # --lr_cooldown's default: the share of the run after warm-up spent cooling down


def lr_at(step, lr, warmup_steps, max_steps, schedule="cosine", time_frac=0.0, cooldown=None):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    frac = min(1.0, max((step - warmup_steps) / max(1, max_steps - warmup_steps), time_frac))
    if schedule == "wsd":
        return lr * min(1.0, (1 - frac) / (cooldown or WSD_COOLDOWN))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return lr * (0.1 + 0.9 * shape)


def warmup_warning(lr, warmup_steps, max_steps):
    """A warm-up as long as the run or longer: the lr never reaches --lr (or only at the last step) and never decays."""
    if warmup_steps < max_steps:
        return None
    top = lr_at(max_steps - 1, lr, warmup_steps, max_steps)
    return (f"--warmup_steps {warmup_steps} >= --max_steps {max_steps}: the whole run is warm-up, the lr climbs to "
            f"{top:.2e} (--lr {lr:g}" + (" only at the last step" if top >= lr else " is never reached") +
            f") and never decays; lower --warmup_steps (e.g. {max(1, max_steps // 20)})")


def budget_warning(step, warmup_steps, steps_per_second, seconds_left):
    """With --max_minutes: at the speed seen so far, the time budget ends before the warm-up does."""
    end = step + steps_per_second * seconds_left
    if end >= warmup_steps:
        return None
    return (f"at {steps_per_second:.2f} steps/s the --max_minutes budget ends near step {end:,.0f}, before the "
            f"{warmup_steps:,} warm-up steps: the lr never reaches --lr; lower --warmup_steps")
