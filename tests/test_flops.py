"""The FLOPs per token that the trainer's MFU divides by (trm/model.py flops_per_token) are the matmuls torch
executes in a step's forward and backward, under either update rule."""
import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tiny_model import tiny, tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

T = 16


def measured_flops_per_token(model, rule):
    """FLOPs per token of one training step's matmuls, as torch's own counter sees them. The math attention kernel
    computes the full T x T score square as bmm, which the counter sees (the fused CPU kernel it does not)."""
    idx, targets = tokens(2, T), tokens(2, T, seed=2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if rule == "mean":
            model(idx, targets)[1].backward()
        else:  # the paper's rule: each round's loss backpropagated before the next round runs
            for loss in model.supervision_rounds(idx, targets):
                loss.backward()
    return counter.get_total_flops() / idx.numel()


CASES = {
    "seed": dict(),
    "gpt": dict(arch="gpt"),
    "every_deep_step": dict(grad_deep_steps=0, deep_steps=3),
    "hybrid": dict(prelude_layers=2, coda_layers=1, supervision_steps=3),
    "single_stream": dict(single_stream=True, latent_steps=3),
}


@pytest.mark.parametrize("rule", ["mean", "each"])
@pytest.mark.parametrize("variant", CASES.values(), ids=CASES.keys())
def test_flops_per_token_are_the_matmuls_a_training_step_runs(variant, rule):
    # the each rule embeds again every round (supervision_rounds' reembed), so a prelude runs N_sup times, not once
    model = tiny(max_seq_len=T, **variant).train()
    assert measured_flops_per_token(model, rule) == model.flops_per_token(T, reembed=rule == "each")
