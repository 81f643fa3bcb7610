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
        self.updates += 1
        # Warm-up: average over the steps taken so far until that is longer than 1/(1-decay) steps,
        # so early EMA weights are not dominated by the random initialization.
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = [p for p in self.model.parameters()]
        raw_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, raw_p, 1.0 - d)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
