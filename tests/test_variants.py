"""The stabilizers and hybrid-depth variants of trm/model.py keep every contract of the seed model.

QK-norm, zero-initialised output projections, a logit soft-cap, unshared prelude and coda blocks around the recursion,
a learned vector per deep step and low-rank adapters per net call: each must leak no future token, decode from the KV cache (incremental, fixed-shape,
adaptive) exactly as the full forward computes, and start where its docstring says it starts.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_model import D, V, tiny, tokens
from trm import halting
from trm.adapters import linear, merge_all
from trm.checkpoint import load_model
from trm.halting import decode_adaptive
from trm.kv_cache import KVCache, StaticKVCache
from trm.model import NO_CACHE, TRMConfig, rms_norm
from trm.sampling import generate_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "qk_norm": dict(qk_norm=True),
    "zero_init": dict(zero_init=True),
    "softcap": dict(logit_softcap=2.0),
    "prelude": dict(prelude_layers=1),
    "coda": dict(coda_layers=2),
    "step_embed": dict(step_embed=True),
    "adapters": dict(adapter_rank=2),
    "adapters_single": dict(adapter_rank=2, single_stream=True),
    "tied": dict(tie_embeddings=True),
    "all": dict(qk_norm=True, zero_init=True, logit_softcap=2.0, prelude_layers=1, coda_layers=1, step_embed=True,
                adapter_rank=2, tie_embeddings=True),
    "all_single": dict(qk_norm=True, prelude_layers=1, coda_layers=1, step_embed=True, adapter_rank=2,
                       single_stream=True),
    "gpt": dict(arch="gpt", qk_norm=True, zero_init=True, logit_softcap=2.0, tie_embeddings=True),
}


def trained_looking(model):
    """Zero-initialised weights and step vectors would make some checks pass trivially: give them values."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_no_future_token_changes_a_past_logit(variant):
    model = trained_looking(tiny(**variant))
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % V
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(b[:, :9], a[:, :9], atol=1e-5, rtol=0)
    assert (b[:, 9:] - a[:, 9:]).abs().max() > 1e-3  # and the later ones do change: the check can fail


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("depth", [{}, dict(deep_steps=3, supervision_steps=3), dict(latent_steps=1, deep_steps=1)],
                         ids=["trained", "deeper", "shallower"])
def test_cached_and_fixed_shape_decoding_equal_the_full_forward(variant, depth):
    model = trained_looking(tiny(**variant))
    idx = tokens(2, 20)
    with torch.no_grad():
        full, _ = model(idx, **depth)  # the per-call adapters; decoding runs them merged, as generation does
        for merged in (None, merge_all(model)) if model.adapters is not None else (None,):
            model.merged_adapters = merged
            cache = KVCache(24)
            chunks = [model(idx[:, :5], cache=cache, **depth)[0], model(idx[:, 5:9], cache=cache, **depth)[0]]
            chunks += [model(idx[:, i:i + 1], cache=cache, **depth)[0] for i in range(9, 14)]
            static = StaticKVCache(cache)  # the CUDA-graph step's cache, from position 14 on
            static.follow()
            chunks += [model(idx[:, i:i + 1], cache=static, **depth)[0] for i in range(14, 20)]
            assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-4, merged is not None


@pytest.mark.parametrize("variant,depth", [(VARIANTS["prelude"], {}), (VARIANTS["coda"], {}), (VARIANTS["all"], {}),
                                           (VARIANTS["all_single"], dict(latent_steps=1, supervision_steps=4))],
                         ids=["prelude", "coda", "all", "all_single_other_depth"])
def test_adaptive_decoding_equals_whole_sequence_halting(variant, depth):
    model = trained_looking(tiny(halt_head=True, supervision_steps=3, **variant))
    idx = tokens(3, 20)
    with torch.no_grad():
        model.halt.weight.normal_(std=1.0)
        model.halt.bias.zero_()
        q = model.halt(next(model.rounds(idx, **depth))).flatten().sort().values
        # about half the tokens stop after round 1; the cut sits in the widest gap near the middle, as a cut on a
        # token's own value would let rounding decide that token (and through attention, the ones after it)
        middle = q[len(q) // 3:2 * len(q) // 3]
        gap = (middle[1:] - middle[:-1]).argmax()
        model.halt.bias.fill_(-(middle[gap] + middle[gap + 1]).item() / 2)
        whole, _ = model(idx, halt_threshold=0.5, **depth)
        running = sum(r.long() for _, r in halting.rounds(model, idx, 0.5, **depth))
    cache = KVCache(20)
    model.merged_adapters = merge_all(model) if model.adapters is not None else None  # as generation decodes
    steps = [decode_adaptive(model, idx[:, t:t + 1], cache, 0.5, **depth) for t in range(20)]
    model.merged_adapters = None
    assert torch.equal(torch.stack([s[1] for s in steps], dim=1), running)
    assert (running == 1).any() and (running == model.n_rounds(**depth)).any()
    assert (torch.cat([s[0] for s in steps], dim=1) - whole).abs().max().item() <= 1e-4


def test_zero_init_blocks_start_as_identity_and_step_vectors_start_at_zero():
    model = tiny(**VARIANTS["all"])
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.down.weight")) or name == "step_embed":
            assert not p.abs().sum(), name
    h = torch.randn(2, 8, D)
    rope = model.rope(0, 8)
    block = model.blocks[0]
    torch.testing.assert_close(block(h, *rope, NO_CACHE), rms_norm(h))
    # zero step vectors: the same seed gives the plain recursion's weights and outputs
    plain, stepped = tiny(), tiny(step_embed=True)
    idx = tokens(2, 12)
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], stepped(idx)[0])


