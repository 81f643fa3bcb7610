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
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trm.kv_cache import RoundKV


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
    grad_deep_steps: int = 1    # deep steps per round that backpropagate, the last ones (the paper: 1; 0 = all T)
    single_stream: bool = False  # one latent state instead of y and z (the same net calls; a variant)

    def __post_init__(self):
        if self.arch not in ("trm", "gpt"):
            raise ValueError(f"arch must be 'trm' or 'gpt', got {self.arch!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        if self.grad_deep_steps < 0:
            raise ValueError(f"grad_deep_steps must be >= 0 (0 = every deep step), got {self.grad_deep_steps}")
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
        else:  # decoding or adaptive depth: the cache stores k, v and attends over what it holds (trm/kv_cache.py)
            out = cache.attend(q, k, v)
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

    # ---- depth and size -----------------------------------------------------------------------------------
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

    def net_calls(self, **depth):
        """Applications of `net` per token in one forward pass."""
        if self.config.arch == "gpt":
            return 1
        n, T_deep, N_sup = self.steps(**depth)
        return N_sup * T_deep * (n + 1)

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

        Deep steps without gradients cost one forward; those with gradients and the head cost forward+backward (3x).
        Attention scores count the full T x T square (the usual convention, e.g. PaLM's MFU).
        """
        c = self.config
        T = seq_len or c.max_seq_len
        block_matmul = 4 * c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden
        per_call = c.n_layers * (2 * block_matmul + 4 * T * c.d_model)
        head = 2 * c.vocab_size * c.d_model
        if c.arch == "gpt":
            return 3 * (per_call + head)
        n, T_deep, N_sup = self.steps(**depth)
        with_grad = self._grad_deep_steps(T_deep)
        calls = n + 1
        return N_sup * ((T_deep - with_grad) * calls * per_call + 3 * with_grad * calls * per_call + 3 * head)

    def embed_tokens(self, idx):
        x = self.embed(idx)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    # ---- the recursion ------------------------------------------------------------------------------------
    def net(self, h, rope, cache=None):
        for block in self.blocks:
            h = block(h, *rope, cache)
        return h

    def latent_recursion(self, x, y, z, n, rope, cache=None):
        if self.config.single_stream:  # one state, the same n + 1 net calls (a variant: arXiv 2603.08082)
            for _ in range(n + 1):
                z = self.net(x + z, rope, cache)
            return z, z
        for _ in range(n):
            z = self.net(x + y + z, rope, cache)  # refine the latent reasoning state
        y = self.net(y + z, rope, cache)          # then the answer, from the latent state alone
        return y, z

    def deep_recursion(self, x, y, z, n, T_deep, rope, cache=None):
        with_grad = self._grad_deep_steps(T_deep)
        with torch.no_grad():
            for _ in range(T_deep - with_grad):
                y, z = self.latent_recursion(x, y, z, n, rope, cache)
        for _ in range(with_grad):  # the paper backpropagates through the last deep step only
            y, z = self.latent_recursion(x, y, z, n, rope, cache)
        return y, z

    def _grad_deep_steps(self, T_deep):
        k = self.config.grad_deep_steps
        return T_deep if k == 0 else min(k, T_deep)

    def rounds(self, idx, cache=None, halt_threshold=None, reembed=False, **depth):
        """The deep-supervision rounds, one at a time: yields (y, running) after each round, y [B, T, D] the answer
        state the head reads, running [B, T] True where the round computed the token (None without a threshold).

        This one loop serves training (both update rules), evaluation and decoding. y and z are detached between
        rounds; with reembed=True x is embedded again every round, so a caller may step the optimizer in between
        (supervision_rounds): each round's graph is then its own.

        cache: a KVCache (idx holds the new tokens only; positions continue from cache.pos).
        halt_threshold < 1 (a model with a halting head) is adaptive depth: after every round, tokens whose halting
        probability exceeds it stop. They keep y and z, and at the deeper rounds attention reads their keys/values
        of the round they stopped at (trm/kv_cache.py). Once every token has stopped, no further round runs.
        """
        B, T = idx.shape
        limit = math.inf if halt_threshold is None else self._halt_limit(halt_threshold)
        halting = limit < math.inf
        if halting:
            self.check_halting()
        kv = cache if cache is not None or not halting else RoundKV()
        rope = kv.begin(self, T) if kv is not None else self.rope(0, T)
        if self.config.arch == "gpt":
            yield self.net(self.embed_tokens(idx), rope, kv), None
        else:
            n, T_deep, N_sup = self.steps(**depth)
            x = y = z = None
            stopped = torch.zeros(B, T, dtype=torch.bool, device=idx.device) if halting else None
            for r in range(N_sup):
                if halting and r:
                    if bool(stopped.all()):  # nothing left to compute; the cache still fills the deeper rounds
                        kv.skip_rounds(N_sup - r)
                        break
                    kv.next_round(stopped)
                if x is None or reembed:
                    x = self.embed_tokens(idx)
                if y is None:
                    y, z = self.y_init.expand_as(x), self.z_init.expand_as(x)
                y_new, z_new = self.deep_recursion(x, y, z, n, T_deep, rope, kv)
                if halting:
                    keep = stopped.unsqueeze(-1)
                    y, z = torch.where(keep, y, y_new), torch.where(keep, z, z_new)
                else:
                    y, z = y_new, z_new
                yield y, (~stopped if halting else None)
                y, z = y.detach(), z.detach()  # each round backpropagates into its own deep recursion only
                if halting:
                    with torch.no_grad():
                        stopped = stopped | (self.halt(y).squeeze(-1) > limit)
        if cache is not None:
            cache.advance(T)

    def forward(self, idx, targets=None, cache=None, last_only=False, act_weight=0.0, halt_threshold=None, **depth):
        """logits [B, T, vocab] of the last supervision round, and the mean of the rounds' losses (None without
        targets). The arguments are rounds()'s, and:

        last_only=True (sampling, no targets) returns logits [B, 1, vocab] of the last position only.
        act_weight > 0 adds act_weight x the halting head's loss to every round's loss (needs config.halt_head).
        """
        logits, losses = self._forward(idx, targets, cache, last_only, act_weight, halt_threshold, **depth)
        return logits, (torch.stack(losses).mean() if losses else None)

    def round_losses(self, idx, targets, act_weight=0.0, halt_threshold=None, **depth):
        """Each supervision round's loss, as a list (forward returns their mean)."""
        return self._forward(idx, targets, None, False, act_weight, halt_threshold, **depth)[1]

    def _forward(self, idx, targets, cache, last_only, act_weight, halt_threshold, **depth):
        if last_only and targets is not None:
            raise ValueError("last_only=True is for sampling: the loss needs every position's logits")
        losses = []
        for y, running in self.rounds(idx, cache, halt_threshold, **depth):
            if targets is not None:
                logits = self.lm_head(y)
                losses.append(self._round_loss(y, logits, self._running_targets(targets, running), act_weight))
        if targets is None:  # only the last round's logits are read: no head for the others
            return (self.sampling_head(y) if last_only else self.lm_head(y)), losses
        rounds = 1 if self.config.arch == "gpt" else self.steps(**depth)[2]
        losses += [losses[0].new_zeros(())] * (rounds - len(losses))  # rounds skipped once every token had stopped
        return logits, losses

    def supervision_rounds(self, idx, targets, act_weight=0.0, halt_threshold=None, **depth):
        """The paper's update rule: yields each round's loss; the caller backpropagates it and steps the optimizer
        before asking for the next round, which then runs with the updated weights from the detached y, z."""
        for y, running in self.rounds(idx, None, halt_threshold, reembed=True, **depth):
            yield self._round_loss(y, self.lm_head(y), self._running_targets(targets, running), act_weight)

    @staticmethod
    def _running_targets(targets, running):
        # a stopped token's loss was counted in the round it stopped at: -1 masks it out of the deeper rounds
        return targets if running is None else targets.masked_fill(~running, -1)

    def check_halting(self):
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

    def sampling_head(self, y):
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
