"""The training step without --compile whole (trm/whole_step.py holds that one): forward, backward, clipping, optimizer
and EMA, under either deep supervision update rule, over --grad_accum micro-batches, under DDP or not.

--sup_update mean (the default) takes one optimizer step on the mean of the supervision rounds' losses; --sup_update
each, the paper's rule, an optimizer step after every round (train_trm_lm.py's docstring says why mean is the default).
"""
import contextlib

import torch

from trm.device import autocast, autocast_each
from trm.optim import clip_and_step


class EagerStep:
    """step(next_batch, lr, depth) trains on next_batch()'s (x, targets), once per --grad_accum micro-batch
    (--sup_update each: one batch, an optimizer step a round), adds the losses to loss_sum and any non-finite loss or
    gradient to bad, and returns how many losses it added."""

    def __init__(self, model, raw_model, optimizer, ema, args, amp_dtype, loss_sum, bad, halt_args, cuda_graphs):
        self.model, self.raw_model, self.optimizer, self.ema = model, raw_model, optimizer, ema
        self.grad_accum, self.grad_clip, self.each = args.grad_accum, args.grad_clip, args.sup_update == "each"
        self.amp_dtype, self.loss_sum, self.bad, self.halt_args = amp_dtype, loss_sum, bad, halt_args
        self.cuda_graphs = cuda_graphs  # --compile graphs: each forward starts a new CUDA graph step
        self.device = next(raw_model.parameters()).device
        self.ddp = hasattr(model, "no_sync")  # DistributedDataParallel's (a compiled DDP model forwards it too)

    def optimizer_step(self, loss):
        clip_and_step(self.raw_model.parameters(), self.optimizer, self.grad_clip, loss, self.bad)
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, next_batch, lr, depth):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.each:
            n = self.each_round(*next_batch(), depth)
        else:
            n = self.mean_of_rounds(next_batch, depth)
        if self.ema is not None:
            self.ema.update(self.raw_model)
        return n

    def each_round(self, x, targets, depth):
        """The paper's rule: each round's forward under autocast, its backward and optimizer step outside it."""
        round_losses = []
        rounds = self.raw_model.supervision_rounds(x, targets, **self.halt_args, **depth)
        for round_loss in autocast_each(rounds, self.device, self.amp_dtype):
            round_loss.backward()
            self.optimizer_step(round_loss)
            round_losses.append(round_loss.detach())
        self.loss_sum += torch.stack(round_losses).mean()
        return 1

    def mean_of_rounds(self, next_batch, depth):
        """One optimizer step on the mean of the rounds' losses (the forward returns it) over the micro-batches."""
        for micro in range(self.grad_accum):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            x, targets = next_batch()
            sync = not self.ddp or micro == self.grad_accum - 1  # DDP all-reduces only on the last micro-step
            with self.model.no_sync() if not sync else contextlib.nullcontext():
                with autocast(self.device, self.amp_dtype):
                    _, loss = self.model(x, targets, **self.halt_args, **depth)
                (loss / self.grad_accum).backward()
            self.loss_sum += loss.detach()
        self.optimizer_step(loss)
        return self.grad_accum
