"""The Generative TRM: a Tiny Recursive Model (arXiv 2510.04871) used as a causal next-token language model.

One small network `net` (n_layers transformer blocks) is applied again and again to three streams of shape [B, T, D]:
x (the embedded tokens), z (a latent "reasoning" state) and y (the current answer, read by the output head):

    latent_recursion:  z = net(x + y + z)  n times,  then  y = net(y + z)
    deep_recursion:    T_deep - 1 latent recursions without gradients, then one with gradients
    deep supervision:  N_sup rounds of deep_recursion, each one scored by the output head; y, z detached between rounds

Every net call is causal (causal attention, position-wise everything else), so the state at position t of every
stream at every depth depends on tokens <= t only. That is what makes the model a language model, and it is what
lets generation cache keys/values per net call: each (round, deep step, call, layer) gets its own cache slot.

arch="gpt" stacks the same blocks once (no recursion): the in-project baseline for "does recursion pay?".
"""
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TRMConfig:
    vocab_size: int = 16000
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 2
    latent_steps: int = 2       # n: z-updates per latent recursion
    deep_steps: int = 2         # T: latent recursions per deep recursion (T-1 of them without gradients)
    supervision_steps: int = 2  # N_sup: deep-supervision rounds, each with its own loss
    dropout: float = 0.1
    max_seq_len: int = 512
    arch: str = "trm"           # "trm" (recursive) or "gpt" (n_layers blocks applied once)
    mlp_hidden: int = 0         # SwiGLU width; 0 = 8/3 d_model rounded up to a multiple of 64
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    halt_head: bool = False     # a per-token halting head on y (trained with --act_weight), for adaptive depth

    def __post_init__(self):
        if self.arch not in ("trm", "gpt"):
            raise ValueError(f"arch must be 'trm' or 'gpt', got {self.arch!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        if self.mlp_hidden <= 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self):
        return asdict(self)


def rms_norm(x):
    # No learned gain, as in the official TRM: the recursion re-normalizes its states every call.
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)


def rotary(x, cos, sin):
    # x [..., T, hd]; rotate the two halves of each head (GPT-NeoX layout).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class KVCache:
    """Keys/values of every net call at every depth, for incremental decoding.

    Slots are handed out in call order during a forward pass; the order of calls is fixed by the depth settings,
    so slot i always belongs to the same (round, deep step, call, layer).
    """

    def __init__(self, n_slots, batch_size, n_heads, max_len, head_dim, device, dtype=torch.float32):
        shape = (n_slots, batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # per-slot views, made once: indexing a Python list costs no tensor ops per call
        self.k_slots, self.v_slots = list(self.k.unbind(0)), list(self.v.unbind(0))
        self.max_len = max_len
        self.pos = 0   # tokens already stored
        self.slot = 0  # next slot in the current forward pass
        self.static = False  # fixed-shape mode, see start_static
        self.pos_t = None

    def start_static(self):
        """From here on, one token per forward pass at position pos_t, a device tensor that the pass advances itself.

        Every shape is then fixed (attention reads all max_len keys under a mask) and no host value changes between
        tokens, so a CUDA graph can capture one decoding step and replay it for every token. self.pos is not
        advanced by a replay: the caller counts tokens.
        """
        if self.pos_t is None:  # the same tensor across refills: a captured graph keeps reading it
            self.pos_t = torch.zeros(1, dtype=torch.long, device=self.k.device)
            self.positions = torch.arange(self.max_len, device=self.k.device)
        self.pos_t.fill_(self.pos)
        self.slot, self.static = 0, True

    def reset(self):
        """Empty, back to the normal mode; the buffers are kept (a captured graph holds their addresses)."""
        self.pos, self.slot = 0, 0
        self.static = False

    def update(self, k, v):
        s, T = self.slot, k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} > {self.max_len} tokens")
        self.slot += 1
        ks, vs = self.k_slots[s], self.v_slots[s]
        ks.narrow(2, self.pos, T).copy_(k)
        vs.narrow(2, self.pos, T).copy_(v)
        return ks.narrow(2, 0, self.pos + T), vs.narrow(2, 0, self.pos + T)

    def copy_round(self, dst, src, n_slots, pos, rows):
        """Slots dst.. take the keys/values of slots src.. at position pos, for the sequences where rows [B] is True."""
        for t in (self.k, self.v):
            old, new = t[dst:dst + n_slots, :, :, pos], t[src:src + n_slots, :, :, pos]
            t[dst:dst + n_slots, :, :, pos] = torch.where(rows.view(1, -1, 1, 1), new, old)

    def update_static(self, k, v):
        s = self.slot
        self.slot += 1
        self.k_slots[s].index_copy_(2, self.pos_t, k)
        self.v_slots[s].index_copy_(2, self.pos_t, v)
        return self.k_slots[s], self.v_slots[s]

    def advance(self, T):
        self.pos += T
        self.slot = 0
        if self.static:
            self.pos_t += T  # on the device, so that a replayed graph advances it too


