"""The collapse guard: stop a run whose validation loss has fallen back to the unigram level, before its weights reach
a checkpoint, and say which learning rate to try instead.

A run that diverges without a NaN settles where a model that ignores its context lands: predicting each token with its
corpus frequency, a loss equal to the entropy of the training tokens' unigram distribution. (Measured on an H200, issue
19: a 12-layer GPT at --lr 3e-3 sat at train 7.96 / eval 8.17 nats, the unigram level of a 16k vocabulary, from step
500 to 9,000, silently.) The level comes from the data (np.bincount over the token cache), not a constant, so the rule
holds for any tokenizer and corpus.

The rule: after the warm-up and the first MIN_TOKENS training tokens, an evaluation is bad when its loss
- stays at the unigram level: >= UNIGRAM_SHARE (0.97) of the unigram entropy u and not falling, that is, below the best
  evaluation before it by less than STILL_FALLING nats per million training tokens since the previous evaluation (a
  first evaluation has no trend: at the level, it is bad). The trend matters: a small or slow model can be healthy
  and still near u after millions of tokens, but it is falling; a collapsed one is flat. The trend is a rate per
  token, not a drop per evaluation, so it does not depend on --eval_every or the batch size. Measured on an H200:
  the procedure's own command (batch 4, --lr 3e-4) was at 7.63 then 7.57 nats (u = 7.93) at steps 3,500 and 4,000,
  0.056 nats per million tokens and healthy; the collapsed GPT above drifted by ~0.00004 per million tokens;
- or is far above its best: it gave back GIVE_BACK of what the run had learned below u (loss >= best + (u - best) / 2),
  which overfitting never does (it creeps up by hundredths) and a collapse does at once;
and two bad evaluations in a row stop the run. The first one is only a warning, but its weights are not saved, so the
newest checkpoint is always one the guard passed. A collapse is stopped at the second evaluation after it.
"""
import math
import os

import numpy as np

from trm.checkpoint import checkpoint_step

# A collapsed model predicts token frequencies and lands at or above u: measured at 1.03 u and 1.06 u (the GPT-12 at
# 3e-3, and at 4e-3 with Muon in a 5-minute race). A healthy slow run can sit near 0.9 u for long: the procedure's own
# command (batch 4, --lr 3e-4) was at 0.90 u after 9,000 steps, its rate decayed to 3e-5 and falling by 0.002 nats per
# million tokens, and a level of 0.9 u stopped it at its last evaluation, without its final checkpoint (H200,
# 2026-12-02)
UNIGRAM_SHARE = 0.97
GIVE_BACK = 0.5
STILL_FALLING = 0.005  # nats per million training tokens: 1/10 of the slowest healthy run measured, 100x a collapse's
# Before this many tokens a tiny or slow healthy run can still be near the unigram level (a 49k-parameter test model
# is at 1.06 u after 7.7k tokens); every real configuration measured was far below it by 200k.
MIN_TOKENS = 200_000


