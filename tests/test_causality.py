"""The two properties a causal language model lives by, for every architecture and depth of trm/model.py: no position
sees a later token (neither its logits nor its gradient), and decoding through the KV cache (trm/kv_cache.py)
computes what the full forward pass computes."""
import pytest
import torch
import torch.nn.functional as F

from tiny_model import V, tiny, tokens
from trm.kv_cache import KVCache, StaticKVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

DEPTHS = [(1, 1, 1), (2, 2, 2), (3, 1, 2)]  # (latent_steps n, deep_steps T, supervision_steps N_sup)
ARCH_DEPTHS = [("trm", d) for d in DEPTHS] + [("gpt", (1, 1, 1))]
VARIANTS = [dict(single_stream=True), dict(grad_deep_steps=0)]  # recursion variants: the same contracts hold


@pytest.mark.parametrize("variant", VARIANTS, ids=["single_stream", "grad_every_deep_step"])
def test_variants_leak_nothing_and_decode_from_the_cache(variant):
    model = tiny(deep_steps=3, **variant)
    idx = tokens(2, 16)
    with torch.no_grad():
        ref, _ = model(idx)
        changed = idx.clone()
        changed[:, 9:] = (changed[:, 9:] + 1) % V
        torch.testing.assert_close(model(changed)[0][:, :9], ref[:, :9], atol=1e-5, rtol=0)
        cache = KVCache(16)
        cached = torch.cat([model(idx[:, :5], cache=cache)[0]] +
                           [model(idx[:, i:i + 1], cache=cache)[0] for i in range(5, 16)], dim=1)
    assert (cached - ref).abs().max().item() <= 1e-4


