"""Exponential moving average of the weights, kept as a full eval-mode copy of the model.

The copy is what evaluation and (by default) generation use, and it is saved in every checkpoint.
"""
import copy

import torch


class EMA:
    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model):
        self.lerp(model, 1.0 - self.next_decay())

    def next_decay(self):
        """Count an update and return its decay. Warm-up: average over the steps taken so far until that is longer
        than 1/(1-decay) steps, so early EMA weights are not dominated by the random initialization."""
        self.updates += 1
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def lerp(self, model, weight):
        """Move the average `weight` of the way to the model's weights. weight: a number, or a 0-dim device tensor
        (read on the GPU when the step runs: --compile whole's graph replays it with a new weight each step)."""
        ema_p = list(self.model.parameters())
        raw_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, raw_p, [weight] * len(ema_p) if isinstance(weight, torch.Tensor) else weight)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
