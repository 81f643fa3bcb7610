"""Muon, stepping every matrix of one shape together (on a GPU, of every shape).

The update is torch.optim.Muon's with adjust_lr_fn="match_rms_adamw" (the same momentum buffers, Newton-Schulz
coefficients and, on a GPU, bf16 arithmetic), so the two give the same weights up to rounding and read each other's
state (tests/test_optim.py). What differs is how many kernels a step launches. torch.optim.Muon orthogonalizes one
matrix at a time, about twenty small kernels each; a 12-layer GPT has 48 hidden matrices, and on an H200 its training
ran at 0.67M tokens/s with Muon against 1.9M with AdamW (BENCHMARKS.md). A model's hidden matrices come in four shapes
(qkv, proj, gate_up, down), so here each shape is one batched Newton-Schulz over a stack, and the momentum and the
weight updates are foreach calls over all of them: the same arithmetic in a few dozen launches, however deep the
model.

On a GPU the four shapes go further, into one stack: they all have d_model on one side, so turned wide and
zero-padded to the widest they make one [S, d_model, widest] stack, and one Newton-Schulz instead of four. Padding is
exact: every iteration multiplies X by its own Gram matrix X X^T, which the zero columns leave unchanged, so [X 0]
maps to [NS(X) 0]. It costs ~1.7x the products' FLOPs (bench/muon_step.py counts them). On a CPU the FLOPs are
what costs (the 12-layer GPT's step: 1.29 s padded against 0.57 s, bench/muon_step.py), so there the shapes stay
apart. On an H200 the compiled step took about the same time for the TRM-384's 8 matrices as for the GPT-12's 48
(3.2 and 3.9 ms, 120 kernels each): launches and latency, not FLOPs, so one Newton-Schulz (~18 kernels) instead of
four: the compiled step 1.68 ms against 3.60 (`python bench/muon_step.py --device cuda --compiled`). Captured in a
CUDA graph (--compile whole) launches cost next to nothing and, from d_model 512, the FLOPs decide again, so there the
shapes stay apart (Muon.stacked): at batch 4 that made the GPT 7 x 768 train 18% faster (BENCHMARKS.md, Round 2).
"""
import math
from collections import defaultdict

import torch
import torch.nn.functional as F

