"""trm/step.py, the trainer's step without --compile whole: --grad_accum is one step on all its micro-batches, and
--sup_update each steps the optimizer once a supervision round."""
from argparse import Namespace

import pytest
import torch

from trm.model import TRM, TRMConfig
from trm.step import EagerStep

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(supervision_steps=2, sgd=False):
    """A tiny TRM and its optimizer; SGD's step, unlike Adam's, scales with the gradient: a wrong mean shows."""
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=64, d_model=32, n_heads=2, max_seq_len=16, dropout=0.0,
                          supervision_steps=supervision_steps))
    return model, (torch.optim.SGD if sgd else torch.optim.AdamW)(model.parameters(), lr=0.1 if sgd else 1e-3)


def stepper(model, opt, loss_sum, rule="mean", grad_accum=1):
    args = Namespace(grad_accum=grad_accum, grad_clip=0.0, sup_update=rule)  # (no clipping: it would hide a scale)
    return EagerStep(model, model, opt, None, args, None, loss_sum, torch.zeros((), dtype=torch.bool), {},
                     cuda_graphs=False)


def batch(rows=4):
    x = torch.randint(0, 64, (rows, 17), generator=torch.Generator().manual_seed(1))
    return x[:, :-1], x[:, 1:]


def test_grad_accum_is_one_step_on_all_its_micro_batches():
    (a, opt_a), (b, opt_b) = setup(sgd=True), setup(sgd=True)
    sum_a, sum_b = torch.zeros(()), torch.zeros(())
    x, targets = batch()
    assert stepper(a, opt_a, sum_a).step(lambda: (x, targets), 1e-3, {}) == 1
    halves = iter([(x[:2], targets[:2]), (x[2:], targets[2:])])
    assert stepper(b, opt_b, sum_b, grad_accum=2).step(lambda: next(halves), 1e-3, {}) == 2
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum_a, sum_b / 2)  # the same mean loss, from two losses added
    assert not torch.equal(next(a.parameters()), next(setup()[0].parameters()))  # the step did move the weights


def test_each_round_takes_an_optimizer_step():
    model, opt = setup(supervision_steps=3)
    loss_sum = torch.zeros(())
    assert stepper(model, opt, loss_sum, rule="each").step(lambda: batch(), 1e-3, {}) == 1
    assert all(s["step"].item() == 3 for s in opt.state.values())
    assert loss_sum.item() > 0


def test_with_one_round_both_rules_are_the_same_step():
    (a, opt_a), (b, opt_b) = setup(supervision_steps=1, sgd=True), setup(supervision_steps=1, sgd=True)
    sum_a, sum_b = torch.zeros(()), torch.zeros(())
    for _ in range(3):
        stepper(a, opt_a, sum_a).step(lambda: batch(), 1e-3, {})
        stepper(b, opt_b, sum_b, rule="each").step(lambda: batch(), 1e-3, {})
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum_a, sum_b)
