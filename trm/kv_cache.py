"""Keys/values kept between forward passes: what decoding and adaptive depth need, and nothing training needs.

Attention asks a cache one thing, `attend(q, k, v)`: store these keys/values, attend over what is stored. Two kinds:

- KVCache: incremental decoding. One slot per (round, deep step, net call, layer), handed out in call order, so slot
  i always belongs to the same call. In fixed-shape mode (start_static) every pass is one token at a device-side
  position, so a CUDA graph can replay a decoding step (trm/sampling.py).
- RoundKV: adaptive depth over whole sequences at once (TRM.rounds with a halting threshold, no cache): it remembers
  the previous round's keys/values so stopped tokens can show them again.

Both implement the same stopping rule: in a round, a token that has stopped shows attention the keys/values it had in
the round before (which, if it stopped even earlier, are themselves such a copy). So later tokens read a stopped
token's latest state at every deeper round, and decoding token by token equals scoring the whole sequence.
"""
import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, n_slots, batch_size, n_heads, max_len, head_dim, device, dtype=torch.float32):
        shape = (n_slots, batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # per-slot views, made once: indexing a Python list costs no tensor ops per call
        self.k_slots, self.v_slots = list(self.k.unbind(0)), list(self.v.unbind(0))
        self.max_len = max_len
        self.pos = 0    # tokens already stored
        self.slot = 0   # next slot in the current forward pass
        self.static = False
        self.pos_t = None
        self._no_rounds()

    @classmethod
    def for_model(cls, model, batch_size, max_len, dtype=torch.float32, **depth):
        """A cache with a slot for every attention call that model makes per pass at this depth."""
        c = model.config
        return cls(model.net_calls(**depth) * c.n_layers, batch_size, c.n_heads, max_len, c.d_model // c.n_heads,
                   model.embed.weight.device, dtype)

    # ---- the pass ----------------------------------------------------------------------------------------------
    def begin(self, model, T):
        """Start a forward pass over T new tokens; returns their rotary tables (cos, sin)."""
        self.slot = 0
        self._no_rounds()
        if self.static:
            if T != 1:
                raise ValueError(f"a fixed-shape cache takes one token per pass, got {T}")
            self.mask = (self.positions <= self.pos_t).view(1, -1)  # keys stored so far and this token's own
            return model.rope_cos.index_select(0, self.pos_t), model.rope_sin.index_select(0, self.pos_t)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} > {self.max_len} tokens")
        return model.rope(self.pos, T)

    def attend(self, q, k, v):
        s, T = self.slot, k.size(2)
        self.slot += 1
        ks, vs = self.k_slots[s], self.v_slots[s]
        if self.static:
            ks.index_copy_(2, self.pos_t, k)
            vs.index_copy_(2, self.pos_t, v)
            return F.scaled_dot_product_attention(q, ks, vs, attn_mask=self.mask)
        new = slice(self.pos, self.pos + T)
        if self.stopped is not None:  # stopped sequences show the round before's keys/values (module docstring)
            keep = self.stopped.view(-1, 1, 1, 1)
            k = torch.where(keep, self.k_slots[s - self.round_len][:, :, new], k)
            v = torch.where(keep, self.v_slots[s - self.round_len][:, :, new], v)
        ks[:, :, new] = k
        vs[:, :, new] = v
        end = self.pos + T
        # query i sits at absolute position pos + i and may see keys 0 .. pos + i; one new query sees everything
        mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=self.pos)
        return F.scaled_dot_product_attention(q, ks[:, :, :end], vs[:, :, :end], attn_mask=mask)

    def advance(self, T):
        self.pos += T
        if self.static:
            self.pos_t += T  # on the device, so that a replayed graph advances it too

    # ---- adaptive depth (one token per sequence) ---------------------------------------------------------------
    def _no_rounds(self):
        self.stopped, self.round_start, self.round_len = None, 0, 0

    def next_round(self, stopped):
        """A new supervision round begins; stopped [B, 1] marks the sequences whose token has stopped."""
        if stopped.size(1) != 1:
            raise ValueError("adaptive depth through a cache decodes one token per sequence")
        self.round_len, self.round_start = self.slot - self.round_start, self.slot
        self.stopped = stopped[:, 0] if self.round_len else None

    def skip_rounds(self, n):
        """Every sequence has stopped: the next n rounds' slots take this round's keys/values without computing."""
        L = self.slot - self.round_start  # the round just computed
        for t in (self.k, self.v):
            for r in range(n):
                at = self.slot + r * L
                t[at:at + L, :, :, self.pos] = t[at - L:at, :, :, self.pos]
        self.slot += n * L

    # ---- fixed-shape mode (CUDA graphs) ------------------------------------------------------------------------
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
        self.static = True

    def reset(self):
        """Empty, back to the normal mode; the buffers are kept (a captured graph holds their addresses)."""
        self.pos = self.slot = 0
        self.static = False
        self._no_rounds()


class RoundKV:
    """Adaptive depth over whole sequences at once: records every attention call's keys/values of a round; in the
    next round, stopped tokens show attention their recorded keys/values instead of new ones."""

    def __init__(self):
        self.prev, self.cur, self.stopped = [], [], None

    def begin(self, model, T):
        return model.rope(0, T)

    def next_round(self, stopped):
        self.prev, self.cur, self.stopped = self.cur, [], stopped  # stopped [B, T] bool

    def skip_rounds(self, n):
        pass  # nothing reads the rounds after the last one computed

    def attend(self, q, k, v):
        if self.prev:
            old_k, old_v = self.prev[len(self.cur)]
            keep = self.stopped[:, None, :, None]  # k, v are [B, H, T, hd]
            k, v = torch.where(keep, old_k, k), torch.where(keep, old_v, v)
        self.cur.append((k.detach(), v.detach()))  # rounds stay detached from each other
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
