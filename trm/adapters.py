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
    params a block's factors A and B, or its weights with every call's delta merged in, from merge_all).
    The model picks one of the two for the whole pass (TRM.pass_adapters, by merge_pays): over many rows the weights
    merged ahead, one weight-sized product per matrix for the pass; over few rows the thin products (h A) B, which
    read and write every row's activations."""
    if adapter is None:
        return layer(h)
    params, call = adapter
    if name in params:  # merged ahead: this call's own weight, ready
        return F.linear(h, params[name][call], layer.bias)
    return layer(h) + (h @ params[name + "_a"][call]) @ params[name + "_b"][call]


def merge_pays(cfg, rows):
    """Whether merging every call's delta into its weights ahead of a pass of `rows` token rows costs fewer
    multiply-adds than the thin products: in x R x out a matrix and call once, against rows x R x (in + out) a matrix
    and call each time the call runs (per call, the thin factors of the TRM-384 at rank 4 lost 30% of its training
    speed on an H200, merged 5%, BENCHMARKS.md)."""
    D, H = cfg.d_model, cfg.mlp_hidden
    shapes = ((D, 3 * D), (D, D), (D, 2 * H), (H, D))  # qkv, proj, gate_up, down
    return rows * sum(n_in + n_out for n_in, n_out in shapes) >= sum(n_in * n_out for n_in, n_out in shapes)


def merge_all(model):
    """Every net call's weights with its delta merged in, per block {name: its calls' weights, each [out, in]}, for
    TRM.pass_adapters: one batched product per matrix (the calls' A [calls, in, R] times B [calls, R, out]) where
    merging call by call took one per call and round, and in the backward two more each, every one a kernel launch
    (bench/op_count.py: the TRM-384's step at batch 4 ran 195 matmuls against the plain model's 99).

    Generation decodes a row at a time, too few rows to merge per pass, so it merges once, ahead, and keeps the
    result while the weights stay fixed (TRM.merged_adapters; the recommended TRM-384: 14M numbers, 56 MB in float32):
    every step then runs the plain model's matmuls."""
    merged = []
    for block, params in zip(model.blocks, model.adapters):
        layers = {"qkv": block.attn.qkv, "proj": block.attn.proj, "gate_up": block.mlp.gate_up,
                  "down": block.mlp.down}
        # unbind: each call's weight a view, whose gradients the backward stacks once (indexing [call] would build a
        # zero tensor of every call's weights for each call that reads one)
        merged.append({name: (layer.weight + (params[name + "_a"] @ params[name + "_b"]).mT).unbind(0)
                       for name, layer in layers.items()})
    return merged