def test_step_vectors_past_the_trained_depth_reuse_the_last_one():
    model = trained_looking(tiny(step_embed=True))
    x = torch.zeros(1, 1, D)
    assert torch.equal(model.at_step(x, 5)[0, 0], model.step_embed[-1])
    assert not torch.equal(model.at_step(x, 0), model.at_step(x, 1))


def test_adapters_start_as_the_plain_recursion_and_each_call_has_its_own():
    plain, adapted = tiny(), tiny(adapter_rank=2)
    for name, p in plain.named_parameters():  # the adapters are drawn last: every other weight is the same
        assert torch.equal(p, adapted.get_parameter(name)), name
    idx = tokens(2, 12)
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], adapted(idx)[0])  # B = 0: no delta yet
        trained_looking(adapted)
        assert (plain(idx)[0] - adapted(idx)[0]).abs().max() > 1e-3  # and a trained delta changes the output
    n, T = adapted.config.latent_steps, adapted.config.deep_steps
    trained = [adapted.adapter_call(t, i, n) for t in range(T) for i in range(n + 1)]
    assert trained == list(range(adapted.config.net_calls_per_step))  # one adapter per call, all of them used
    assert adapted.adapters[0]["qkv_a"].shape == (T * (n + 1), D, 2)


def test_adapters_past_the_trained_depth_repeat_the_calls_they_resemble():
    model = tiny(adapter_rank=2, latent_steps=2, deep_steps=2)  # calls per deep step: z, z, y
    assert [model.adapter_call(0, i, 4) for i in range(5)] == [0, 1, 1, 1, 2]  # more z-updates: the last z's
    assert [model.adapter_call(5, i, 1) for i in range(2)] == [3, 5]  # fewer: still the y-update's for y
    assert tiny().adapter_call(0, 0, 2) is None


def test_adapter_parameters_and_flops_are_counted():
    base, adapted = tiny(), tiny(adapter_rank=2)
    c = base.config
    per_call_and_layer = 2 * (8 * D + 3 * c.mlp_hidden)  # A and B of qkv, proj, gate_up, down at rank 2
    assert adapted.num_params() - base.num_params() == c.n_layers * adapted.config.net_calls_per_step * \
        per_call_and_layer
    assert adapted.flops_per_token(32) == base.flops_per_token(32)  # merged into the weights: nothing per token
    with pytest.raises(ValueError, match="need arch='trm'"):
        TRMConfig(arch="gpt", adapter_rank=2)


def test_a_delta_merged_into_the_weight_equals_the_thin_matmuls():
    """Over many rows a pass merges every call's A B into W (adapters.merge_all), over few it multiplies (h A) B: the
    same layer either way, and the same gradients for W, A and B."""
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)  # the two orders of summation agree to ~1e-4 in float32
    layer = torch.nn.Linear(D, 3 * D, bias=False, dtype=torch.float64)
    a = torch.randn(2, D, 2, **f64).requires_grad_()
    b = torch.randn(2, 2, 3 * D, **f64).requires_grad_()
    merged = {"qkv": (layer.weight + (a @ b).mT).unbind(0)}  # what merge_all builds for one matrix
    for rows in (1, 4 * D):
        h = torch.randn(rows, D, **f64)
        weights = torch.randn(rows, 3 * D, **f64)  # a loss that weighs every output differently
        grads = []
        for out in (linear(layer, h, ({"qkv_a": a, "qkv_b": b}, 1), "qkv"), linear(layer, h, (merged, 1), "qkv"),
                    h @ layer.weight.T + (h @ a[1]) @ b[1]):
            grads.append(torch.autograd.grad((out * weights).sum(), (layer.weight, a, b), retain_graph=True)
                         + (out.detach(),))
        for got_thin, got_merged, want in zip(*grads):
            torch.testing.assert_close(got_thin, want)
            torch.testing.assert_close(got_merged, want)
        assert grads[1][1][0].abs().sum() == 0 and grads[1][1][1].abs().sum() > 0  # call 0's adapter: untouched


