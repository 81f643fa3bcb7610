"""Adaptive depth: a halting head on the answer state y (the paper's Q head, ACT-style) says, per token and round,
"this round's argmax is already the target"; at a threshold, a token whose probability exceeds it stops its rounds.

Halting wraps the recursion, as in the official TRM: TRM.rounds runs the paper's loop and knows nothing of stopping;
rounds() here drives it from outside. After each round it decides which tokens stop. A stopped token keeps the answer
state of its last round, and at every deeper round attention reads the keys/values of that last round (StoppedKV). So
later tokens read a stopped token's latest state at every deeper round, and decoding token by token through a KVCache
(decode_adaptive) computes exactly what scoring whole sequences computes (training with a threshold, evaluation).
Once every token has stopped, no further round runs.
"""
import math

import torch
import torch.nn.functional as F


def halt_limit(p):
    # stop once sigmoid(q) > p, that is q > logit(p): p = 1 never stops, p = 0 always does
    return math.inf if p >= 1 else -math.inf if p <= 0 else math.log(p / (1 - p))


def halt_loss(model, y, logits, targets):
    """Binary cross-entropy of the halting head against "this round's argmax already equals the target"."""
    q = model.halt(y).squeeze(-1).float()
    with torch.no_grad():
        right = (logits.argmax(-1) == targets).float()
        valid = (targets >= 0).float()  # masked positions (-1) count for neither loss
    per_token = F.binary_cross_entropy_with_logits(q, right, reduction="none")
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


def rounds(model, idx, halt_threshold, cache=None, reembed=False, **depth):
    """TRM.rounds with stopping at halt_threshold: yields (y, running) after each round, running [B, T] True where the
    round computed the token. cache: a KVCache to decode through (idx: one new token per sequence), else idx holds
    whole sequences. The other arguments are TRM.rounds'."""
    if not model.can_halt:
        raise ValueError("adaptive depth needs a TRM trained with a halting head (train_trm_lm.py --act_weight)")
    running = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
    limit = halt_limit(halt_threshold)
    if limit == math.inf:  # never stops: the fixed depth
        for y in model.rounds(idx, cache, reembed, **depth):
            yield y, running
        return
    N_sup = model.n_rounds(**depth)
    kv, stopped, kept = StoppedKV(cache), ~running, None  # kept: the answer states of the round before
    for r, y in enumerate(model.rounds(idx, kv, reembed, **depth)):
        if kept is not None:
            y = torch.where(stopped.unsqueeze(-1), kept, y)
        yield y, ~stopped
        if r + 1 < N_sup:
            kept = y.detach()
            with torch.no_grad():
                kv.stopped = stopped = stopped | (model.halt(kept).squeeze(-1) > limit)
            if bool(stopped.all()):
                kv.repeat_round(r, N_sup)
                return


def previous_round(key):
    """The slot of the same net call one round earlier, or None: the recursion's keys start with the round."""
    r = key[0]
    return (r - 1, *key[1:]) if isinstance(r, int) and r > 0 else None


class StoppedKV:
    """What attention sees under stopping: in round r, a stopped token shows the keys/values it showed in round r - 1
    (which, if it stopped even earlier, are themselves such a copy). Over whole sequences this records every slot's
    keys/values for the next round; through a KVCache (decoding) the cache holds them."""

    def __init__(self, cache=None):
        self.cache, self.last, self.stopped = cache, {}, None  # stopped [B, T], set between rounds by rounds()

    def begin(self, T, depth=None):
        return 0 if self.cache is None else self.cache.begin(T, depth)

    def attend(self, key, q, k, v):
        earlier = previous_round(key)
        if earlier is not None:
            old_k, old_v = self.last.pop(earlier) if self.cache is None else self.cache.new(earlier)
            keep = self.stopped[:, None, :, None]  # k, v are [B, H, T, hd]
            k, v = torch.where(keep, old_k, k), torch.where(keep, old_v, v)
        if self.cache is not None:
            return self.cache.attend(key, q, k, v)
        self.last[key] = (k.detach(), v.detach())  # rounds stay detached from each other
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def repeat_round(self, r, N_sup):
        """Every token stopped after round r: the deeper rounds' slots in the cache take round r's keys/values at these
        positions, as running them would have given, for the tokens that come later (whole sequences: none do)."""
        if self.cache is None:
            return
        keys = [key for key in self.cache.slots if key[0] == r]
        for deeper in range(r + 1, N_sup):
            for key in keys:
                self.cache.copy((deeper - 1, *key[1:]), (deeper, *key[1:]))


@torch.no_grad()
def decode_adaptive(model, idx, cache, halt_threshold, **depth):
    """One new token per sequence (idx [B, 1]) through a KVCache, each sequence stopping its rounds once the halting
    head's probability exceeds halt_threshold (1.0: never, the fixed depth).

    Returns (logits [B, 1, vocab] of each sequence's last round, supervision rounds run per sequence [B]).
    """
    if idx.size(1) != 1:
        raise ValueError(f"decode_adaptive takes one token per sequence, got {idx.size(1)}")
    rounds_run = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)
    for y, running in rounds(model, idx, halt_threshold, cache, **depth):
        rounds_run += running[:, 0]
    return model.sampling_head(y), rounds_run
