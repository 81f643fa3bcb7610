"""--compile whole: the training step (forward, backward, clipping, optimizer, EMA) as one CUDA graph, one launch each.

At the procedure's batch (4 x 512) a step is launch-bound. --compile graphs replays the forward and backward as graphs,
but the clipping, AdamW and the EMA still launch their kernels one by one from Python, and the GPU idled 30% of the
step; captured whole, the step took 3.06 ms against 3.96 (bench/step_profile.py --whole_graph, BENCHMARKS.md).

What capture asks of a step, and how it is met here:
- no host syncs and no Python numbers baked in: AdamW runs capturable and reads its rate from a device tensor, the
  EMA its weight; both are written before each replay. Muon (--optimizer muon) reads the same rate tensor: its step
  is tensor arithmetic throughout, with its momentum buffers made in the first warm-up step. The clipping's norm and
  the non-finite check stay on the GPU.
- fixed addresses: each batch is copied into the captured input; the gradients are the graph's own tensors, which
  each replay's backward writes (not adds to).
- compiled and warmed up before the capture: the first WARMUP steps at each depth run eagerly on a side stream, as
  real steps of the run (the same kernels the graph then replays).
Checkpoints are written as without it (a float rate, capturable off), so a run resumes under either mode.
"""
import warnings

import torch

from trm.optim import MuonAdamW, clip_and_step

WARMUP = 3  # eager steps before a capture: compilation, the allocator and lazily built state settle first


def refusal(args, world_size):
    """Why these flags cannot take --compile whole (a one-line message), or None; besides what no compiled step takes
    (trm.flags.not_compilable)."""
    if world_size > 1:
        return "--compile whole runs one process (its step has no all-reduce): use --compile graphs with torchrun"
    if args.grad_accum > 1:
        return "--compile whole captures one batch a step: it takes --grad_accum 1 (use --compile graphs)"
    if args.random_depth:
        return "--compile whole would capture a graph for every depth drawn: not with --random_depth"
    return None


def make_capturable(optimizer, device):
    """Turn the trainer's optimizer capturable, its rate one device tensor shared by every group: the fused AdamW
    (capturable, its step counts on the device), and Muon's groups under --optimizer muon. Returns the rate."""
    lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
    for part in (optimizer.muon, optimizer.adamw) if isinstance(optimizer, MuonAdamW) else (optimizer,):
        adam = isinstance(part, torch.optim.AdamW)
        for group in part.param_groups:
            group["lr"] = lr
            if adam:
                group["capturable"] = True
        for state in part.state.values() if adam else ():  # (a resumed fused AdamW's step counts: on the device)
            if "step" in state:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
        part.register_state_dict_post_hook(plain_state)  # (MuonAdamW's state_dict is its two parts')
    return lr


def plain_state(optimizer, state):
    """The optimizer's state as a run without --compile whole writes it: a float rate, capturable off (state_dict()
    packs fresh group dicts, so the live ones keep their tensor)."""
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
        if "capturable" in group:  # (AdamW's; Muon has no such option)
            group["capturable"] = False
    return state


class WholeStep:
    """The trainer's step under --compile whole: step(x, targets, lr, depth) does what the loop's forward, backward,
    optimizer_step and ema.update do, and adds the loss to loss_sum and any non-finite value to bad, on the GPU."""

    def __init__(self, model, raw_model, optimizer, ema, grad_clip, amp_dtype, loss_sum, bad, halt_args):
        self.model, self.raw_model, self.optimizer, self.ema = model, raw_model, optimizer, ema
        self.params = list(raw_model.parameters())
        self.grad_clip, self.amp_dtype, self.loss_sum, self.bad, self.halt_args = (grad_clip, amp_dtype, loss_sum, bad,
                                                                                   halt_args)
        self.device = self.params[0].device
        self.lr = make_capturable(optimizer, self.device)
        self.ema_weight = torch.zeros((), device=self.device)
        self.graph = self.depth = self.x = self.targets = None
        self.warm = 0

    def eager(self, x, targets, depth):
        """The body run, not captured: a warm-up step (or any step off CUDA). AdamW, capturable, warns once that it
        runs uncaptured; these steps are meant to."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            self.body(x, targets, depth)

    def body(self, x, targets, depth):
        """One step, on whatever stream is current: what the graph holds."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=False):  # capture keeps no autocast cache across replays
            _, loss = self.model(x, targets, **self.halt_args, **depth)
        loss.backward()
        clip_and_step(self.params, self.optimizer, self.grad_clip, loss, self.bad)
        if self.ema is not None:
            self.ema.lerp(self.raw_model, self.ema_weight)
        self.loss_sum.add_(loss.detach())

    def step(self, x, targets, lr, depth):
        # one layout for the warm-ups and the capture: a strided view (a slice of a longer batch) compiled in warm-up
        # and a packed copy captured would differ in strides, and the compiled model would compile again inside the
        # capture, which CUDA refuses
        x, targets = x.contiguous(), targets.contiguous()
        self.lr.fill_(lr)
        if self.ema is not None:
            self.ema_weight.fill_(1.0 - self.ema.next_decay())
        if depth != self.depth:  # the first step, or --depth_warmup's end: other kernels, so warm up and capture anew
            self.graph, self.depth, self.warm = None, depth, 0
        if self.graph is not None:
            self.x.copy_(x, non_blocking=True)
            self.targets.copy_(targets, non_blocking=True)
            self.graph.replay()
            return
        self.optimizer.zero_grad(set_to_none=True)  # then the graph allocates, and each replay writes, its gradients
        if self.device.type != "cuda":  # (no graphs here: the body alone, as the CPU tests run it)
            self.eager(x, targets, depth)
            return
        if self.warm < WARMUP:
            side = torch.cuda.Stream()  # warm-up off the default stream, as capture asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.eager(x, targets, depth)
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return
        self.x, self.targets = x.clone(), targets.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records this step's kernels without running them
            self.body(self.x, self.targets, depth)
        self.graph.replay()  # and runs them: this step
