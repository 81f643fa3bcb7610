"""Behaviour of trm/halting.py: the halting head's loss, stopping at a threshold, and adaptive decoding through the KV
cache computing exactly what scoring whole sequences computes."""
import pytest
import torch
import torch.nn.functional as F

from test_model import round_losses
from tiny_model import tiny, tokens
from trm import halting
from trm.halting import decode_adaptive
from trm.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def halting_model(seed=0, **overrides):
    """A tiny TRM whose halting head says "stop" for some tokens and not others (random weights, bias 0)."""
    model = tiny(halt_head=True, seed=seed, **overrides)
    with torch.no_grad():
        model.halt.weight.normal_(std=1.0)
        q = model.halt(next(model.rounds(tokens(3, 20)))).flatten()
        model.halt.bias.fill_(-q.median())  # p > 0.5 after round 1 for about half the tokens
    return model


def adaptive_decode(model, idx, threshold, **depth):
    cache = KVCache(idx.size(1))
    out = [decode_adaptive(model, idx[:, t:t + 1], cache, threshold, **depth) for t in range(idx.size(1))]
    return torch.cat([o[0] for o in out], dim=1), torch.stack([o[1] for o in out], dim=1)


def test_halting_head_starts_at_keep_thinking_and_adds_its_loss():
    model = tiny(halt_head=True)
    assert torch.sigmoid(model.halt.bias).item() < 0.01 and model.halt.weight.abs().sum() == 0
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    model.lm_head.weight.data[targets[0, 0]] += 5.0  # so that some argmaxes are right
    _, lm = model(idx, targets)
    _, both = model(idx, targets, act_weight=0.5)
    # the head says q = -5 everywhere: its BCE is softplus(5) where a round's argmax is right, softplus(-5) elsewhere
    with torch.no_grad():
        right = torch.stack([model.lm_head(y).argmax(-1) == targets for y in model.rounds(idx)])
    assert 0 < right.float().mean() < 1
    bce = torch.where(right, F.softplus(torch.tensor(5.0)), F.softplus(torch.tensor(-5.0))).mean()
    torch.testing.assert_close(both - lm, 0.5 * bce)
    with pytest.raises(ValueError, match="halt_head"):
        tiny()(idx, idx, act_weight=0.5)


def test_halting_head_learns_when_the_argmax_is_right():
    torch.manual_seed(0)
    model = tiny(halt_head=True).train()
    idx = tokens(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx, idx.roll(-1, 1), act_weight=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits, _ = model(idx)
        right = logits.argmax(-1) == idx.roll(-1, 1)
        said = torch.sigmoid(model.halt(list(model.rounds(idx))[-1]).squeeze(-1)) > 0.5
    assert right.float().mean() > 0.5 and (said == right).float().mean() > 0.9


@pytest.mark.parametrize("depth", [{}, dict(supervision_steps=3, deep_steps=1)])
def test_threshold_one_is_the_fixed_depth(depth):
    model = halting_model()
    idx = tokens(2, 20)
    with torch.no_grad():
        full, _ = model(idx, **depth)
    logits, rounds = adaptive_decode(model, idx, 1.0, **depth)
    assert (logits - full).abs().max().item() <= 1e-4
    assert (rounds == model.steps(**depth)[2]).all()


def test_threshold_zero_equals_one_round_everywhere():
    # every token stops after round 1, so every deeper slot holds round-1 keys/values: the N_sup=1 model, exactly
    model = halting_model()
    idx = tokens(2, 20)
    with torch.no_grad():
        one_round, _ = model(idx, supervision_steps=1)
    logits, rounds = adaptive_decode(model, idx, 0.0, supervision_steps=3)
    assert (rounds == 1).all()
    assert (logits - one_round).abs().max().item() <= 1e-4


def test_mixed_halting_keeps_sequences_independent():
    # some tokens stop early and others do not; a batch must give what each sequence gives alone
    model = halting_model(supervision_steps=3)
    idx = tokens(3, 20)
    logits, rounds = adaptive_decode(model, idx, 0.5)
    assert (rounds == 1).any() and (rounds > 1).any(), "the test needs both outcomes"
    for b in range(3):
        alone, alone_rounds = adaptive_decode(model, idx[b:b + 1], 0.5)
        assert torch.equal(alone_rounds[0], rounds[b])
        assert (alone[0] - logits[b]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_whole_sequence_halting_equals_token_by_token_decoding(threshold):
    # rounds() (training, fast scoring) must compute exactly what adaptive generation computes
    model = halting_model(supervision_steps=3)
    idx = tokens(3, 20)
    logits, rounds = adaptive_decode(model, idx, threshold)
    with torch.no_grad():
        states = list(halting.rounds(model, idx, threshold))
        whole, _ = model(idx, halt_threshold=threshold)
    assert torch.equal(sum(running.long() for _, running in states), rounds)
    assert (rounds == 1).any() and (rounds == 3).any()
    assert (whole - logits).abs().max().item() <= 1e-4


def test_halting_loss_counts_each_token_in_the_rounds_that_computed_it():
    model = halting_model(supervision_steps=3)
    idx = tokens(2, 20)
    fixed = round_losses(model, idx, idx)
    never = round_losses(model, idx, idx, halt_threshold=1.0)
    torch.testing.assert_close(torch.stack(never), torch.stack(fixed))
    # every token stops after round 1: the deeper rounds compute nothing and add nothing to the mean
    assert len(round_losses(model, idx, idx, halt_threshold=0.0)) == 1
    _, always = model(idx, idx, halt_threshold=0.0)
    torch.testing.assert_close(always, fixed[0] / 3)
    # at 0.5 some tokens stop after round 1: the deeper rounds' losses average over the others only
    partial = round_losses(model, idx, idx, halt_threshold=0.5)
    with torch.no_grad():
        running = [r for _, r in halting.rounds(model, idx, 0.5)]
        logits = [model.lm_head(y) for y, _ in halting.rounds(model, idx, 0.5)]
    assert 0 < running[1].sum() < running[0].sum()
    for loss, run, lg in zip(partial, running, logits):
        torch.testing.assert_close(loss, F.cross_entropy(lg[run], idx[run]))
    model.train()
    _, loss = model(idx, idx, halt_threshold=0.5, act_weight=0.1)
    loss.backward()
    assert model.halt.weight.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_adaptive_depth_needs_a_halting_head():
    for model in (tiny(), tiny("gpt", halt_head=True)):
        with pytest.raises(ValueError, match="halting head"):
            decode_adaptive(model, tokens(1, 1), KVCache(4), 0.5)
        with pytest.raises(ValueError, match="halting head"):
            model(tokens(1, 4), halt_threshold=0.5)
    assert not tiny().can_halt and not tiny("gpt", halt_head=True).can_halt and tiny(halt_head=True).can_halt
