"""trm/whole_step.py (--compile whole): the step the graph holds equals the trainer's loop step, its checkpoints are
plain ones, and the flags it cannot take are refused in one line. The capture itself needs a GPU: tests/test_gpu.py."""
import copy
from argparse import Namespace

import pytest
import torch

from trainer_run import train
from trm.ema import EMA
from trm.flags import choose_compile
from trm.model import TRM, TRMConfig
from trm.muon import Muon
from trm.optim import BETAS, MuonAdamW, hidden_matrices
from trm.step import EagerStep
from trm.whole_step import WholeStep

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(seed=0, device="cpu", optimizer="adamw", ns_dtype=None):
    torch.manual_seed(seed)
    model = TRM(TRMConfig(vocab_size=64, d_model=32, n_heads=2, max_seq_len=16, dropout=0.0)).to(device)
    hidden = {id(p) for p in hidden_matrices(model)} if optimizer == "muon" else set()
    rest = [p for p in model.parameters() if id(p) not in hidden]

    def adamw(params):  # the trainer's AdamW on CUDA is fused; so is this one, on the CPU
        return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=1e-3, betas=BETAS, fused=True)
    if optimizer == "adamw":
        return model, adamw(rest), EMA(model, 0.99)
    # --optimizer muon: trm.optim.build_optimizer's pair
    muon = Muon([p for p in model.parameters() if id(p) in hidden], lr=1e-3, weight_decay=0.1, ns_dtype=ns_dtype)
    return model, MuonAdamW(muon, adamw(rest)), EMA(model, 0.99)


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 17), generator=g) for _ in range(n)]


def loop_step(model, opt, ema, x, targets, lr, clip, loss_sum, bad=None):
    """What train_trm_lm.py's loop does for one step without --compile whole: trm/step.py's EagerStep."""
    args = Namespace(grad_accum=1, grad_clip=clip, sup_update="mean")
    bad = torch.zeros((), dtype=torch.bool) if bad is None else bad
    return EagerStep(model, model, opt, ema, args, None, loss_sum, bad, {}, cuda_graphs=False).step(
        lambda: (x, targets), lr, {})


@pytest.mark.parametrize("clip,optimizer", [(1.0, "adamw"), (0.0, "adamw"), (1.0, "muon")])
def test_the_whole_step_equals_the_loops_step(clip, optimizer):
    a, opt_a, ema_a = setup(optimizer=optimizer)
    b, opt_b, ema_b = setup(optimizer=optimizer)
    sum_a, sum_b, bad = torch.zeros(()), torch.zeros(()), torch.zeros((), dtype=torch.bool)
    whole = WholeStep(b, b, opt_b, ema_b, clip, None, sum_b, bad, {})
    for i, batch in enumerate(batches(6)):
        lr = 3e-3 * (i + 1) / 6  # a rate that changes every step, as the schedule's
        assert loop_step(a, opt_a, ema_a, batch[:, :-1], batch[:, 1:], lr, clip, sum_a, bad) == 1
        whole.step(batch[:, :-1], batch[:, 1:], lr, {})
    # capturable AdamW with a tensor rate rounds its weight decay differently from the float-rate kernel: an ulp
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(ema_a.model.parameters(), ema_b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(a.parameters()), next(setup()[0].parameters()))  # the steps did move the weights
    assert ema_a.updates == ema_b.updates == 6
    torch.testing.assert_close(sum_a, sum_b)
    assert not bad


