"""Keys/values kept between forward passes for decoding: one class per job, and nothing training needs.

A cache knows nothing of the model. The model asks it two things (trm/model.py, class Slot):

- begin(T, depth): T new tokens start a pass at the model's depth; returns the position of the first (an int, or a
  device tensor: then the cache's max_len bounds the positions, so that the model's tables can reach them all ahead).
  Every pass through a cache runs at one depth: slot keys name net calls by number, so at another latent depth a
  call would attend over keys that a different call stored (call 4 the answer update at n=4, a latent one at n=6).
- attend(key, q, k, v): store k, v in the slot `key`, attend q over what that slot holds.

The model names every slot: key = (round, deep step, call, layer) for the recursion, (layer,) for arch="gpt". A slot
is allocated the first time its key is seen, so a cache needs no count of the model's net calls.

- KVCache: incremental decoding; a prefill of any length, then any number of tokens per pass.
- StaticKVCache: fixed-shape decoding over a KVCache's buffers, one token per pass at a device-side position, so that
  a CUDA graph can replay a decoding step (trm/sampling.py).
"""
import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, max_len):
        self.max_len = max_len
        self.slots = {}   # key -> (k, v), each [B, H, max_len, head_dim]
        self.pos = 0      # tokens stored
        self.start = 0    # the current pass's tokens are start .. pos - 1
        self.depth = None  # the depth of the passes that stored the tokens held

    def begin(self, T, depth=None):
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} > {self.max_len} tokens")
        if self.pos and depth != self.depth:
            raise ValueError(f"a pass at depth {depth} through a KV cache filled at depth {self.depth} (latent, deep, "
                             f"supervision steps): every pass through a cache must run at the same depth, or its net "
                             f"calls read keys that other calls stored; reset() the cache and prefill again to change "
                             f"it")
        self.depth = depth
        self.start, self.pos = self.pos, self.pos + T
        return self.start

    def slot(self, key, like):
        if key not in self.slots:
            if self.start:  # its earlier positions would read as zeros
                raise ValueError(f"KV cache slot {key} first used at position {self.start}: every pass through a "
                                 f"cache must run at the same depth")
            shape = (*like.shape[:2], self.max_len, like.size(3))
            self.slots[key] = (like.new_zeros(shape), like.new_zeros(shape))
        return self.slots[key]

    def new(self, key):
        """The keys/values the slot holds at the current pass's positions."""
        k, v = self.slots[key]
        return k[:, :, self.start:self.pos], v[:, :, self.start:self.pos]

    def attend(self, key, q, k, v):
        ks, vs = self.slot(key, k)
        ks[:, :, self.start:self.pos] = k
        vs[:, :, self.start:self.pos] = v
        T = k.size(2)
        # query i sits at absolute position start + i and may see keys 0 .. start + i; one new query sees everything
        mask = None if T == 1 else torch.ones(T, self.pos, dtype=torch.bool, device=q.device).tril(self.start)
        return F.scaled_dot_product_attention(q, ks[:, :, :self.pos], vs[:, :, :self.pos], attn_mask=mask)

    def copy(self, source, target):
        """The slot `target` takes the slot `source`'s keys/values at the current pass's positions."""
        k, v = self.new(source)
        tk, tv = self.slot(target, k)
        tk[:, :, self.start:self.pos] = k
        tv[:, :, self.start:self.pos] = v

    def reset(self):
        """Empty; the buffers are kept (a captured graph holds their addresses)."""
        self.pos = self.start = 0
        self.depth = None


class StaticKVCache:
    """One token per pass at position self.pos, a device tensor that the pass advances itself, over the buffers of a
    KVCache that a prefill has filled.

    Every shape is fixed (attention reads all max_len keys under a mask) and no host value changes between tokens, so
    a CUDA graph can capture one decoding step and replay it for every token. A replay does not advance the KVCache's
    pos: the caller counts tokens.
    """

    def __init__(self, cache):
        if not cache.slots:
            raise ValueError("a fixed-shape cache continues a prefill: the KVCache is still empty")
        self.cache, self.max_len = cache, cache.max_len
        k = next(iter(cache.slots.values()))[0]
        self.batch_size, self.dtype = k.size(0), k.dtype
        self.pos = torch.zeros(1, dtype=torch.long, device=k.device)
        self.at = torch.zeros_like(self.pos)  # the current pass's position
        self.positions = torch.arange(cache.max_len, device=k.device)

    def follow(self):
        """Continue after the KVCache's tokens (after every prefill); the same tensor, so a captured graph reads it."""
        self.pos.fill_(self.cache.pos)

    def begin(self, T, depth=None):
        if T != 1:
            raise ValueError(f"a fixed-shape cache takes one token per pass, got {T}")
        if depth != self.cache.depth:
            raise ValueError(f"a pass at depth {depth} through a cache prefilled at depth {self.cache.depth}")
        self.at.copy_(self.pos)
        self.pos += 1
        # keys stored so far and this token's own: 0 there, -inf beyond, added to every call's scores of this pass
        self.bias = torch.zeros((), dtype=self.dtype, device=self.at.device).masked_fill(self.positions > self.at,
                                                                                           float("-inf"))
        return self.at

    def attend(self, key, q, k, v):
        ks, vs = self.cache.slots[key]
        ks.index_copy_(2, self.at, k)
        vs.index_copy_(2, self.at, v)
        # One query by hand: three small kernels. scaled_dot_product_attention with a mask picks a memory-efficient
        # kernel that spreads one query over B x H blocks only: 60 us a call on an H200, 60% of a decoding step
        # (bench/decode_profile.py, BENCHMARKS.md).
        B, H, _, hd = q.shape
        scores = torch.baddbmm(self.bias.expand(B * H, 1, -1), q.reshape(B * H, 1, hd),
                               ks.view(B * H, -1, hd).transpose(1, 2), alpha=hd ** -0.5)
        return torch.bmm(scores.softmax(dim=-1), vs.view(B * H, -1, hd)).view(B, H, 1, hd)