class RoundKV:
    """Adaptive depth over whole sequences at once (TRM.rounds): what decode_adaptive does with its cache.

    Records the keys/values of every attention call of a round, in call order; in the next round, tokens that have
    stopped show attention their recorded keys/values instead of new ones. A stopped token's recorded entry is itself
    the copy from the round it stopped at, so later tokens read that round's keys/values at every deeper round.
    """

    def __init__(self):
        self.prev, self.cur, self.stopped = [], [], None

    def next_round(self, stopped):
        self.prev, self.cur, self.stopped = self.cur, [], stopped  # stopped [B, T] bool

    def mix(self, k, v):
        if self.prev:
            old_k, old_v = self.prev[len(self.cur)]
            keep = self.stopped[:, None, :, None]  # k, v are [B, H, T, hd]
            k, v = torch.where(keep, old_k, k), torch.where(keep, old_v, v)
        self.cur.append((k.detach(), v.detach()))  # rounds stay detached from each other
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, h, cos, sin, cache=None):
        B, T, D = h.shape
        qkv = self.qkv(h).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotary(qkv[:2], cos, sin).unbind(0)  # q and k in one call: half the small ops per token
        v = qkv[2]
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(cache, RoundKV):
            out = F.scaled_dot_product_attention(q, *cache.mix(k, v), is_causal=True)
        elif cache.static:
            k, v = cache.update_static(k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)
        else:
            past = cache.pos
            k, v = cache.update(k, v)
            if T == 1:
                mask = None  # one new query may see everything cached
            else:
                # query i sits at absolute position past + i and may see keys 0 .. past + i
                mask = torch.ones(T, past + T, dtype=torch.bool, device=h.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, h):
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    # Post-norm, as in the official TRM: every block ends in an RMSNorm, so y and z come out of each net call at
    # unit scale however many times the net is applied. Pre-norm would let the residual stream grow with depth.
    def __init__(self, cfg):
        super().__init__()
        self.attn, self.mlp = Attention(cfg), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h, cos, sin, cache=None):
        h = rms_norm(h + self.drop(self.attn(h, cos, sin, cache)))
        return rms_norm(h + self.drop(self.mlp(h)))