@pytest.mark.parametrize("reembed", [False, True], ids=["one-backward", "a-backward-a-round"])
def test_a_pass_that_merges_its_adapters_ahead_trains_as_the_thin_products(reembed, monkeypatch):
    """Many rows merge every call's delta once for the pass (TRM.pass_adapters), few take the thin products per call:
    the same losses and gradients, also with the paper's update rule (a backward a round, the merge made again for
    each: the weights may have stepped in between)."""
    import trm.model
    model = trained_looking(tiny(adapter_rank=2, supervision_steps=2, step_embed=True)).double()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    assert trm.model.merge_pays(model.config, idx.numel())  # (32 rows are many for d_model 32 at rank 2)
    results = []
    for merge in (True, False):
        monkeypatch.setattr(trm.model, "merge_pays", lambda cfg, rows, merge=merge: merge)
        model.zero_grad()
        if reembed:
            losses = []
            for loss in model.supervision_rounds(idx, targets):
                loss.backward()
                losses.append(loss.detach())
        else:
            loss = model(idx, targets)[1]
            loss.backward()
            losses = [loss.detach()]
        results.append((losses, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (losses_merged, grads_merged), (losses_thin, grads_thin) = results
    torch.testing.assert_close(losses_merged, losses_thin)
    assert len(grads_merged) == len(grads_thin) == len([p for p in model.parameters() if p.requires_grad])
    for got, want in zip(grads_merged, grads_thin):
        torch.testing.assert_close(got, want)


def test_a_pass_merges_once_a_matrix_for_every_call():
    """bench/op_count.py's figure, as a property: with many rows the adapters add one product a matrix to the
    forward (all calls at once), not one a call and round."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ in ("mm", "bmm", "addmm")
            return func(*args, **(kwargs or {}))

    counts = []
    for rank in (0, 2):
        model = tiny(adapter_rank=rank, supervision_steps=2)
        with torch.no_grad(), Matmuls() as count:
            model(tokens(2, 16))  # 32 rows: many (test above)
        counts.append(count.n)
    assert counts[1] - counts[0] == model.config.n_layers * 4  # qkv, proj, gate_up, down: once each a block


@pytest.mark.parametrize("variant", [VARIANTS["adapters"], VARIANTS["adapters_single"], VARIANTS["all"]],
                         ids=["adapters", "adapters_single", "all"])
def test_generation_merges_every_calls_adapters_ahead_and_decodes_as_the_full_forward(variant):
    """generate_batch merges each call's delta into its weights once (adapters.merge_all), so decoding runs plain
    matmuls: its greedy tokens are the full forward's argmax (computed on the per-call path, outside generation),
    it really took the merged weights, and it leaves no merged weights behind for training to meet."""
    model = trained_looking(tiny(**variant))
    model = model.double()  # argmax ties are then out of reach of the two paths' rounding
    prompt = tokens(1, 6)[0].tolist()
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(h, weight, bias=None):
        seen.append(weight.dim() == 2 and all(weight is not p for p in model.parameters()))
        return real_linear(h, weight, bias)

    torch.nn.functional.linear = spy
    try:
        got = [t[0] for t in generate_batch(model, [prompt], 10, temperature=0)]
    finally:
        torch.nn.functional.linear = real_linear
    assert any(seen)  # some matmuls ran on weights that are not the model's own: the merged ones
    assert model.merged_adapters is None
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert got == ids[len(prompt):]
    model.float().train()  # and training after it reaches every adapter through the per-call path
    loss = model(tokens(2, 8), tokens(2, 8, seed=2))[1]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())


def test_a_generation_left_half_way_leaves_training_its_adapters():
    # the merged weights are inference tensors of the weights as they were: a generator paused at a yield (a caller
    # that samples a few tokens, trains, then samples on) must not leave them in the model, or the training step
    # reaches no adapter and an evaluation reads stale weights
    model = trained_looking(tiny(adapter_rank=2)).eval()
    paused = generate_batch(model, [[1, 5, 9]], 10, temperature=0)
    next(paused)
    model.train()
    loss = model(tokens(2, 8), tokens(2, 8, seed=2))[1]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(1.0)  # an optimizer step: the generator's merge is now stale; the model's own forward is not
        idx = tokens(1, 8)
        model.merged_adapters = merge_all(model)
        fresh = model(idx)[0]
        model.merged_adapters = None
        torch.testing.assert_close(model(idx)[0], fresh)
    next(paused)  # and the generator goes on
    paused.close()
    assert model.merged_adapters is None


def test_weights_merged_ahead_give_the_per_call_paths_outputs():
    model = trained_looking(tiny(adapter_rank=2)).double()
    idx = tokens(2, 12)
    with torch.no_grad():
        per_call = model(idx)[0]
        model.merged_adapters = merge_all(model)
        ahead = model(idx)[0]
        model.merged_adapters = None
    torch.testing.assert_close(ahead, per_call)
    assert (per_call - tiny(adapter_rank=2).double()(idx)[0]).abs().max() > 1e-3  # the adapters do change the output


def test_adapters_train_with_adamw_under_muon():
    from trm.flags import trainer_parser
    from trm.optim import build_optimizer
    model = tiny(adapter_rank=2)
    args = trainer_parser().parse_args(["--optimizer", "muon", "--lr", "1e-3", "--weight_decay", "0.1"])
    opt = build_optimizer(model, args, torch.device("cpu"))
    in_adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert all(id(p) in in_adamw for p in model.adapters.parameters())


def test_softcap_bounds_every_logit_and_the_sampling_head_agrees():
    model = trained_looking(tiny(logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
        logits, _ = model(tokens(2, 12))
        last, _ = model(tokens(2, 12), last_only=True)
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9  # capped, and the cap is what binds
    torch.testing.assert_close(last[:, 0], logits[:, -1], atol=1e-5, rtol=0)


def test_qk_norm_makes_attention_independent_of_the_scale_of_queries_and_keys():
    def attention_out(qk_norm, scale):
        model = tiny(qk_norm=qk_norm)
        attn = model.blocks[0].attn
        with torch.no_grad():
            attn.qkv.weight[:2 * D].mul_(scale)  # the query and key rows only
            return attn(torch.randn(2, 8, D, generator=torch.Generator().manual_seed(0)), *model.rope(0, 8), NO_CACHE)
    torch.testing.assert_close(attention_out(True, 30.0), attention_out(True, 1.0), atol=1e-4, rtol=1e-4)
    assert (attention_out(False, 30.0) - attention_out(False, 1.0)).abs().max() > 1e-2


def test_flops_and_parameters_count_the_unshared_blocks():
    base, hybrid = tiny(), tiny(prelude_layers=1, coda_layers=2)
    block = sum(p.numel() for p in base.blocks[0].parameters())
    assert hybrid.num_params() - base.num_params() == 3 * block
    with_prelude = tiny(prelude_layers=1).flops_per_token(32) - base.flops_per_token(32)
    with_coda = tiny(coda_layers=1).flops_per_token(32) - base.flops_per_token(32)
    assert with_coda == base.config.supervision_steps * with_prelude  # the coda runs once per round, the prelude once
    # counted independently: 2 FLOPs per multiply-add of every weight of the block and of QK^T and AV (32 tokens),
    # forward and backward (3x)
    assert with_prelude == 3 * (2 * block + 4 * 32 * base.config.d_model)


def test_variants_need_the_recursion():
    with pytest.raises(ValueError, match="need arch='trm'"):
        TRMConfig(arch="gpt", prelude_layers=1)
    with pytest.raises(ValueError, match=">= 0"):
        TRMConfig(logit_softcap=-1.0)


@pytest.mark.slow
def test_the_trainer_builds_saves_and_resumes_a_variant(tmp_path):
    from trainer_run import TINY, make_corpus
    corpus = make_corpus(tmp_path)
    flags = ["--qk_norm", "--zero_init", "--logit_softcap", "15", "--prelude_layers", "1", "--coda_layers", "1",
             "--step_embed", "--adapter_rank", "2", "--tie_embeddings", "--supervision_steps", "1"]
    cmd = [sys.executable, str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"], "--valid_paths",
           corpus["validation_0"], "--save_dir", str(tmp_path / "ck"), "--eval_every", "4", "--log_every", "2"]
    r = subprocess.run(cmd + flags + ["--max_steps", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    model = load_model(str(tmp_path / "ck" / "final_step_4.pt"))[0]
    c = model.config
    assert (c.qk_norm, c.zero_init, c.logit_softcap, c.prelude_layers, c.coda_layers, c.step_embed, c.adapter_rank,
            c.tie_embeddings) == (True, True, 15.0, 1, 1, True, 2, True)
    assert model.step_embed.abs().sum() > 0 and model.adapters[0]["down_b"].abs().sum() > 0  # they trained
    assert model.lm_head.weight is model.embed.weight  # tied again when loaded, not two copies
    r = subprocess.run(cmd + ["--max_steps", "6", "--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resumed = load_model(str(tmp_path / "ck" / "final_step_6.pt"))[0]  # the command line no longer asks for them
    assert resumed.config.prelude_layers == 1 and resumed.lm_head.weight is resumed.embed.weight
