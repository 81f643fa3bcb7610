"""The Generative TRM: a Tiny Recursive Model (arXiv 2510.04871) used as a causal next-token language model.

One small network `net` (n_layers transformer blocks) is applied again and again to three streams of shape [B, T, D]
(T: sequence length): x (the embedded tokens), z (a latent "reasoning" state) and y (the current answer, read by the
output head):

    latent_recursion:  z = net(x + y + z)  n times,  then  y = net(y + z)
    deep_recursion:    T_deep - 1 latent recursions without gradients, then one with gradients
    deep supervision:  N_sup rounds of deep_recursion, each one scored by the output head; y, z detached between rounds

Every net call is causal (causal attention, position-wise everything else), so the state at position t of every
stream at every depth depends on tokens <= t only. That is what makes the model a language model, and it is what
lets generation cache keys/values per net call: each (round, deep step, call, layer) names its own cache slot (Slot).

arch="gpt" stacks the same blocks once (no recursion): the in-project baseline for "does recursion pay?".
Adaptive depth (a halting head that stops tokens early) wraps the recursion from outside: trm/halting.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trm import halting
from trm.adapters import adapter_params, call_index, init_a, linear, merge_all, merge_pays
from trm.config import TRMConfig


def rms_norm(x):
    # No learned gain, as in the official TRM: the recursion re-normalizes its states every call.
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)


def rotary(x, cos, sin):
    # x [..., T, hd]; rotate the two halves of each head (GPT-NeoX layout).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Slot:
    """Where one attention call keeps its keys/values in a cache: a key with one index per level of the recursion,
    (round, deep step, call, layer), built as the recursion descends (slot[r][t][i][layer]). A computation outside the
    rounds would name its own, e.g. slot["prelude"][layer]. The cache is handed the key with q, k, v and reads nothing
    of the model (trm/kv_cache.py).

    NO_CACHE (training, scoring) attends causally over the pass alone."""
    __slots__ = ("cache", "key")

    def __init__(self, cache=None, key=()):
        self.cache, self.key = cache, key

    def __getitem__(self, i):
        return self if self.cache is None else Slot(self.cache, self.key + (i,))

    def attend(self, q, k, v):
        if self.cache is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.cache.attend(self.key, q, k, v)


NO_CACHE = Slot()


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm

    def forward(self, h, cos, sin, slot, adapter=None):
        B, T, D = h.shape
        qkv = linear(self.qkv, h, adapter, "qkv").view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk = rms_norm(qkv[:2]) if self.qk_norm else qkv[:2]  # per head: |q.k| <= head_dim, however large the weights
        q, k = rotary(qk, cos, sin).unbind(0)  # q and k in one call: half the small ops per token
        out = slot.attend(q, k, qkv[2])
        return linear(self.proj, out.transpose(1, 2).reshape(B, T, D), adapter, "proj")


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, h, adapter=None):
        gate, up = linear(self.gate_up, h, adapter, "gate_up").chunk(2, dim=-1)
        return linear(self.down, F.silu(gate) * up, adapter, "down")


class Block(nn.Module):
    # Post-norm, as in the official TRM: every block ends in an RMSNorm, so y and z come out of each net call at
    # unit scale however many times the net is applied. Pre-norm would let the residual stream grow with depth.
    def __init__(self, cfg):
        super().__init__()
        self.attn, self.mlp = Attention(cfg), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h, cos, sin, slot, adapter=None):
        h = rms_norm(h + self.drop(self.attn(h, cos, sin, slot, adapter)))
        return rms_norm(h + self.drop(self.mlp(h, adapter)))


class TRM(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # Hybrid depth (Huginn, arXiv 2502.05171): unshared blocks before the recursion and between it and the head
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.prelude_layers))
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.coda_layers))
        # Per-iteration conditioning (MeSH, arXiv 2510.07739; Relaxed Recursive Transformers): the shared net learns
        # which deep step it is in. Zero at the start, so the model starts as the plain recursion.
        self.step_embed = nn.Parameter(torch.zeros(cfg.deep_steps, cfg.d_model)) if cfg.step_embed else None
        # Per-call adapters (trm/adapters.py): a low-rank delta per net call on every matrix of the shared net
        self.adapters = nn.ModuleList(adapter_params(cfg) for _ in range(cfg.n_layers)) \
            if cfg.adapter_rank else None
        self.merged_adapters = None  # while generating: the same deltas merged into the weights (adapters.merge_all)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Halting (ACT-style, as the paper's Q head): one logit per position and round for "this round's argmax is
        # already the target". Zero weights and a negative bias start it at "keep thinking" (p = 0.007). Its loss and
        # its use at a threshold: trm/halting.py.
        self.halt = nn.Linear(cfg.d_model, 1) if cfg.halt_head else None
        # A tied matrix keeps the head's small init (std 0.02: small step-0 logits), so the input side multiplies it
        # by sqrt(D), as Gemma does: token vectors enter at RMS 0.02 sqrt(D) (0.32 at D=256) instead of 0.02, which
        # the unit-scale y and z they are added to would drown. The product learns its scale from there.
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.tie_embeddings else 1.0
        # Fixed starting states for y and z (as the official TRM): unit-scale random vectors, not copies of x,
        # so the first z-update sees x + y0 + z0 at the same scale as every later one.
        g = torch.Generator().manual_seed(0)
        self.register_buffer("y_init", torch.randn(cfg.d_model, generator=g), persistent=True)
        self.register_buffer("z_init", torch.randn(cfg.d_model, generator=g), persistent=True)
        cos, sin = self._rope_table(cfg.max_seq_len, torch.device("cpu"))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        for name, p in self.named_parameters():
            if name.startswith(("halt.", "adapters.")) or name == "step_embed":
                continue  # below; step_embed stays zero
            elif self.config.zero_init and name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.zeros_(p)  # the block adds nothing to its input at step 0; post-norm keeps it unit-scale
            elif name == "embed.weight":
                # unit-scale token vectors, like the states they are added to (tied: see embed_scale)
                nn.init.normal_(p, std=0.02 if self.config.tie_embeddings else 1.0)
            elif name == "lm_head.weight":
                # small logits at step 0: y has unit RMS, so logit std = 0.02 sqrt(D) and the first loss is
                # ln(vocab) + about std^2 / 2
                nn.init.normal_(p, std=0.02)
            else:
                nn.init.trunc_normal_(p, std=1.0 / math.sqrt(p.size(1)), a=-2.0 / math.sqrt(p.size(1)),
                                      b=2.0 / math.sqrt(p.size(1)))
        if self.halt is not None:
            nn.init.zeros_(self.halt.weight)
            nn.init.constant_(self.halt.bias, -5.0)
        if self.adapters is not None:  # last, so every other weight is the plain model's of the same seed
            for params in self.adapters:
                init_a(params)

    # ---- what this model can do, its depth and size ------------------------------------------------------------
    @property
    def recursive(self):
        """False for arch="gpt": the blocks once, one round, no test-time depth."""
        return self.config.recursive

    @property
    def can_halt(self):
        """Adaptive depth (trm/halting.py) needs the recursion and a halting head."""
        return self.recursive and self.halt is not None

    def steps(self, latent_steps=None, deep_steps=None, supervision_steps=None):
        """(n, T_deep, N_sup): the trained depth unless overridden (changing the depth at test time changes no
        weights). Every method that takes **depth takes these three keywords."""
        c = self.config
        steps = (latent_steps if latent_steps is not None else c.latent_steps,
                 deep_steps if deep_steps is not None else c.deep_steps,
                 supervision_steps if supervision_steps is not None else c.supervision_steps)
        for name, value in zip(("latent_steps", "deep_steps", "supervision_steps"), steps):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        return steps

    def n_rounds(self, **depth):
        """Supervision rounds per forward pass, each scored by the head."""
        return self.steps(**depth)[2] if self.recursive else 1

    def net_calls(self, **depth):
        """Applications of `net` per token in one forward pass."""
        if not self.recursive:
            return 1
        n, T_deep, N_sup = self.steps(**depth)
        return N_sup * T_deep * (n + 1)

    def num_params(self, non_embedding=False):
        """Distinct parameters (tied weights counted once)."""
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if non_embedding:
            n -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len=None, reembed=False, **depth):
        """Training FLOPs per token (forward + backward), counted as 2 per multiply-add of every matmul.

        Deep steps without gradients cost one forward; those with gradients and the head cost forward+backward (3x).
        Attention scores count the full T x T square (the usual convention, e.g. PaLM's MFU). Adapters add nothing per
        token: training merges them into the weights (linear), one product per net call and step.
        reembed=True counts the paper's update rule (supervision_rounds, --sup_update each), which runs the prelude
        again every round.
        """
        c = self.config
        T = seq_len or c.max_seq_len
        block_matmul = 4 * c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden
        per_call = c.n_layers * (2 * block_matmul + 4 * T * c.d_model)
        head = 2 * c.vocab_size * c.d_model
        if not self.recursive:
            return 3 * (per_call + head)
        n, T_deep, N_sup = self.steps(**depth)
        with_grad = self._grad_deep_steps(T_deep)
        calls = n + 1
        block = per_call // c.n_layers
        preludes = N_sup if reembed else 1
        unshared = 3 * block * (preludes * c.prelude_layers + N_sup * c.coda_layers)  # both always backpropagate
        return unshared + N_sup * ((T_deep - with_grad) * calls * per_call + 3 * with_grad * calls * per_call
                                   + 3 * head)

    def _rope_table(self, n, device):
        hd = self.config.d_model // self.config.n_heads
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
        angles = torch.outer(torch.arange(n, device=device).float(), inv_freq)
        return angles.cos(), angles.sin()

    def rope(self, start, T):
        """Rotary tables (cos, sin) of positions start .. start + T - 1; start may be a device tensor holding one
        position (fixed-shape decoding: the position lives on the device, trm/kv_cache.py)."""
        if torch.is_tensor(start):
            return self.rope_cos.index_select(0, start), self.rope_sin.index_select(0, start)
        end = start + T
        if end > self.rope_cos.size(0):  # only generation past max_seq_len gets here
            with torch.inference_mode(False):  # the table outlives generation: training cannot save inference tensors
                self.rope_cos, self.rope_sin = self._rope_table(2 * end, self.rope_cos.device)
        return self.rope_cos[start:end], self.rope_sin[start:end]

    def embed_tokens(self, idx):
        x = self.embed(idx)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    # ---- the recursion ------------------------------------------------------------------------------------
    def net(self, h, rope, slot=NO_CACHE, call=None, adapters=None):
        """The shared blocks; call (TRM.adapter_call) picks this net call's own among the pass's adapters."""
        for layer, block in enumerate(self.blocks):
            adapter = None if adapters is None or call is None else (adapters[layer], call)
            h = block(h, *rope, slot[layer], adapter)
        return h

    def latent_recursion(self, x, y, z, n, rope, slot=NO_CACHE, t=0, adapters=None):
        """One latent recursion, the t-th of its deep recursion (t picks the net calls' adapters)."""
        if self.config.single_stream:  # one state, the same n + 1 net calls (a variant: arXiv 2603.08082)
            for i in range(n + 1):
                z = self.net(x + z, rope, slot[i], self.adapter_call(t, i, n), adapters)
            return z, z
        for i in range(n):  # refine the latent reasoning state
            z = self.net(x + y + z, rope, slot[i], self.adapter_call(t, i, n), adapters)
        y = self.net(y + z, rope, slot[n], self.adapter_call(t, n, n), adapters)  # then the answer, from z alone
        return y, z

    def adapter_call(self, t, i, n):
        """The adapter index of net call i (of n + 1) in deep step t (trm/adapters.py), None without adapters."""
        return None if self.adapters is None else call_index(self.config, t, i, n)

    def pass_adapters(self, rows):
        """What every net call of a pass of `rows` token rows reads for its adapters (trm/adapters.py linear): None
        without; while generating, the weights merged ahead; else, over many rows, every call's delta merged into its
        weights for this pass, over few the thin factors."""
        if self.adapters is None:
            return None
        if self.merged_adapters is not None:
            return self.merged_adapters
        return merge_all(self) if merge_pays(self.config, rows) else self.adapters

    def deep_recursion(self, x, y, z, n, T_deep, rope, slot=NO_CACHE, adapters=None):
        with_grad = self._grad_deep_steps(T_deep)
        with torch.no_grad():
            for t in range(T_deep - with_grad):
                y, z = self.latent_recursion(self.at_step(x, t), y, z, n, rope, slot[t], t, adapters)
        for t in range(T_deep - with_grad, T_deep):  # the paper backpropagates through the last deep step only
            y, z = self.latent_recursion(self.at_step(x, t), y, z, n, rope, slot[t], t, adapters)
        return y, z

    def at_step(self, x, t):
        """x as deep step t sees it: plus that step's learned vector (the last trained one past the trained depth)."""
        if self.step_embed is None:
            return x
        return x + self.step_embed[min(t, self.step_embed.size(0) - 1)]

    def unshared(self, blocks, h, rope, slot):
        for layer, block in enumerate(blocks):
            h = block(h, *rope, slot[layer])
        return h

    def _grad_deep_steps(self, T_deep):
        k = self.config.grad_deep_steps
        return T_deep if k == 0 else min(k, T_deep)

    def rounds(self, idx, cache=None, reembed=False, **depth):
        """Deep supervision, one round at a time: yields the answer state y [B, T, D] after each round, for the head.
        y and z are detached between rounds, so each round backpropagates into its own deep recursion only.

        cache (trm/kv_cache.py): idx holds the new tokens only; their positions continue from the cache's.
        reembed=True embeds x again every round, so that a caller may step the optimizer in between
        (supervision_rounds): each round's graph is then its own.
        """
        n, T_deep, N_sup = self.steps(**depth)
        slot = NO_CACHE if cache is None else Slot(cache)
        start = 0 if cache is None else cache.begin(idx.size(1), (n, T_deep, N_sup) if self.recursive else None)
        if torch.is_tensor(start):  # a position the host cannot read: the table must already reach the cache's end
            self.rope(0, cache.max_len)
        rope = self.rope(start, idx.size(1))
        x = self.embed_tokens(idx)
        if not self.recursive:
            yield self.net(x, rope, slot[0])  # one round of one net call
            return
        x = self.unshared(self.prelude, x, rope, slot["prelude"])
        y, z = self.y_init.expand_as(x), self.z_init.expand_as(x)
        adapters = self.pass_adapters(idx.numel())
        for r in range(N_sup):
            if reembed and r:  # (the optimizer stepped: the weights, and so their merged adapters, are new)
                x = self.unshared(self.prelude, self.embed_tokens(idx), rope, slot["prelude"])
                adapters = self.pass_adapters(idx.numel())
            y, z = self.deep_recursion(x, y, z, n, T_deep, rope, slot[r], adapters)
            yield self.unshared(self.coda, y, rope, slot[r]["coda"])  # what the heads read; y itself recurses
            y, z = y.detach(), z.detach()

    # ---- heads and losses -------------------------------------------------------------------------------------
    def forward(self, idx, targets=None, cache=None, last_only=False, act_weight=0.0, halt_threshold=None, **depth):
        """logits [B, T, vocab] of the last supervision round, and the mean of the rounds' losses (None without
        targets). cache and **depth are rounds()'s, and:

        last_only=True (sampling, no targets) returns logits [B, 1, vocab] of the last position only.
        act_weight > 0 adds act_weight x the halting head's loss to every round's loss.
        halt_threshold: tokens stop their rounds once the halting head's probability exceeds it (trm/halting.py); a
        stopped token's loss counts in the round it stopped at.
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True is for sampling: the loss needs every position's logits")
        losses = []
        for y, running in self.scored_rounds(idx, cache, halt_threshold, **depth):
            if targets is not None:
                logits = self.head(y)
                losses.append(self.round_loss(y, logits, targets, running, act_weight))
        if targets is None:  # only the last round's logits are read: no head for the others
            return (self.sampling_head(y) if last_only else self.head(y)), None
        losses += [losses[0].new_zeros(())] * (self.n_rounds(**depth) - len(losses))  # rounds every token skipped
        return logits, torch.stack(losses).mean()

    def supervision_rounds(self, idx, targets, act_weight=0.0, halt_threshold=None, **depth):
        """The paper's update rule: yields each round's loss; the caller backpropagates it and steps the optimizer
        before asking for the next round, which then runs with the updated weights from the detached y, z."""
        for y, running in self.scored_rounds(idx, None, halt_threshold, reembed=True, **depth):
            yield self.round_loss(y, self.head(y), targets, running, act_weight)

    def scored_rounds(self, idx, cache, halt_threshold, reembed=False, **depth):
        """(y, running) per round: rounds(), or with a halt threshold halting's rounds, whose running [B, T] marks
        the tokens each round computed (None: all of them)."""
        if halt_threshold is None:
            return ((y, None) for y in self.rounds(idx, cache, reembed, **depth))
        return halting.rounds(self, idx, halt_threshold, cache, reembed, **depth)

    def round_loss(self, y, logits, targets, running, act_weight):
        """One round's loss: cross-entropy over the tokens it computed, plus act_weight x the halting head's loss."""
        if running is not None:  # -1: a stopped token's loss was counted in the round it stopped at
            targets = targets.masked_fill(~running, -1)
        ce = cross_entropy(logits, targets)
        if not act_weight:
            return ce
        if not self.can_halt:
            raise ValueError("act_weight > 0 needs a TRM built with halt_head=True")
        return ce + act_weight * halting.halt_loss(self, y, logits, targets)

    def head(self, y):
        """Logits [.., vocab] from the state the heads read, soft-capped when config.logit_softcap > 0."""
        return self.softcap(self.lm_head(y))

    def softcap(self, logits):
        # a smooth bound: logits stay in (-cap, cap), so no single logit can run away and take the loss with it
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def sampling_head(self, y):
        """Logits at the last position. Without autograd they come from a cached [D, vocab] copy of the head: for one
        row, MKL reads that layout about 3x faster than nn.Linear's [vocab, D] (measured on this project's AMD CPU,
        where the head was a fifth of each decoding step)."""
        y = y[:, -1:]
        if torch.is_grad_enabled():
            return self.head(y)
        w = self.lm_head.weight
        # rebuilt whenever the weight changes: replaced, moved, cast (new storage) or updated in place (version)
        key = (w.data_ptr(), w.dtype, w.device, None if w.is_inference() else w._version)
        cached = getattr(self, "_head_t", None)
        if cached is None or cached[0] is not w or cached[1] != key:
            self._head_t = cached = (w, key, w.detach().t().contiguous())
        return self.softcap(y @ cached[2])


def cross_entropy(logits, targets):
    """Mean cross-entropy over the targets that are not -1 (0 when there are none: every token stopped)."""
    valid = (targets >= 0).sum().clamp(min=1)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction="sum") / valid
