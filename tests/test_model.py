"""Behaviour of trm/model.py: where gradients flow, the loss contract, init, depth, counting. Causality and cached
decoding: test_causality.py."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from trm.depth import random_depth, random_depth_grid
from tiny_model import D, V, tiny, tokens
from trm.kv_cache import KVCache
from trm.model import TRM, TRMConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


# ---- gradients flow through the last deep step of each round only -------------------------------------------------

def manual_round_losses(model, idx, targets, n, T_deep, N_sup):
    """The paper's pseudocode written out with explicit net calls: T_deep - 1 latent recursions without gradients,
    one with, a loss per round, y and z detached between rounds."""
    x, rope = model.embed(idx), model.rope(0, idx.size(1))
    y, z = model.y_init.expand_as(x), model.z_init.expand_as(x)

    def latent(y, z):
        for _ in range(n):
            z = model.net(x + y + z, rope)
        return model.net(y + z, rope), z

    losses = []
    for _ in range(N_sup):
        with torch.no_grad():
            for _ in range(T_deep - 1):
                y, z = latent(y, z)
        y, z = latent(y, z)
        losses.append(F.cross_entropy(model.lm_head(y).view(-1, V), targets.view(-1)))
        y, z = y.detach(), z.detach()
    return losses


def grads(loss, model):
    params = list(model.parameters())
    # retain_graph: the rounds' losses share the embedding's graph
    got = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [g if g is not None else torch.zeros_like(p) for p, g in zip(params, got)]


def assert_grads_close(a, b):
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


def test_gradients_match_manual_last_deep_step_computation():
    n, T_deep, N_sup = 2, 3, 2
    model = tiny(latent_steps=n, deep_steps=T_deep, supervision_steps=N_sup)
    idx, targets = tokens(2, 10), tokens(2, 10, seed=2)
    _, loss = model(idx, targets)
    manual = torch.stack(manual_round_losses(model, idx, targets, n, T_deep, N_sup)).mean()
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=0)
    assert_grads_close(grads(loss, model), grads(manual, model))

    # the comparison can fail: backpropagating through every deep step gives different gradients
    x, rope = model.embed(idx), model.rope(0, 10)
    y, z = model.y_init.expand_as(x), model.z_init.expand_as(x)
    for _ in range(T_deep):
        y, z = model.latent_recursion(x, y, z, n, rope)
    full_bptt = F.cross_entropy(model.lm_head(y).view(-1, V), targets.view(-1))
    _, round1 = model(idx, targets, supervision_steps=1)
    torch.testing.assert_close(full_bptt, round1)  # same value, ...
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(grads(full_bptt, model), grads(round1, model)))


def test_grad_deep_steps_zero_backpropagates_through_every_deep_step():
    n, T_deep = 2, 3
    model = tiny(latent_steps=n, deep_steps=T_deep, supervision_steps=1, grad_deep_steps=0)
    idx, targets = tokens(2, 10), tokens(2, 10, seed=2)
    _, loss = model(idx, targets)
    x, rope = model.embed(idx), model.rope(0, 10)
    y, z = model.y_init.expand_as(x), model.z_init.expand_as(x)
    for _ in range(T_deep):  # no torch.no_grad anywhere
        for _ in range(n):
            z = model.net(x + y + z, rope)
        y = model.net(y + z, rope)
    full_bptt = F.cross_entropy(model.lm_head(y).view(-1, V), targets.view(-1))
    torch.testing.assert_close(loss, full_bptt, atol=1e-5, rtol=0)
    assert_grads_close(grads(loss, model), grads(full_bptt, model))
    # and the FLOP count charges the backward for all three deep steps
    paper = tiny(latent_steps=n, deep_steps=T_deep, supervision_steps=1)
    assert model.flops_per_token() > paper.flops_per_token()


def round_losses(model, idx, targets, **kw):
    """Each round's loss, as forward averages them (with no optimizer step in between, the paper's rule gives the
    same numbers)."""
    return list(model.supervision_rounds(idx, targets, **kw))


def test_each_round_loss_backpropagates_into_its_own_round_only():
    # deep_steps=1: no no-grad step inside a round, so only the detach between rounds can cut the graph
    n, T_deep, N_sup = 2, 1, 3
    model = tiny(latent_steps=n, deep_steps=T_deep, supervision_steps=N_sup)
    idx, targets = tokens(2, 10), tokens(2, 10, seed=2)
    losses = round_losses(model, idx, targets)
    manual = manual_round_losses(model, idx, targets, n, T_deep, N_sup)
    assert len(losses) == N_sup
    for k in range(N_sup):  # round k's loss alone gives the gradient of a fresh computation from detached states
        torch.testing.assert_close(losses[k], manual[k], atol=1e-5, rtol=0)
        assert_grads_close(grads(losses[k], model), grads(manual[k], model))


def tensors_kept_for_backward(model, **depth):
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens(2, 8), tokens(2, 8, seed=2), **depth)
    return count


def test_the_deep_steps_without_gradients_keep_nothing_for_the_backward():
    # what makes deep recursion cheap in memory: a round's graph holds its last deep step, however many run before
    model = tiny().train()
    one = tensors_kept_for_backward(model, deep_steps=1)
    assert tensors_kept_for_backward(model, deep_steps=4) == one
    every = tiny(grad_deep_steps=0).train()
    assert tensors_kept_for_backward(every, deep_steps=4) > 3 * one


# ---- loss contract ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["trm", "gpt"])
def test_forward_contract(arch):
    model = tiny(arch, supervision_steps=3)
    idx, targets = tokens(2, 12), tokens(2, 12, seed=2)
    logits, loss = model(idx)
    assert logits.shape == (2, 12, V) and loss is None
    logits_t, loss = model(idx, targets)
    assert torch.equal(logits_t, logits)
    losses = round_losses(model, idx, targets)
    assert len(losses) == (3 if arch == "trm" else 1)
    torch.testing.assert_close(loss, torch.stack(losses).mean())
    # logits are those of the last round
    torch.testing.assert_close(losses[-1], F.cross_entropy(logits.view(-1, V), targets.view(-1)))
    if arch == "trm":
        assert len({round(l.item(), 6) for l in losses}) == 3  # the rounds really differ


@pytest.mark.parametrize("arch", ["trm", "gpt"])
def test_last_only_gives_the_last_positions_logits(arch):
    model = tiny(arch, supervision_steps=3)
    idx = tokens(2, 12)
    with torch.no_grad():
        full, _ = model(idx)
        last, loss = model(idx, last_only=True)
        assert last.shape == (2, 1, V) and loss is None
        torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
        cache = KVCache(12)
        model(idx[:, :8], cache=cache, last_only=True)  # prefill
        step, _ = model(idx[:, 8:9], cache=cache, last_only=True)
        torch.testing.assert_close(step, model(idx[:, :9])[0][:, -1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, tokens(2, 12, seed=2), last_only=True)


def test_sampling_head_copy_follows_weight_updates():
    # without autograd, last_only logits come from a cached transposed copy of lm_head.weight: it must never go stale
    model = tiny()
    idx = tokens(1, 6)
    with torch.no_grad():
        before, _ = model(idx, last_only=True)
        torch.testing.assert_close(before, model(idx)[0][:, -1:], atol=1e-5, rtol=0)
        model.lm_head.weight.mul_(2.0)  # in place, as an optimizer step or load_state_dict would
        after, _ = model(idx, last_only=True)
        torch.testing.assert_close(after, 2 * before, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(idx, last_only=True)[0], after)
    model.load_state_dict(tiny(seed=5).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True)[0], tiny(seed=5)(idx)[0][:, -1:], atol=1e-5, rtol=0)
    logits, _ = model(idx, last_only=True)  # with autograd: the head itself, so gradients reach its weight
    logits.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_ignore_index_minus_one():
    model = tiny(supervision_steps=1)
    idx, targets = tokens(2, 12), tokens(2, 12, seed=2)
    masked = targets.clone()
    masked[0, :5] = -1
    masked[1, 9:] = -1
    logits, loss = model(idx, masked)
    keep = masked != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))


# ---- initialization and learning --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tie", [("trm", False), ("gpt", False), ("trm", True)])
@pytest.mark.parametrize("size", ["seed", "tiny"])
def test_step0_loss_is_near_ln_vocab(arch, tie, size):
    if size == "seed":
        vocab, cfg = 16000, dict(vocab_size=16000, d_model=256, n_heads=4, max_seq_len=64)
    else:
        vocab, cfg = V, dict(vocab_size=V, d_model=D, n_heads=4, max_seq_len=64)
    torch.manual_seed(0)
    model = TRM(TRMConfig(arch=arch, tie_embeddings=tie, **cfg)).train()  # default dropout, as at step 0 of training
    idx = torch.randint(0, vocab, (2, 65))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(vocab)) < 0.5


def one_latent_recursion(model, idx, scale):
    """Logits of depth (1, 1, 1) written out, token vectors multiplied by scale."""
    x, rope = model.embed(idx) * scale, model.rope(0, idx.size(1))
    y, z = model.y_init.expand_as(x), model.z_init.expand_as(x)
    z = model.net(x + y + z, rope)
    return model.lm_head(model.net(y + z, rope))


def test_tied_embedding_is_scaled_up_on_the_input_side_only():
    tied, untied = tiny(tie_embeddings=True), tiny()
    assert tied.lm_head.weight is tied.embed.weight
    assert abs(tied.embed.weight.std().item() - 0.02) < 0.005  # the head keeps its small init
    idx, one = tokens(2, 8), dict(latent_steps=1, deep_steps=1, supervision_steps=1)
    with torch.no_grad():
        torch.testing.assert_close(tied(idx, **one)[0], one_latent_recursion(tied, idx, math.sqrt(D)))
        assert not torch.allclose(tied(idx, **one)[0], one_latent_recursion(tied, idx, 1.0), atol=1e-3)
        torch.testing.assert_close(untied(idx, **one)[0], one_latent_recursion(untied, idx, 1.0))  # unit-scale init


@pytest.mark.slow
def test_tiny_model_overfits_a_repeated_sequence():
    torch.manual_seed(0)
    model = tiny(n_layers=1).train()
    pattern = torch.randperm(V)[:8]
    seq = pattern.repeat(5)[None, :33]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, final = model.eval()(seq[:, :-1], seq[:, 1:])
    assert final.item() < 0.1


# ---- determinism and test-time depth ----------------------------------------------------------------------------

def test_forward_is_deterministic_for_a_fixed_seed():
    idx = tokens(2, 10)
    a, b = tiny(seed=3), tiny(seed=3)
    assert torch.equal(a(idx)[0], b(idx)[0])
    assert torch.equal(a(idx)[0], a(idx)[0])
    assert not torch.equal(a(idx)[0], tiny(seed=4)(idx)[0])


def test_train_mode_dropout_is_deterministic_for_a_fixed_torch_seed():
    model = tiny(dropout=0.1).train()
    idx = tokens(2, 10)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(model(idx)[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])  # dropout is live in train mode


def test_test_time_depth_changes_output_not_weights():
    model = tiny()
    idx = tokens(2, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(idx)[0]
        for depth in (dict(supervision_steps=3), dict(deep_steps=3), dict(latent_steps=3),
                      dict(supervision_steps=1, deep_steps=1, latent_steps=1)):
            assert not torch.allclose(model(idx, **depth)[0], base, atol=1e-4), depth
        assert torch.equal(model(idx)[0], base)  # overrides do not stick
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_depth_overrides_are_taken_as_given_and_must_be_at_least_one():
    model = tiny(latent_steps=2, deep_steps=3, supervision_steps=4)
    assert model.steps() == (2, 3, 4)
    assert model.steps(latent_steps=1, supervision_steps=1) == (1, 3, 1)
    for bad in (dict(latent_steps=0), dict(deep_steps=0), dict(supervision_steps=-1)):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):  # 0 used to fall back silently to the trained depth
            model.steps(**bad)
        with pytest.raises(ValueError, match=name):
            model(tokens(1, 4), **bad)


# ---- parameter and FLOP counting ---------------------------------------------------------------------------------

def test_num_params_counts_tied_weights_once():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    unique = {id(p): p.numel() for _, p in tied.named_parameters(remove_duplicate=False)}
    every = sum(p.numel() for _, p in tied.named_parameters(remove_duplicate=False))
    assert tied.num_params() == sum(unique.values()) == every - V * D
    assert untied.num_params() == tied.num_params() + V * D
    blocks = sum(p.numel() for p in untied.blocks.parameters())
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True) == blocks


def test_flops_per_token_structure():
    T = 32

    def flops(arch="trm", **depth):
        return tiny(arch, **depth).flops_per_token(T)

    # independent count: 2 FLOPs per multiply-add; a net call = every block weight once plus QK^T and AV
    model = tiny()
    per_call = 2 * sum(p.numel() for p in model.blocks.parameters()) + model.config.n_layers * 4 * T * D
    head = 2 * V * D
    n, T_deep, N_sup = 2, 2, 2
    calls = n + 1
    # per round: T_deep - 1 forward-only latent recursions, one forward+backward (3x), head forward+backward
    expected = N_sup * ((T_deep - 1) * calls * per_call + 3 * calls * per_call + 3 * head)
    assert flops(latent_steps=n, deep_steps=T_deep, supervision_steps=N_sup) == expected
    assert flops("gpt") == 3 * (per_call + head)
    assert flops("gpt") < flops()
    f1, f2, f3 = (flops(supervision_steps=N) for N in (1, 2, 3))
    assert f3 - f2 == f2 - f1 > 0
    assert flops(deep_steps=3) > flops(deep_steps=2) and flops(latent_steps=3) > flops(latent_steps=2)
    # test-time depth overrides count like a model trained at that depth
    for depth in (dict(supervision_steps=3), dict(deep_steps=1), dict(latent_steps=4, deep_steps=3)):
        assert model.flops_per_token(T, **depth) == flops(**depth)


# ---- config validation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, says", [(dict(d_model=30, n_heads=4), "heads of even size"),   # not divisible
                                       (dict(d_model=12, n_heads=4), "heads of even size"),   # rotary needs pairs
                                       (dict(arch="rnn"), "arch must be 'trm' or 'gpt', got 'rnn'"),
                                       (dict(n_layers=0), "n_layers must be a whole number >= 1, got 0"),
                                       (dict(d_model=-4), "d_model must be a whole number >= 1, got -4"),
                                       (dict(max_seq_len=2.5), "max_seq_len must be a whole number >= 1, got 2.5"),
                                       (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
                                       (dict(d_model=1 << 20, n_heads=1 << 10), "parameters, more than the")])
def test_bad_config_raises(bad, says):
    kw = dict(vocab_size=V, d_model=D, n_heads=4)
    kw.update(bad)
    with pytest.raises(ValueError, match=re.escape(says)):
        TRMConfig(**kw)


def test_supervision_rounds_without_steps_match_the_mean_rule():
    """With no optimizer step between rounds, the paper's per-round losses are forward's rounds exactly, and their
    summed gradients are N_sup times the gradient of the mean-of-rounds loss."""
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=50, d_model=32, n_heads=2, max_seq_len=16, dropout=0.0, supervision_steps=3))
    idx = torch.randint(0, 50, (2, 16))
    _, mean = model(idx, idx)
    mean.backward()
    expected = {n: 3 * p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rounds = []
    for loss in model.supervision_rounds(idx, idx):
        loss.backward()
        rounds.append(loss.detach())
    torch.testing.assert_close(torch.stack(rounds).mean(), mean.detach(), atol=1e-6, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6)


def test_random_depth_is_reproducible_from_the_seed_and_covers_its_range():
    model = TRM(TRMConfig(vocab_size=50, d_model=32, n_heads=2, latent_steps=2, deep_steps=3, supervision_steps=2))
    draws = [random_depth(model.config, seed=5, step=s) for s in range(400)]
    assert draws == [random_depth(model.config, seed=5, step=s) for s in range(400)]  # what a resumed run redraws
    assert draws != [random_depth(model.config, seed=6, step=s) for s in range(400)]
    assert {d["latent_steps"] for d in draws} == {1, 2, 3, 4}
    assert {d["deep_steps"] for d in draws} == {1, 2, 3, 4, 5, 6}
    assert {d["supervision_steps"] for d in draws} == {1, 2, 3, 4}
    grid = random_depth_grid(model.config)
    assert len(grid) == 4 * 6 * 4 and all(d in grid for d in draws)


def test_the_steps_ahead_are_priced_at_the_depth_each_will_run():
    # the ETA: inside --depth_warmup the shallow steps so far priced the full-depth steps ahead as cheap
    from trm.depth import flops_ahead, for_step
    config = tiny(deep_steps=3).config
    price = lambda depth: 10 if depth.get("deep_steps") == 1 else 30  # noqa: E731
    for warmup, step, max_steps in ((0.5, 10, 100), (0.3, 0, 7), (0.5, 60, 100), (0.25, 99, 100)):
        scheduled = sum(price(for_step(config, None, warmup, 0, s, s / max_steps)) for s in range(step, max_steps))
        assert flops_ahead(config, None, warmup, step, max_steps, price) == scheduled
    assert flops_ahead(config, "all", 0.5, 10, 100, price) is None  # random depths: the steps so far are the mean
    assert flops_ahead(config, None, 0.0, 10, 100, price) is None


def test_depth_schedules_draw_what_they_promise():
    from trm.depth import depth_warmup, random_deep_steps
    cfg = TRMConfig(vocab_size=50, d_model=32, n_heads=2, deep_steps=3)
    draws = [random_deep_steps(cfg, seed=1, step=s) for s in range(300)]
    assert draws == [random_deep_steps(cfg, seed=1, step=s) for s in range(300)]
    assert {d["deep_steps"] for d in draws} == set(range(1, 7)) and all(len(d) == 1 for d in draws)
    assert depth_warmup(cfg, 0.2, 1 / 3) == {"deep_steps": 1} and depth_warmup(cfg, 0.4, 1 / 3) == {}