def unigram_entropy(tokens, vocab_size, chunk=1 << 24):
    """Entropy in nats of the tokens' unigram distribution: the loss of a model that predicts every token with its
    corpus frequency. Counted in chunks, so a 130M-token memmap is never copied whole into int64. A token cache's
    memmap carries the figure its build counted (trm.data), so a run's start does not count again (0.63 s of it for
    aozora-xl's 134M tokens on an H100's host)."""
    if (known := getattr(tokens, "unigram_nats", None)) is not None:
        return known
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[i:i + chunk]), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class CollapseGuard:
    """Watches the evaluations of one run (rank 0). observe() after each; `suspect` after one bad evaluation (do not
    save), `collapsed` after two in a row (stop with message())."""

    def __init__(self, unigram, warmup_steps, best=None, step=0, min_tokens=None, tokens_seen=0, depth=None):
        self.unigram, self.warmup_steps = unigram, warmup_steps
        self.min_tokens = MIN_TOKENS if min_tokens is None else min_tokens
        self.level = UNIGRAM_SHARE * unigram
        self.best = math.inf if best is None else best  # a resumed run's best.pt loss
        self.last_good_step = step  # a resumed run starts from weights that were saved, so passed
        self.bad = []  # (step, loss) of the bad evaluations in a row
        self.tokens_at_last = tokens_seen  # the training tokens at the previous evaluation (or the resume)
        self.first_look = False  # the one bad evaluation is the run's first, with no trend to tell a slow start by
        self.depth = depth or {}  # the depth `best` was scored at ({}: the configured one; see observe)

    def describe(self):
        return (f"unigram level {self.unigram:.3f} nats/token (the training tokens' unigram entropy); after step "
                f"{self.warmup_steps:,} and {self.min_tokens:,} tokens, two evaluations in a row at >= "
                f"{self.level:.3f} and not falling by {STILL_FALLING:g} nats per million tokens, or halfway back there "
                f"from the best, stop the run")

    def is_bad(self, step, tokens_seen, loss):
        if step < self.warmup_steps or tokens_seen < self.min_tokens:
            return False
        if not math.isfinite(loss):
            return True
        # a first evaluation shows no trend: at the level, it counts as not falling
        since = (tokens_seen - self.tokens_at_last) / 1e6  # million training tokens since the previous evaluation
        falling = math.isfinite(self.best) and loss <= self.best - STILL_FALLING * since
        if loss >= self.level and not falling:
            return True
        return self.best < self.level and loss >= self.best + GIVE_BACK * (self.unigram - self.best)

    def observe(self, step, tokens_seen, loss, depth=None):
        """Judge one evaluation. Returns a line for the first bad one (a warning; a note when it is the run's first
        evaluation, which has no trend yet), else None.

        depth: the depth it was scored at (trm.depth.trained_depth; {} or None: the configured one). Scores at another
        depth are another model's (--depth_warmup's shallow start): when it changes, the best and the trend start
        afresh, but a bad evaluation still counts toward two in a row (a collapse does not end at the switch)."""
        if (depth or {}) != self.depth:
            self.depth, self.best = depth or {}, math.inf
        bad = self.is_bad(step, tokens_seen, loss)
        self.tokens_at_last = tokens_seen
        self.bad = self.bad + [(step, loss)] if bad else []
        if not bad:
            self.last_good_step = step
        best_before, self.best = self.best, min(self.best, loss)
        # the run's first evaluation: no trend to tell a slow start by (a non-finite loss is no slow start, and a run
        # that ended on one would keep its weights with a note that it was)
        self.first_look = len(self.bad) == 1 and not math.isfinite(best_before) and math.isfinite(loss)
        if self.first_look:
            # a first evaluation: a slow start (the procedure's batch 4 at step 500) looks the same as a collapse
            return (f"note: step {step}: the validation loss {loss:.4f} is still at the unigram level "
                    f"({self.unigram:.3f} nats/token, the training tokens' unigram entropy). A slow start is normal "
                    f"and falls by the next evaluation; a collapse stays: the run stops if the next evaluation has "
                    f"not fallen, and this checkpoint is not saved")
        if len(self.bad) == 1:
            return (f"step {step}: the validation loss {loss:.4f} is {self._where(loss, best_before)}: this checkpoint "
                    f"is not saved, and the run stops if the next evaluation agrees")
        return None

    @property
    def suspect(self):
        return bool(self.bad)

    @property
    def collapsed(self):
        return len(self.bad) >= 2

    def _where(self, loss, best):
        if not math.isfinite(loss) or loss >= self.level:
            return (f"within {1 - UNIGRAM_SHARE:.0%} of the unigram level ({self.unigram:.3f} nats/token, the training "
                    f"tokens' unigram entropy) or above it, and not falling")
        return (f"more than halfway back from its best {best:.4f} to the unigram level ({self.unigram:.3f} nats/token, "
                f"the training tokens' unigram entropy)")

    def message(self, lr, good_checkpoint):
        """The one line a collapsed run stops with: what happened, the learning rate, a safer one, what survived. A
        run that ends (its last step, Ctrl-C) on its first bad evaluation stops with it too: those weights are not
        saved either."""
        safer = f"{lr / 2:g}"
        if len(self.bad) == 1:
            (s2, l2), = self.bad
            what = (f"the run ended on a bad evaluation: the validation loss at step {s2:,} ({l2:.4f}) is "
                    f"{self._where(l2, self.best)}; --lr {lr:g} may be too high for this run. Stopped without saving "
                    f"these weights; ")
        else:
            (s1, l1), (s2, l2) = self.bad[-2:]
            what = (f"the run collapsed: the validation loss at steps {s1:,} and {s2:,} ({l1:.4f}, {l2:.4f}) is "
                    f"{self._where(l2, self.best)}; --lr {lr:g} is too high for this run. Stopped without saving; ")
        return (what +
                (f"the last good checkpoint {good_checkpoint} is intact: continue from it at a safer rate with "
                 f"--resume {good_checkpoint} --lr {safer}" if good_checkpoint else
                 f"no checkpoint was saved before the collapse: start again with --lr {safer} --overwrite") +
                " (or --collapse_guard off to train on regardless)")


def last_good_checkpoint(saved, step, save_dir):
    """The newest checkpoint still on disk that was written at or before `step` (the last evaluation the guard
    passed), else best.pt (only ever written at a passed evaluation), else None."""
    for path in reversed(saved):
        if os.path.exists(path) and checkpoint_step(path) <= step:
            return path
    best = os.path.join(save_dir, "best.pt")
    return best if os.path.exists(best) else None