# The odd quintics p(x) = a x + b x^3 + c x^5 that Newton-Schulz applies to every singular value, one (a, b, c) an
# iteration (the last repeats), and the margin the input's norm is divided by. "jordan": Keller Jordan's one quintic,
# as torch.optim.Muon uses; fast from small singular values, it plateaus ~0.3 from 1. "polar_express" (Amsel et al.,
# arXiv 2505.16932, Algorithm 1): a quintic per iteration, each the minimax-optimal one for where the previous left the
# singular values (from [0.001, 1]), all but the last evaluated at x / 1.01, and the input at 1 / 1.01 of its norm,
# for bf16's rounding (the paper's safety factor). At 5 iterations it lands nearer 1 than Jordan's (mean |s - 1| 0.08
# against 0.14-0.20 for Gaussian matrices of 64 x 160 to 256 x 704); at 2-4 it is further (tests/test_optim.py).
_PE = ((8.28721201814563, -23.595886519098837, 17.300387312530933),
       (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
       (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
       (3.3184196573706015, -2.488488024314874, 0.51004894012372),
       (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
       (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
       (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
       (1.875, -1.25, 0.375))
NS_COEFFICIENTS = {
    "jordan": (((3.4445, -4.7750, 2.0315),), 1.0),
    "polar_express": (tuple((a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in _PE[:-1]) + _PE[-1:], 1.01),
}
EPS = 1e-7
# captured in a CUDA graph, matrices whose shorter side is this or more stay a stack per shape (Muon.stacked)
GRAPHED_APART = 512


def orthogonalize(G, steps=5, dtype=None, coefficients="jordan"):
    """The nearest semi-orthogonal matrix (approximately: singular values in ~[0.7, 1.2]) to each matrix of the stack
    G [S, rows, cols], by Newton-Schulz iterations (NS_COEFFICIENTS[coefficients]) in `dtype`; by default bf16 on a
    GPU (as torch.optim.Muon), fp32 on a CPU: a CPU without native bf16 products takes a reference path for them, 22 s
    a step for a 12-layer GPT's matrices on an AVX2 EPYC against 0.6 s in fp32 (bench/muon_step.py, BENCHMARKS.md)."""
    polynomials, margin = NS_COEFFICIENTS[coefficients]
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    tall = G.size(1) > G.size(2)
    if tall:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(1, 2), keepdim=True) * margin).clamp(min=EPS)  # spectral <= Frobenius norm = 1 / margin
    for i in range(steps):
        a, b, c = polynomials[min(i, len(polynomials) - 1)]
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X


def orthogonalize_shapes(stacks, steps=5, dtype=None, coefficients="jordan"):
    """orthogonalize() of several stacks [S_k, rows_k, cols_k] whose matrices share their shorter side, as one stack:
    each turned wide and zero-padded on the right to the widest, the result cut back (exact: see the module's
    docstring)."""
    if len(stacks) == 1:
        return [orthogonalize(stacks[0], steps, dtype, coefficients)]
    wide = [G.mT if G.size(1) > G.size(2) else G for G in stacks]
    if len({G.size(1) for G in wide}) != 1:
        raise ValueError(f"one padded stack needs one shorter side, got {[tuple(G.shape[1:]) for G in stacks]}")
    n = max(G.size(2) for G in wide)
    X = orthogonalize(torch.cat([F.pad(G, (0, n - G.size(2))) for G in wide]), steps, dtype, coefficients)
    out = []
    for G, part in zip(stacks, X.split([G.size(0) for G in stacks])):
        part = part[:, :, :max(G.shape[1:])]  # the padding cut off
        out.append(part.mT if G.size(1) > G.size(2) else part)
    return out


def update(params, grads, bufs, lr, weight_decay, momentum, nesterov, ns_steps, groups, ns_dtype=None,
           ns_coefficients="jordan"):
    """One Muon step of a parameter group, in place. groups: for each Newton-Schulz call, the (shape, indices into
    params) it orthogonalizes, several shapes sharing their shorter side or one. lr is a float, or a 0-d tensor on the
    weights' device when this function is compiled (a float would be baked into the graph, and the schedule's new
    rate every step would recompile it)."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    for group in groups:
        stacks = [torch.stack([updates[i] for i in index]) for _, index in group]
        for (shape, index), ortho in zip(group, orthogonalize_shapes(stacks, ns_steps, ns_dtype, ns_coefficients)):
            # in the weights' dtype first: a foreach add of bf16 into fp32 falls back to one kernel per matrix (48
            # for a 12-layer GPT); cast once, it is one launch per shape, and the same arithmetic
            ortho = list(ortho.to(params[index[0]].dtype).unbind(0))
            scale = -lr * 0.2 * math.sqrt(max(shape))
            if isinstance(scale, torch.Tensor):  # (foreach's alpha takes a number only)
                ortho = torch._foreach_mul(ortho, scale)
                scale = 1.0
            torch._foreach_add_([params[i] for i in index], ortho, alpha=scale)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, then each update replaced by its orthogonalization, scaled by
    0.2 sqrt(max(rows, cols)) so that its RMS is a typical AdamW update's at the same learning rate (Moonshot's rule,
    arXiv 2502.16982). Weight decay as AdamW's: the weight shrinks by lr x weight_decay each step.

    compile() compiles the step with torch.compile: a few fused kernels instead of ~170 launches from Python for a
    12-layer GPT, whose training on an H200 is otherwise near host-bound (BENCHMARKS.md, Round 2).
    one_stack: orthogonalize the shapes that share their shorter side as one padded stack (module docstring); None
    (default) does so on a GPU only. ns_coefficients: the Newton-Schulz polynomials, a key of NS_COEFFICIENTS."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=None,
                 one_stack=None, ns_coefficients="jordan"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon steps matrices only, got a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype  # None: orthogonalize()'s choice for the device
        if ns_coefficients not in NS_COEFFICIENTS:
            raise ValueError(f"ns_coefficients must be one of {sorted(NS_COEFFICIENTS)}, got {ns_coefficients!r}")
        # (not a group setting, as ns_dtype: a state saved by torch.optim.Muon, which has no such setting, loads)
        self.ns_coefficients = ns_coefficients
        self.one_stack = one_stack  # shapes sharing their shorter side in one padded stack; None: on a GPU only
        self.compiled, self.graphed, self._update, self._lr = False, False, update, None

    def stacked(self, p):
        """Whether p's shape goes into one padded stack with the others of its shorter side: one_stack if given; on a
        GPU, yes, unless the step is captured in a CUDA graph and the side is GRAPHED_APART or more. Captured, launches
        cost next to nothing, but a small matrix's products still wait on their latency: the padded stack's step took
        0.29 ms against 0.52 at d_model 384 (TRM, 8 matrices), 0.97 against 0.92 at 256 (GPT-12, 48), and at 512 and
        768, where the FLOPs decide, 1.71 against 1.30 (GPT 7 x 512) and 1.19 against 1.03 (TRM-768). H100,
        bench/muon_step.py --device cuda --compiled, BENCHMARKS.md."""
        if self.one_stack is not None:
            return self.one_stack
        if self.graphed:
            return min(p.shape) < GRAPHED_APART
        return p.is_cuda

    def calls(self, params):
        """The Newton-Schulz calls of a step over these matrices: for each, ((shape, indices into params), ...)."""
        calls = defaultdict(lambda: defaultdict(list))  # one Newton-Schulz call: {shape: indices into params}
        for i, p in enumerate(params):
            shape = tuple(p.shape)
            calls[min(shape) if self.stacked(p) else shape][shape].append(i)
        return tuple(tuple((shape, tuple(index)) for shape, index in call.items()) for call in calls.values())

    def flops_per_step(self):
        """The Newton-Schulz products of one step, as run: each call's matrices, of shorter side m, padded to its
        widest n; an iteration is X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n). It costs the same at any batch, so
        at a small one it can cost as much as the model (the GPT 7 x 512 at 2,048 tokens a step, BENCHMARKS.md)."""
        total = 0
        for group in self.param_groups:
            for call in self.calls(group["params"]) if group["params"] else ():
                m, n = min(call[0][0]), max(max(shape) for shape, _ in call)
                total += sum(len(index) for _, index in call) * group["ns_steps"] * (4 * m * m * n + 2 * m ** 3)
        return total

    def compile(self, graphed=False):
        """graphed: the step will be captured in a CUDA graph (--compile whole), where launches cost next to nothing:
        see stacked()."""
        self.graphed = graphed
        self.compiled, self._update = True, torch.compile(update)
        return self

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            groups = self.calls(params)
            lr = group["lr"]
            if self.compiled:  # the rate as a device tensor, set without a host sync
                if self._lr is None:
                    self._lr = torch.zeros((), device=params[0].device)
                lr = self._lr.fill_(lr)
            self._update(params, [p.grad for p in params], bufs, lr, group["weight_decay"], group["momentum"],
                         group["nesterov"], group["ns_steps"], groups, self.ns_dtype, self.ns_coefficients)