def test_a_non_finite_loss_is_flagged_on_the_device():
    model, opt, ema = setup()
    bad = torch.zeros((), dtype=torch.bool)
    whole = WholeStep(model, model, opt, ema, 1.0, None, torch.zeros(()), bad, {})
    x = batches(1)[0]
    whole.step(x[:, :-1], x[:, 1:], 1e-3, {})
    assert not bad
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    whole.step(x[:, :-1], x[:, 1:], 1e-3, {})
    assert bad


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_its_checkpoint_is_a_plain_one_and_resumes_the_loop_exactly(optimizer):
    model, opt, ema = setup(optimizer=optimizer)
    whole = WholeStep(model, model, opt, ema, 1.0, None, torch.zeros(()), torch.zeros((), dtype=torch.bool), {})
    steps = batches(4)
    for x in steps[:2]:
        whole.step(x[:, :-1], x[:, 1:], 2e-3, {})
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint holds it: not the live moments
    groups = [g for part in (state.values() if optimizer == "muon" else [state]) for g in part["param_groups"]]
    # (the rate as the fp32 device tensor held it: the schedule sets it again at every step of a resumed run)
    assert {type(g["lr"]) for g in groups} == {float} and len(groups) == len(opt.param_groups)
    assert groups[0]["lr"] == pytest.approx(2e-3, rel=1e-7)
    assert not any(g.get("capturable") for g in groups)
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)  # the live ones keep the tensor
    # a run without --compile whole continues from it as from its own checkpoint
    fresh, fresh_opt, fresh_ema = setup(seed=5, optimizer=optimizer)
    fresh.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(state)
    fresh_ema.load_state_dict(ema.state_dict())
    for x in steps[2:]:  # the loop from the checkpoint, against the whole-step run continued
        loop_step(fresh, fresh_opt, fresh_ema, x[:, :-1], x[:, 1:], 2e-3, 1.0, torch.zeros(()))
        whole.step(x[:, :-1], x[:, 1:], 2e-3, {})
    for pa, pb in zip(fresh.parameters(), model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(fresh_ema.model.parameters(), ema.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert fresh_ema.updates == ema.updates == 4


def test_it_continues_a_plain_checkpoint_as_the_loop_does():
    # a run started without --compile whole, resumed with it: the loaded optimizer state is made capturable
    model, opt, ema = setup()
    steps = batches(4)
    for x in steps[:2]:
        loop_step(model, opt, ema, x[:, :-1], x[:, 1:], 2e-3, 1.0, torch.zeros(()))
    resumed, resumed_opt, resumed_ema = setup(seed=5)
    resumed.load_state_dict(model.state_dict())
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed_ema.load_state_dict(copy.deepcopy(ema.state_dict()))
    whole = WholeStep(resumed, resumed, resumed_opt, resumed_ema, 1.0, None, torch.zeros(()),
                      torch.zeros((), dtype=torch.bool), {})
    for x in steps[2:]:
        loop_step(model, opt, ema, x[:, :-1], x[:, 1:], 2e-3, 1.0, torch.zeros(()))
        whole.step(x[:, :-1], x[:, 1:], 2e-3, {})
    assert all(s["step"].item() == 4 for s in resumed_opt.state.values())  # the moments went on, not restarted
    for pa, pb in zip(list(model.parameters()) + list(ema.model.parameters()),
                      list(resumed.parameters()) + list(resumed_ema.model.parameters())):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_the_ema_moves_alike_with_a_number_or_a_device_tensor():
    model, _, ema = setup()
    other = copy.deepcopy(ema)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for decay in (2 / 11, 0.5, 0.99):
        ema.lerp(model, 1.0 - decay)
        other.lerp(model, torch.tensor(1.0 - decay))
    assert all(torch.equal(p, q) for p, q in zip(ema.model.parameters(), other.model.parameters()))


def test_auto_takes_the_whole_graph_with_either_optimizer_in_one_process():
    # (Muon joined once its replay test passed on an H100, 2026-12-06)
    from trm.whole_step import refusal
    for optimizer in ("adamw", "muon"):
        args = Namespace(optimizer=optimizer, grad_accum=1, random_depth=None)
        assert choose_compile("auto", "cuda", 4 * 512, None, refusal(args, 1))[0] == "whole"
        assert choose_compile("auto", "cuda", 4 * 512, None, refusal(args, 2))[0] == "graphs"
        args.grad_accum = 2
        assert choose_compile("auto", "cuda", 4 * 512, None, refusal(args, 1))[0] == "graphs"


def test_compile_whole_is_chosen_on_cuda_only():
    assert choose_compile("whole", "cuda", 4 * 512)[0] == "whole"  # compiled; the graph is whole_step's own
    assert choose_compile("whole", "cpu", 4 * 512)[0] == "off"
    assert choose_compile("whole", "cuda", 4 * 512, "--sup_update each steps inside")[0] == "off"


@pytest.mark.parametrize("flags,words", [(("--grad_accum", "2"), "--grad_accum 1"),
                                         (("--random_depth", "deep"), "--random_depth"),
                                         (("--sup_update", "each"), "--sup_update each"),
                                         (("--act_weight", "0.1", "--train_halt_threshold", "0.5"),
                                          "--train_halt_threshold")])
def test_flags_it_cannot_take_are_refused_in_one_line(corpus, tmp_path, flags, words):
    r = train(corpus, tmp_path / "ck", "--max_steps", "2", "--compile", "whole", *flags, check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "--compile whole" in errors[0] and words in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "ck").exists()


def test_on_a_cpu_it_says_so_and_trains_uncompiled(corpus, tmp_path):
    r = train(corpus, tmp_path / "ck", "--max_steps", "2", "--compile", "whole")
    assert "--compile whole: no CUDA graphs on cpu, so not compiled" in r.stdout
    assert (tmp_path / "ck" / "final_step_2.pt").exists()