# ---- no future-token leakage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,depth", ARCH_DEPTHS)
def test_changing_future_tokens_leaves_past_logits_unchanged(arch, depth):
    n, T_deep, N_sup = depth
    model = tiny(arch, latent_steps=n, deep_steps=T_deep, supervision_steps=N_sup)
    idx = tokens(2, 16)
    with torch.no_grad():
        ref, _ = model(idx)
        for t in (0, 5, 14):
            changed = idx.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(15 - t)) % V
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, :t + 1], ref[:, :t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(logits[:, t + 1:], ref[:, t + 1:], atol=1e-3)  # the change does reach the future


@pytest.mark.parametrize("arch,depth", ARCH_DEPTHS)
def test_loss_at_position_t_has_no_gradient_from_later_tokens(arch, depth):
    n, T_deep, N_sup = depth
    model = tiny(arch, latent_steps=n, deep_steps=T_deep, supervision_steps=N_sup)
    idx, t = tokens(2, 12), 6
    embedded = []

    def keep_grad(module, inputs, out):
        out.retain_grad()
        embedded.append(out)

    model.embed.register_forward_hook(keep_grad)
    logits, _ = model(idx)
    F.cross_entropy(logits[:, t], idx[:, t + 1]).backward()
    grad = embedded[0].grad
    assert torch.all(grad[:, t + 1:] == 0)
    assert torch.all(grad[:, :t + 1].abs().sum(-1) > 0)  # every past and present token does get a gradient


# ---- KV-cached decoding equals the full forward pass --------------------------------------------------------------

CACHE_CASES = [("trm", {}), ("gpt", {}), ("trm", dict(supervision_steps=3, deep_steps=3)),
               ("trm", dict(latent_steps=1, deep_steps=1, supervision_steps=1))]


@pytest.mark.parametrize("arch,depth", CACHE_CASES)
def test_cached_decoding_equals_full_forward(arch, depth):
    model = tiny(arch)  # trained depth 2, 2, 2; `depth` overrides it at test time
    idx = tokens(2, 20)
    with torch.no_grad():
        full, _ = model(idx, **depth)
        cache = KVCache(20)
        chunks = [model(idx[:, :5], cache=cache, **depth)[0],    # prefill
                  model(idx[:, 5:9], cache=cache, **depth)[0]]   # a second multi-token chunk
        chunks += [model(idx[:, i:i + 1], cache=cache, **depth)[0] for i in range(9, 20)]  # token by token
    cached = torch.cat(chunks, dim=1)
    assert cache.pos == 20
    assert len(cache.slots) == model.net_calls(**depth) * model.config.n_layers  # a slot per attention call
    assert (cached - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch,depth", CACHE_CASES[:3])
def test_fixed_shape_decoding_equals_full_forward(arch, depth):
    # the CUDA-graph decoding step: every key slot read under a mask, the position a tensor the step advances
    model = tiny(arch)
    idx = tokens(2, 20)
    with torch.no_grad():
        full, _ = model(idx, **depth)
        cache = KVCache(32)
        chunks = [model(idx[:, :7], cache=cache, **depth)[0]]  # prefill
        static = StaticKVCache(cache)
        static.follow()
        chunks += [model(idx[:, i:i + 1], cache=static, **depth)[0] for i in range(7, 20)]
        assert static.pos.item() == 20
        with pytest.raises(ValueError, match="one token per pass"):
            model(idx[:, :2], cache=static, **depth)
        cache.reset()  # a refill reuses the same buffers, then goes on fixed-shape from its end
        again = [model(idx[:, :3], cache=cache, **depth)[0]]
        static.follow()
        again += [model(idx[:, i:i + 1], cache=static, **depth)[0] for i in range(3, 20)]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-4
    assert (torch.cat(again, dim=1) - full).abs().max().item() <= 1e-4


def test_cached_decoding_past_max_seq_len_matches_full_forward():
    idx = tokens(1, 14)
    with torch.no_grad():
        full, _ = tiny(max_seq_len=8)(idx)  # a model of its own, whose table this full pass grows
    for static in (False, True):  # rotary tables must grow when decoding runs past the trained length
        model = tiny(max_seq_len=8)
        with torch.inference_mode():  # as generation runs
            cache = KVCache(14)
            chunks = [model(idx[:, :6], cache=cache)[0]]
            step = StaticKVCache(cache) if static else cache  # fixed shape: the position only on the device
            if static:
                step.follow()
            chunks += [model(idx[:, i:i + 1], cache=step)[0] for i in range(6, 14)]
        assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-4, static
        model(idx, idx)[1].backward()  # a table grown while generating still trains (no inference tensor)


@pytest.mark.parametrize("arch,depth", CACHE_CASES[:3])
def test_greedy_continuation_is_identical_with_and_without_cache(arch, depth):
    model = tiny(arch)
    prompt, steps = tokens(2, 4), 20
    with torch.no_grad():
        seq = prompt
        for _ in range(steps):  # no cache: re-run the whole sequence for every token
            seq = torch.cat([seq, model(seq, **depth)[0][:, -1:].argmax(-1)], dim=1)
        cache = KVCache(prompt.size(1) + steps)
        out, nxt = [prompt], prompt
        for _ in range(steps):
            nxt = model(nxt, cache=cache, **depth)[0][:, -1:].argmax(-1)
            out.append(nxt)
    assert torch.equal(torch.cat(out, dim=1), seq)


def test_kv_cache_overflow_and_a_change_of_depth_raise_clear_errors():
    model = tiny()
    cache = KVCache(8)
    with torch.no_grad():
        model(tokens(1, 6), cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(tokens(1, 3), cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(tokens(1, 9), cache=KVCache(8))
        # a deeper pass would attend over slots that hold nothing for the earlier tokens; a shallower latent depth
        # over keys that other calls stored (call n updates the answer, and n has changed): it ran, silently wrong
        cache.reset()
        model(tokens(1, 6), cache=cache, latent_steps=3)
        for depth in (dict(supervision_steps=3), dict(latent_steps=2), dict()):
            with pytest.raises(ValueError, match="same depth"):
                model(tokens(1, 1), cache=cache, **depth)
        model(tokens(1, 1), cache=cache, latent_steps=3)
        cache.reset()  # and an emptied cache takes any depth
        model(tokens(1, 1), cache=cache)
        with pytest.raises(ValueError, match="prefilled at depth"):  # the fixed-shape cache continues its prefill's
            model(tokens(1, 1), cache=StaticKVCache(cache), latent_steps=3)