class TRM(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Halting (ACT-style, as the paper's Q head): one logit per position and round for "this round's argmax is
        # already the target". Zero weights and a negative bias start it at "keep thinking" (p = 0.007).
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
            if name.startswith("halt."):
                continue  # below
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

    # ---- helpers ------------------------------------------------------------------------------------------
    def depth(self, latent_steps=None, deep_steps=None, supervision_steps=None):
        """Depth settings, trained values unless overridden (test-time depth changes no weights)."""
        c = self.config
        depth = (latent_steps if latent_steps is not None else c.latent_steps,
                 deep_steps if deep_steps is not None else c.deep_steps,
                 supervision_steps if supervision_steps is not None else c.supervision_steps)
        for name, value in zip(("latent_steps", "deep_steps", "supervision_steps"), depth):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        return depth

    def random_depth(self, seed, step):
        """Depth for one training step of --random_depth: latent_steps uniform in 1..2n, deep_steps in 1..2T and
        supervision_steps in 1..2 N_sup.

        Looped LMs extrapolate to deeper inference only when trained at varied depths; rounds are what inference
        varies, so they are drawn too. The draw depends on (seed, step) alone, so a resumed run draws the same depths
        as an uninterrupted one.
        """
        rng = np.random.default_rng([seed, step, 0x7E7])
        return {name: int(rng.integers(1, top + 1)) for name, top in self._random_depth_max().items()}

    def random_depth_grid(self):
        """Every depth random_depth can draw, equally likely (e.g. to count the mean FLOPs of a step)."""
        tops = self._random_depth_max()
        return [dict(zip(tops, d)) for d in itertools.product(*(range(1, t + 1) for t in tops.values()))]

    def _random_depth_max(self):
        c = self.config
        return {"latent_steps": 2 * c.latent_steps, "deep_steps": 2 * c.deep_steps,
                "supervision_steps": 2 * c.supervision_steps}

    def net_calls(self, latent_steps=None, deep_steps=None, supervision_steps=None):
        """Applications of `net` per token in one forward pass."""
        if self.config.arch == "gpt":
            return 1
        n, T_deep, N_sup = self.depth(latent_steps, deep_steps, supervision_steps)
        return N_sup * T_deep * (n + 1)

    def new_cache(self, batch_size, max_len, device=None, dtype=torch.float32, **depth):
        c = self.config
        slots = self.net_calls(**depth) * c.n_layers
        return KVCache(slots, batch_size, c.n_heads, max_len, c.d_model // c.n_heads,
                       device or self.embed.weight.device, dtype)

    def _rope_table(self, n, device):
        hd = self.config.d_model // self.config.n_heads
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
        angles = torch.outer(torch.arange(n, device=device).float(), inv_freq)
        return angles.cos(), angles.sin()

    def rope(self, start, T):
        end = start + T
        if end > self.rope_cos.size(0):  # only generation past max_seq_len gets here
            self.rope_cos, self.rope_sin = self._rope_table(2 * end, self.rope_cos.device)
        return self.rope_cos[start:end], self.rope_sin[start:end]

    def num_params(self, non_embedding=False):
        """Distinct parameters (tied weights counted once)."""
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if non_embedding:
            n -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len=None, **depth):
        """Training FLOPs per token (forward + backward), counted as 2 per multiply-add of every matmul.

        depth: latent_steps / deep_steps / supervision_steps overrides, as for forward().

        No-grad deep steps cost one forward; the last deep step of each round and the head cost forward+backward (3x).
        Attention scores count the full T x T square (the usual convention, e.g. PaLM's MFU).
        """
        c = self.config
        T = seq_len or c.max_seq_len
        block_matmul = 4 * c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden
        per_call = c.n_layers * (2 * block_matmul + 4 * T * c.d_model)
        head = 2 * c.vocab_size * c.d_model
        if c.arch == "gpt":
            return 3 * (per_call + head)
        n, T_deep, N_sup = self.depth(**depth)
        calls = n + 1
        return N_sup * ((T_deep - 1) * calls * per_call + 3 * calls * per_call + 3 * head)

    # ---- the recursion ------------------------------------------------------------------------------------
    def net(self, h, rope, cache=None):
        for block in self.blocks:
            h = block(h, *rope, cache)
        return h

    def latent_recursion(self, x, y, z, n, rope, cache=None):
        for _ in range(n):
            z = self.net(x + y + z, rope, cache)  # refine the latent reasoning state
        y = self.net(y + z, rope, cache)          # then the answer, from the latent state alone
        return y, z

    def deep_recursion(self, x, y, z, n, T_deep, rope, cache=None):
        with torch.no_grad():
            for _ in range(T_deep - 1):
                y, z = self.latent_recursion(x, y, z, n, rope, cache)
        return self.latent_recursion(x, y, z, n, rope, cache)  # the only step that backpropagates

    def forward(self, idx, targets=None, cache=None, latent_steps=None, deep_steps=None, supervision_steps=None,
                return_all_losses=False, last_only=False, act_weight=0.0, halt_threshold=None):
        """logits [B, T, vocab] of the last supervision round; loss = mean of the rounds' losses (None without targets).

        With `cache`, idx holds only the new tokens; positions continue from cache.pos.
        return_all_losses=True returns the per-round losses as a list instead of their mean.
        last_only=True (sampling, no targets) returns logits [B, 1, vocab] of the last position only.
        act_weight > 0 adds act_weight x the halting head's loss to every round's loss (needs config.halt_head).
        halt_threshold: adaptive depth (see rounds); each round's loss then counts the tokens it computed.
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True is for sampling: the loss needs every position's logits")
        if halt_threshold is not None:  # adaptive depth: rounds() embeds and recurses itself
            if cache is not None:
                raise ValueError("adaptive depth through a cache is decode_adaptive's job")
            losses = []
            for y, running in self.rounds(idx, halt_threshold, latent_steps, deep_steps, supervision_steps):
                logits = self.lm_head(y)
                if targets is not None:
                    losses.append(self._round_loss(y, logits, targets.masked_fill(~running, -1), act_weight))
            logits = logits[:, -1:] if last_only else logits
            if targets is None:
                return logits, None
            return logits, (losses if return_all_losses else torch.stack(losses).mean())
        B, T = idx.shape
        if cache is not None and cache.static:
            if T != 1:
                raise ValueError(f"a fixed-shape cache takes one token per pass, got {T}")
            rope = (self.rope_cos.index_select(0, cache.pos_t), self.rope_sin.index_select(0, cache.pos_t))
            cache.mask = (cache.positions <= cache.pos_t).view(1, -1)  # keys stored so far and this token's own
        else:
            rope = self.rope(cache.pos if cache is not None else 0, T)
        x = self.embed(idx)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        head = self._sampling_head if last_only else self.lm_head
        if self.config.arch == "gpt":
            logits = head(self.net(x, rope, cache))
            losses = [self._loss(logits, targets)] if targets is not None else []
        else:
            n, T_deep, N_sup = self.depth(latent_steps, deep_steps, supervision_steps)
            y, z = self.y_init.expand_as(x), self.z_init.expand_as(x)
            losses = []
            for r in range(N_sup):
                y, z = self.deep_recursion(x, y, z, n, T_deep, rope, cache)
                if targets is not None:
                    logits = self.lm_head(y)
                    losses.append(self._round_loss(y, logits, targets, act_weight))
                elif r == N_sup - 1:  # without targets only the last round's logits are read: skip the other heads
                    logits = head(y)
                y, z = y.detach(), z.detach()  # each round backpropagates through its own last deep step only
        if cache is not None:
            cache.advance(T)
        if targets is None:
            return logits, None
        return logits, (losses if return_all_losses else torch.stack(losses).mean())

    def supervision_rounds(self, idx, targets, latent_steps=None, deep_steps=None, supervision_steps=None,
                           act_weight=0.0, halt_threshold=None):
        """The paper's update rule: yields each round's loss; the caller backpropagates it and steps the optimizer
        before asking for the next round, which then runs with the updated weights from the detached y, z.
        halt_threshold: adaptive depth (see rounds); each round's loss then counts the tokens it computed.
        """
        if self.config.arch == "gpt":
            yield self(idx, targets)[1]
            return
        for y, running in self.rounds(idx, 1.0 if halt_threshold is None else halt_threshold, latent_steps,
                                      deep_steps, supervision_steps):
            yield self._round_loss(y, self.lm_head(y), targets.masked_fill(~running, -1), act_weight)

    def rounds(self, idx, halt_threshold=1.0, latent_steps=None, deep_steps=None, supervision_steps=None):
        """The supervision rounds one at a time over whole sequences: yields (y, running) after each round, y [B, T, D]
        and running [B, T], True where the round computed the token. y and z are detached between rounds, and x is
        embedded every round, so the caller may step the optimizer in between (supervision_rounds).

        halt_threshold < 1 (a model with a halting head) is adaptive depth, the computation decode_adaptive makes
        token by token (tested equal): after every round, tokens whose halting probability exceeds it stop. They keep
        y and z, and attention at the deeper rounds reads their keys/values of the round they stopped at (RoundKV).
        """
        if self.config.arch != "trm":
            raise ValueError("supervision rounds are a TRM's (arch='trm')")
        n, T_deep, N_sup = self.depth(latent_steps, deep_steps, supervision_steps)
        limit = self._halt_limit(halt_threshold)
        if limit < math.inf:
            self._check_halting()
        rope = self.rope(0, idx.size(1))
        kv = RoundKV() if limit < math.inf else None  # nothing ever stops at 1.0: plain attention
        y = z = None
        stopped = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        for _ in range(N_sup):
            x = self.embed(idx) * self.embed_scale
            if y is None:
                y, z = self.y_init.expand_as(x), self.z_init.expand_as(x)
            if kv is not None:
                kv.next_round(stopped)
            y_new, z_new = self.deep_recursion(x, y, z, n, T_deep, rope, kv)
            keep = stopped.unsqueeze(-1)
            y, z = torch.where(keep, y, y_new), torch.where(keep, z, z_new)
            yield y, ~stopped
            y, z = y.detach(), z.detach()
            if kv is not None:
                with torch.no_grad():
                    stopped = stopped | (self.halt(y).squeeze(-1) > limit)

    def _check_halting(self):
        if self.halt is None or self.config.arch != "trm":
            raise ValueError("adaptive depth needs a TRM trained with a halting head (train_trm_lm.py --act_weight)")

    @staticmethod
    def _halt_limit(p):
        # stop once sigmoid(q) > p, that is q > logit(p): p = 1 never stops, p = 0 always does
        return math.inf if p >= 1 else -math.inf if p <= 0 else math.log(p / (1 - p))

    def _round_loss(self, y, logits, targets, act_weight):
        """One round's loss: cross-entropy, plus act_weight x the halting head's loss."""
        ce = self._loss(logits, targets)
        return ce + act_weight * self.halt_loss(y, logits, targets) if act_weight else ce

    @torch.no_grad()
    def decode_adaptive(self, idx, cache, halt_threshold, latent_steps=None, deep_steps=None, supervision_steps=None):
        """One new token per sequence (idx [B, 1]) through the cache, each sequence stopping its supervision rounds
        once the halting head's probability exceeds halt_threshold (1.0: never, the fixed depth).

        A stopped sequence keeps its y and z, and its keys/values at every deeper round are copies of those of the
        round it stopped at, so later tokens read the stopped token's latest state wherever they look.
        Returns (logits [B, 1, vocab] of each sequence's last round, rounds run per sequence [B]).
        """
        self._check_halting()
        if idx.size(1) != 1 or cache.static:
            raise ValueError("decode_adaptive takes one token per sequence through a normal (not fixed-shape) cache")
        n, T_deep, N_sup = self.depth(latent_steps, deep_steps, supervision_steps)
        B, pos = idx.size(0), cache.pos
        slots = T_deep * (n + 1) * self.config.n_layers  # cache slots one round fills
        limit = self._halt_limit(halt_threshold)
        rope = self.rope(pos, 1)
        x = self.embed(idx) * self.embed_scale
        y, z = self.y_init.expand_as(x), self.z_init.expand_as(x)
        stopped = torch.zeros(B, dtype=torch.bool, device=idx.device)
        rounds = torch.zeros(B, dtype=torch.long, device=idx.device)
        for r in range(N_sup):
            if r and bool(stopped.all()):  # nothing left to compute: fill the deeper rounds' slots and leave
                for later in range(r, N_sup):
                    cache.copy_round(later * slots, (later - 1) * slots, slots, pos, stopped)
                break
            y_new, z_new = self.deep_recursion(x, y, z, n, T_deep, rope, cache)
            if r and bool(stopped.any()):
                keep = stopped.view(B, 1, 1)
                y, z = torch.where(keep, y, y_new), torch.where(keep, z, z_new)
                cache.copy_round(r * slots, (r - 1) * slots, slots, pos, stopped)
            else:
                y, z = y_new, z_new
            rounds += ~stopped
            if r < N_sup - 1:
                stopped |= self.halt(y)[:, -1, 0] > limit
        cache.advance(1)
        return self._sampling_head(y), rounds

    def _sampling_head(self, y):
        """Logits at the last position. Without autograd they come from a cached [D, vocab] copy of the head: for one
        row, MKL reads that layout about 3x faster than nn.Linear's [vocab, D] (measured on this project's AMD CPU,
        where the head was a fifth of each decoding step)."""
        y = y[:, -1:]
        if torch.is_grad_enabled():
            return self.lm_head(y)
        w = self.lm_head.weight
        # rebuilt whenever the weight changes: replaced, moved, cast (new storage) or updated in place (version)
        key = (w.data_ptr(), w.dtype, w.device, None if w.is_inference() else w._version)
        cached = getattr(self, "_head_t", None)
        if cached is None or cached[0] is not w or cached[1] != key:
            self._head_t = cached = (w, key, w.detach().t().contiguous())
        return y @ cached[2]

    def halt_loss(self, y, logits, targets):
        """Binary cross-entropy of the halting head against "this round's argmax already equals the target"."""
        if self.halt is None:
            raise ValueError("act_weight > 0 needs a model built with halt_head=True")
        q = self.halt(y).squeeze(-1).float()
        with torch.no_grad():
            right = (logits.argmax(-1) == targets).float()
            valid = (targets >= 0).float()  # masked positions (-1) count for neither loss
        per_token = F.binary_cross_entropy_with_logits(q, right, reduction="none")
        return (per_token * valid).sum() / valid.sum().clamp(min=1)

    @staticmethod
    def _loss(logits, targets):
        """Mean cross-entropy over the targets that are not -1 (0 when there are none: every token stopped)."""
        valid = (targets >= 0).sum().clamp(min=1)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction="sum") / valid
