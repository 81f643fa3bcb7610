"""CUDA paths: compile, bf16, CUDA graphs, NCCL. Skipped without a GPU; run on one with `make test-gpu`."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from trm.halting import decode_adaptive
from trm.kv_cache import KVCache, StaticKVCache
from trm.model import TRM, TRMConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def tiny(**kw):
    cfg = dict(vocab_size=512, d_model=64, n_heads=4, max_seq_len=64, dropout=0.0)
    cfg.update(kw)
    return TRMConfig(**cfg)


@pytest.mark.parametrize("arch", ["trm", "gpt"])
def test_compiled_matches_eager_in_bf16(arch):
    # bf16 rounds eager and compiled kernels differently, so neither equals the other: the compiled model must be no
    # further from the fp32 model than eager bf16 is (a wrong fusion or a dropped cast would be far further)
    torch.manual_seed(0)
    model = TRM(tiny(arch=arch)).cuda().eval()
    x = torch.randint(0, 512, (4, 64), device="cuda")
    with torch.no_grad():
        ref_logits, ref_loss = model(x)[0].float(), model(x, x)[1].item()
        compiled = torch.compile(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = {"eager": model(x)[0].float(), "compiled": compiled(x)[0].float()}
            loss = {"eager": model(x, x)[1].item(), "compiled": compiled(x, x)[1].item()}
    error = {k: (v - ref_logits).abs().max().item() for k, v in logits.items()}
    scale = ref_logits.abs().max().item()
    assert 0 < error["eager"] < 0.05 * scale, error  # bf16 did round: the comparison below is not vacuous
    assert error["compiled"] <= 2 * error["eager"] + 1e-3 * scale, (error, scale)
    for k in loss:
        assert abs(loss[k] - ref_loss) < 1e-2, (loss, ref_loss)


def test_compiled_evaluation_equals_eager_in_bf16():
    # the trainer's validation on CUDA (evaluate(compiled=True), issue 20): bf16 rounds the fused kernels and the eager
    # ones differently, so the losses agree to bf16's rounding, not bit for bit; the tokens and bytes exactly
    from trm.evaluate import compile_blocks, evaluate
    torch.manual_seed(0)
    model = TRM(tiny(vocab_size=2048, d_model=256, max_seq_len=128)).cuda()  # the seed's width and depth
    with torch.no_grad():  # confident logits: a loss far from ln(vocab), which a wrong round or chunk would move
        model.lm_head.weight.mul_(20)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 2048, (64, 129), generator=g)  # two batches of 32 windows
    token_bytes = torch.randint(0, 4, (2048,), generator=g)
    args = (model, windows, token_bytes, 32, "cuda")
    fp32 = evaluate(*args, None, head_windows=8)
    eager = evaluate(*args, torch.bfloat16, head_windows=8)
    compiled = evaluate(*args, torch.bfloat16, head_windows=8, compiled=True)
    assert compiled["tokens"] == eager["tokens"] == 64 * 128 and compiled["bytes"] == eager["bytes"]
    assert eager["loss"] != fp32["loss"]  # bf16 did round: the comparisons below are not vacuous
    assert abs(compiled["loss"] - eager["loss"]) < 1e-2 * eager["loss"], (compiled, eager)
    # and no further from fp32 than eager bf16 is (a dropped cast or a wrong fusion would be far further)
    assert abs(compiled["loss"] - fp32["loss"]) <= 2 * abs(eager["loss"] - fp32["loss"]) + 1e-3 * fp32["loss"]
    # the regional way (trm.evaluate.compile_blocks): the blocks fused, the rest eager, to the same bounds
    blocks = evaluate(compile_blocks(model), *args[1:], torch.bfloat16, head_windows=8)
    assert blocks["tokens"] == eager["tokens"] and blocks["bytes"] == eager["bytes"]
    assert abs(blocks["loss"] - eager["loss"]) < 1e-2 * eager["loss"], (blocks, eager)
    assert abs(blocks["loss"] - fp32["loss"]) <= 2 * abs(eager["loss"] - fp32["loss"]) + 1e-3 * fp32["loss"]
    # and with the head's loss compiled too (compiled_head=True: the loss reduced as the logits are read)
    head = evaluate(model, *args[1:], torch.bfloat16, head_windows=8, compiled_head=True)
    assert head["tokens"] == eager["tokens"] and head["bytes"] == eager["bytes"]
    assert abs(head["loss"] - eager["loss"]) < 1e-2 * eager["loss"], (head, eager)
    assert abs(head["loss"] - fp32["loss"]) <= 2 * abs(eager["loss"] - fp32["loss"]) + 1e-3 * fp32["loss"]


def test_kv_cache_equals_full_forward_on_cuda():
    torch.manual_seed(0)
    model = TRM(tiny()).cuda().eval()
    x = torch.randint(0, 512, (2, 40), device="cuda")
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(64)
        parts = [model(x[:, :25], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(25, 40)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-3  # TF32 matmuls allowed


@pytest.mark.parametrize("compile,kw,merge", [(False, {}, False), (True, {}, False),
                                               (True, dict(adapter_rank=2, step_embed=True), False),
                                               (True, dict(adapter_rank=2, step_embed=True), True)],
                         ids=["eager", "compiled", "compiled-adapters", "compiled-adapters-merged"])
def test_cuda_graph_decoding_step_equals_full_forward(compile, kw, merge):
    from trm.adapters import merge_all
    from trm.sampling import GraphedStep
    torch.manual_seed(0)
    model = TRM(tiny(**kw)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():  # adapters' B and step vectors start at zero: give them values
            if not p.abs().sum():
                p.normal_(std=0.3)
    x = torch.randint(0, 512, (1, 40), device="cuda")
    with torch.inference_mode():
        full, _ = model(x)
        cache = KVCache(64)
        model(x[:, :25], cache=cache)
        static = StaticKVCache(cache)
        static.follow()
        if merge:  # as generate_batch decodes; the full forward above took the per-call path
            model.merged_adapters = merge_all(model)
        step = GraphedStep(model, static, {}, compile)
        steps = [step(x[0, t]).clone() for t in range(25, 40)]  # logits of token t, read before the next replay
    assert static.pos.item() == 40
    assert (torch.cat(steps, 1) - full[:, 25:40]).abs().max().item() < 1e-3


@pytest.mark.parametrize("depth,kw", [({}, {}), (dict(supervision_steps=3), {}), ({}, dict(adapter_rank=2))],
                         ids=["trained", "deeper", "adapters"])
def test_cuda_graph_generation_equals_eager_past_the_window(depth, kw):
    from trm.sampling import generate
    torch.manual_seed(0)
    model = TRM(tiny(max_seq_len=32, **kw)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():  # adapters' B start at zero: give them values
            if not p.abs().sum():
                p.normal_(std=0.3)
    prompt = list(range(5, 25))
    runs = [list(generate(model, prompt, 50, temperature=0, cuda_graph=graph, use_cache=cache, **depth))
            for graph, cache in ((True, True), (False, True), (False, False))]
    assert len(runs[0]) == 50 and runs[0] == runs[1] == runs[2]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_graph_generation_on_the_second_gpu_equals_eager():
    # --device cuda:1: a graph's side stream and capture belong to the current device, which pick_device makes it
    from trm.device import pick_device
    from trm.sampling import generate
    device, _, _ = pick_device("cuda:1")
    torch.manual_seed(0)
    model = TRM(tiny(max_seq_len=32)).to(device).eval()
    runs = [list(generate(model, list(range(5, 25)), 30, temperature=0, cuda_graph=graph)) for graph in (True, False)]
    assert len(runs[0]) == 30 and runs[0] == runs[1]


def test_compiled_graph_step_in_bf16_equals_eager_steps():
    # the fastest decoding path: bf16 weights, the step compiled and captured; the logits as eager cached steps give
    from trm.sampling import GraphedStep
    torch.manual_seed(0)
    model = TRM(tiny()).cuda().eval().to(torch.bfloat16)
    x = torch.randint(0, 512, (2, 40), device="cuda")
    with torch.inference_mode():
        cache = KVCache(64)
        model(x[:, :25], cache=cache)
        eager = [model(x[:, t:t + 1], cache=cache, last_only=True)[0].float() for t in range(25, 40)]
        cache.reset()
        model(x[:, :25], cache=cache)
        static = StaticKVCache(cache)
        static.follow()
        step = GraphedStep(model, static, {}, compile=True)
        graphed = [step(x[:, t]).float() for t in range(25, 40)]
    for a, b in zip(eager, graphed):
        assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()  # bf16 rounding, fused differently


def test_halting_on_cuda_whole_sequence_equals_token_by_token():
    torch.manual_seed(0)
    model = TRM(tiny(halt_head=True, supervision_steps=3)).cuda().eval()
    x = torch.randint(0, 512, (2, 40), device="cuda")
    with torch.no_grad():
        model.halt.weight.normal_()
        model.halt.bias.fill_(-model.halt(next(model.rounds(x))).median())
        whole, _ = model(x, halt_threshold=0.5)
        cache = KVCache(64)
        steps = torch.cat([decode_adaptive(model, x[:, t:t + 1], cache, 0.5)[0] for t in range(40)], 1)
    assert (whole - steps).abs().max().item() < 1e-3


def test_bf16_training_step_learns():
    torch.manual_seed(0)
    model = TRM(tiny()).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    x = torch.randint(0, 512, (8, 64), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def _trainer(tmp_path, *extra, launcher=()):
    from tests.trainer_run import TINY, make_corpus
    corpus = make_corpus(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [*launcher, os.path.join(root, "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"],
           corpus["train_1"], "--valid_paths", corpus["validation_0"], "--log_every", "5", "--eval_every", "20",
           "--dropout", "0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode,extra", [("on", ()), ("graphs", ()), ("on", ("--act_weight", "0.1")),
                                        ("graphs", ("--tie_embeddings", "--optimizer", "muon", "--qk_norm")),
                                        ("graphs", ("--arch", "gpt", "--n_layers", "3", "--tie_embeddings")),
                                        ("on", ("--prelude_layers", "1", "--coda_layers", "1", "--step_embed",
                                                "--adapter_rank", "2", "--tie_embeddings", "--optimizer", "muon",
                                                "--qk_norm")),
                                        ("whole", ("--tie_embeddings", "--qk_norm", "--adapter_rank", "2"))],
                         ids=["on", "graphs", "on-halting", "graphs-muon", "graphs-gpt", "on-hybrid-adapters",
                              "whole-adapters"])
def test_trainer_runs_compiled_on_cuda(tmp_path, mode, extra):
    r = _trainer(tmp_path, "--save_dir", str(tmp_path / "ck"), "--max_steps", "20", "--compile", mode, *extra,
                 launcher=(sys.executable,))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bf16 autocast" in r.stdout and "tok/s" in r.stdout
    assert (tmp_path / "ck" / "final_step_20.pt").exists()
    # its evaluations ran the EMA's compiled blocks (said in the log): the last one agrees with an eager scoring of the
    # same weights and windows (the trainer's --eval_tokens of TINY), to bf16's rounding
    from tests.trainer_run import TINY
    assert "compile: the evaluation's blocks too" in r.stdout, r.stdout[-3000:]
    with open(tmp_path / "ck" / "metrics.jsonl") as f:
        last = [h for h in map(json.loads, f) if h["kind"] == "eval"][-1]
    eager = subprocess.run([sys.executable, "-m", "trm.evaluate", "--model_path", str(tmp_path / "ck" /
                            "final_step_20.pt"), "--data", str(tmp_path / "validation_0.jsonl.gz"),
                            "--eval_tokens", TINY[TINY.index("--eval_tokens") + 1]], capture_output=True, text=True)
    assert eager.returncode == 0, eager.stderr
    score = json.loads(eager.stdout.splitlines()[-1])
    assert score["tokens"] == last["tokens"] and abs(score["loss"] - last["loss"]) < 5e-3 * last["loss"], (score, last)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_whole_step_replays_equal_eager_steps_on_cuda(optimizer):
    # --compile whole: three eager warm-up steps, the capture (run by its first replay), then replays, against the
    # loop's own steps; fp32 and uncompiled, so the graph is the only difference. Muon's Newton-Schulz runs in fp32
    # here: in its bf16 (the GPU default) the two sides' fp32 rounding, an ulp apart, can flip the odd bf16 rounding,
    # a 0.4% step that says nothing of the graph (likely what an H100 showed on 2026-12-05: 19 of 2,048, 1.4e-4 at most;
    # in fp32 both cases passed on an H100 on 2026-12-06)
    from test_whole_step import loop_step, setup
    from trm.whole_step import WARMUP, WholeStep

    a, opt_a, ema_a = setup(device="cuda", optimizer=optimizer, ns_dtype=torch.float32)
    b, opt_b, ema_b = setup(device="cuda", optimizer=optimizer, ns_dtype=torch.float32)
    sum_a, sum_b = torch.zeros((), device="cuda"), torch.zeros((), device="cuda")
    bad = torch.zeros((), device="cuda", dtype=torch.bool)
    whole = WholeStep(b, b, opt_b, ema_b, 1.0, None, sum_b, bad, {})
    x = torch.randint(0, 64, (WARMUP + 5, 4, 17), device="cuda")  # setup's vocabulary and window
    for i in range(len(x)):
        lr = 3e-3 * (i + 1) / len(x)
        loop_step(a, opt_a, ema_a, x[i, :, :-1], x[i, :, 1:], lr, 1.0, sum_a)
        whole.step(x[i, :, :-1], x[i, :, 1:], lr, {})
    assert whole.graph is not None  # the last steps were replays
    for pa, pb in zip(list(a.parameters()) + list(ema_a.model.parameters()),
                      list(b.parameters()) + list(ema_b.model.parameters())):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)  # TF32 matmuls, the same in both
    torch.testing.assert_close(sum_a, sum_b, rtol=1e-5, atol=1e-5)
    assert not bad


def test_step_profile_captures_the_whole_step_with_muon():
    # bench/step_profile.py --whole_graph took AdamW only; the races' recipe is Muon under --compile whole, which the
    # trainer captures with Muon's wide shapes apart: the bench now does the same, for the equal-compute pair's profile
    tiny_flags = ["--d_model", "64", "--n_heads", "4", "--vocab_size", "512", "--max_seq_len", "64", "--steps", "3",
                  "--latent_steps", "1", "--deep_steps", "1", "--supervision_steps", "1", "--grad_deep_steps", "0",
                  "--dropout", "0"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "step_profile.py"), "--device", "cuda",
                        "--compile", "on", "--whole_graph", "--optimizer", "muon", "--muon_ns_steps", "3", *tiny_flags],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "muon (3 Newton-Schulz iterations), --compile whole" in r.stdout and "replay" in r.stdout, r.stdout


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_whole_step_replays_draw_new_dropout_masks(dropout):
    # a graph replays its kernels as captured: dropout must still draw a new mask each replay (CUDA's generator hands
    # a captured graph a fresh offset per replay; Inductor's seeds must come from it), or every replay of a batch
    # would drop the same units. At rate 0 the weights stay put, so one batch's loss moves with the mask alone
    from trm.ema import EMA
    from trm.optim import BETAS
    from trm.whole_step import WARMUP, WholeStep
    torch.manual_seed(0)
    raw = TRM(tiny(dropout=dropout)).cuda()
    opt = torch.optim.AdamW(raw.parameters(), lr=0.0, betas=BETAS, fused=True)
    loss_sum, bad = torch.zeros((), device="cuda"), torch.zeros((), device="cuda", dtype=torch.bool)
    whole = WholeStep(torch.compile(raw), raw, opt, EMA(raw, 0.99), 1.0, torch.bfloat16, loss_sum, bad, {})
    x = torch.randint(0, 512, (4, 65), device="cuda")
    losses = []
    for _ in range(WARMUP + 4):
        loss_sum.zero_()  # (in place: the graph adds into this tensor)
        whole.step(x[:, :-1], x[:, 1:], 0.0, {})
        losses.append(loss_sum.item())
    assert whole.graph is not None and not bad
    replays = losses[WARMUP + 1:]  # (the step at WARMUP is the capture's own run)
    if dropout:
        assert len(set(replays)) == len(replays), losses
    else:  # the control: with nothing random, every replay gives one loss, so the test above measures the masks
        assert len(set(replays)) == 1, losses


@pytest.mark.parametrize("extra,tolerance", [((), 0.02), (("--depth_warmup", "0.5"), 0.02),
                                             (("--dropout", "0.1"), 0.15),
                                             (("--optimizer", "muon", "--d_model", "512", "--n_heads", "8"), 0.02),
                                             (("--optimizer", "muon", "--d_model", "512", "--n_heads", "8",
                                               "--prelude_layers", "1", "--coda_layers", "1"), 0.02),
                                             (("--act_weight", "0.1"), 0.02),
                                             (("--lr_schedule", "wsd", "--lr_cooldown", "0.5"), 0.02)],
                         ids=["plain", "depth-warmup", "dropout", "muon", "muon-hybrid", "halting-head", "wsd"])
def test_compile_whole_trains_as_compile_on(tmp_path, extra, tolerance):
    # bf16 both; only the optimizer's path differs (a capturable AdamW or Muon on a rate tensor, the graph).
    # --depth_warmup captures a second graph at its depth change; with dropout the two draw their masks differently,
    # hence the looser bound
    from tests.trainer_run import logged_losses
    newton_schulz = {}  # Muon's MFLOP a token, from the optimizer's log line
    for mode in ("on", "whole"):
        r = _trainer(tmp_path, "--save_dir", str(tmp_path / mode), "--compile", mode, "--max_steps", "20",
                     "--eval_every", "10", "--log_every", "5", *extra, launcher=(sys.executable,))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert mode != "whole" or ("--compile whole: the step" in r.stdout and "capturable" not in r.stderr), r.stderr
        newton_schulz[mode] = re.findall(r"([\d.]+) MFLOP a token at", r.stdout)
    if "muon" in extra:  # at d_model 512, uncaptured, one padded stack; in the graph, a stack per shape: fewer FLOPs
        assert float(newton_schulz["whole"][0]) < float(newton_schulz["on"][0]), newton_schulz
    on, whole = logged_losses(tmp_path / "on"), logged_losses(tmp_path / "whole")
    assert [k[:2] for k in on] == [k[:2] for k in whole] and len(on) >= 6
    assert all(abs(a[2] - b[2]) < tolerance for a, b in zip(on, whole)), (on, whole)


def test_compile_whole_resumes_as_uninterrupted(tmp_path):
    # the resumed run's first steps are eager warm-ups where the straight run replays its graph. Not bit for bit:
    # Inductor's embedding backward adds with atomics on CUDA, so two compiled runs differ in the last bits anyway
    from tests.trainer_run import copy_run_until, logged_losses, params
    common = ("--compile", "whole", "--max_steps", "20", "--eval_every", "10", "--log_every", "5")
    r = _trainer(tmp_path, "--save_dir", str(tmp_path / "straight"), *common, launcher=(sys.executable,))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    copy_run_until(tmp_path / "straight", tmp_path / "resumed", 10)
    r = _trainer(tmp_path, "--save_dir", str(tmp_path / "resumed"), *common, "--resume", "auto",
                 launcher=(sys.executable,))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for a, b in zip(logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "resumed")):
        assert a[:2] == b[:2] and abs(a[2] - b[2]) < 1e-4, (a, b)
    for key in ("model", "ema"):
        a, b = (params(tmp_path / run / "final_step_20.pt", key) for run in ("straight", "resumed"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_gpus_match_one_gpu(tmp_path):
    from trm.checkpoint import load_checkpoint
    one = _trainer(tmp_path, "--save_dir", str(tmp_path / "one"), "--max_steps", "10", "--batch_size", "4",
                   "--dtype", "fp32", "--compile", "off", launcher=(sys.executable,))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _trainer(tmp_path, "--save_dir", str(tmp_path / "two"), "--max_steps", "10", "--batch_size", "2",
                   "--dtype", "fp32", "--compile", "off",
                   launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29555"))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "final_step_10.pt")["model"]
    b = load_checkpoint(tmp_path / "two" / "final_step_10.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3)  # TF32 and reduction order differ


@pytest.mark.parametrize("rule", ["mean", "each"])
def test_both_update_rules_train_in_bf16_on_cuda(tmp_path, rule):
    # --sup_update each steps the optimizer between rounds, outside the mean rule's forward: it once ran in fp32 here
    from conftest import training_dtypes
    from tests.trainer_run import ROOT, TINY, make_corpus
    corpus = make_corpus(tmp_path)
    dtypes, r = training_dtypes(ROOT / "train_trm_lm.py", [
        *TINY, "--train_paths", corpus["train_0"], "--valid_paths", "--max_steps", "2", "--log_every", "1",
        "--sup_update", rule, "--device", "cuda", "--compile", "off", "--save_dir", tmp_path / "ck"], tmp_path)
    assert "bf16 autocast" in r.stdout and dtypes == {"bfloat16"}, (dtypes, r.stdout)
