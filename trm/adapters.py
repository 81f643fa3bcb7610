"""Per-call adapters (Relaxed Recursive Transformers, arXiv 2410.20672), `--adapter_rank R`.

Every matrix W of the shared net (qkv, proj, gate_up, down of each block) gets a rank-R delta A_c B_c of its own for
each net call c of a deep recursion, so the calls need not all compute alike. Rounds share them, as they share the
step vectors. B starts at zero, so the model starts as the plain recursion; TRM._init_weights draws A after every
other weight, so it starts as the plain recursion of the same seed, weight for weight.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def adapter_params(cfg):
    """One block's A [calls, in, R] and B [calls, R, out] for each of its four matrices."""
    calls, r, D, H = cfg.net_calls_per_step, cfg.adapter_rank, cfg.d_model, cfg.mlp_hidden
    shapes = {"qkv": (D, 3 * D), "proj": (D, D), "gate_up": (D, 2 * H), "down": (H, D)}
    params = {}
    for name, (n_in, n_out) in shapes.items():
        params[name + "_a"] = nn.Parameter(torch.empty(calls, n_in, r))  # init_a
        params[name + "_b"] = nn.Parameter(torch.zeros(calls, r, n_out))
    return nn.ParameterDict(params)


def init_a(params):
    """A ~ N(0, 1 / in): (h A) has the scale of h's rows, whatever the width."""
    for name, p in params.items():
        if name.endswith("_a"):
            nn.init.normal_(p, std=1.0 / math.sqrt(p.size(1)))


def call_index(cfg, t, i, n):
    """The adapter index of net call i (of n + 1) in deep step t: its own within the trained depth. Past it, the last
    trained deep step's, and the last trained z-update's for a z-update, the y-update's for the y-update (a deeper
    recursion repeats the trained calls it resembles, as TRM.at_step repeats the last step vector)."""
    i = cfg.latent_steps if i == n else min(i, cfg.latent_steps - 1)
    return min(t, cfg.deep_steps - 1) * (cfg.latent_steps + 1) + i


def linear(layer, h, adapter, name):
    """layer(h), with this net call's delta A B added to its weight when it has adapters (adapter: (params, call),
    params a block's A and B, or its weights merged ahead by merge_all, which generation uses).
    Over many rows (training, prefill) the delta is merged into the weight first: one weight-sized product per call
    instead of two thin matmuls and an add that read and write every row's activations (those cost the TRM-384 30%
    of its training speed on an H200 at rank 4; merged, the step costs 5% more than without adapters, BENCHMARKS.md).
    Over few rows the thin matmuls are the cheaper, for a single call."""
    if adapter is None:
        return layer(h)
    params, call = adapter
    if name in params:  # merged ahead for generation (merge_all): this call's own weight, ready
        return F.linear(h, params[name][call], layer.bias)
    a, b = params[name + "_a"][call], params[name + "_b"][call]
    n_in, n_out = a.size(0), b.size(1)
    if h.numel() // n_in * (n_in + n_out) < n_in * n_out:  # rows * R * (in + out) < in * R * out multiply-adds
        return layer(h) + (h @ a) @ b
    return F.linear(h, layer.weight + (a @ b).mT, layer.bias)


def merge_all(model):
    """Every net call's weights with its delta merged in, per block {name: [calls, out, in]}, for TRM.merged_adapters.

    Generation decodes a row at a time, too few rows to merge per call (linear), so it would take the thin products:
    three extra small kernels per matrix and call, which a launch-bound decoding step pays in full. The weights stay
    fixed while generating, so the merge is done once, ahead (the recommended TRM-384: 14M numbers, 56 MB in float32),
    and every step then runs the plain model's matmuls."""
    merged = []
    for block, params in zip(model.blocks, model.adapters):
        layers = {"qkv": block.attn.qkv, "proj": block.attn.proj, "gate_up": block.mlp.gate_up,
                  "down": block.mlp.down}
        merged.append({name: layer.weight + (params[name + "_a"] @ params[name + "_b"]).mT
                       for name, layer in layers.items()})
    return merged
