"""The optimizer: AdamW for every weight (the default), or Muon for the hidden matrices with AdamW for the rest.

Muon (trm/muon.py) replaces each update of a hidden weight matrix by its nearest semi-orthogonal matrix (a few
Newton-Schulz iterations on the momentum), so every direction of the matrix moves at the same rate. It is meant for
the matrices inside the blocks (attention qkv/proj, the MLP); the embedding, the output head, the halting head and
every vector stay with AdamW, as in the Muon paper and the Parameter Golf records. So do the per-call adapters
(--adapter_rank): each [calls, in, rank] stack holds several rank-r factors, which Muon's orthogonalisation of one
matrix would mix.

One --lr for both: Muon scales its step per matrix with Moonshot's rule (0.2 * sqrt(max(rows, cols))), which gives its
updates the RMS of a typical AdamW update at the same learning rate ("Muon is Scalable for LLM Training",
arXiv 2502.16982), so a learning rate (and weight decay, which Muon applies like AdamW's, lr * wd) tuned for AdamW is a
sensible start for Muon. Keller Jordan's "original" rule would need a learning rate of its own, 0.2 * sqrt(d_model)
times AdamW's for a square matrix (3.2x at d_model 256), and a second flag. Both optimizers follow the trainer's one
schedule.
"""
import math

import torch
from torch import nn

from trm.muon import Muon

BETAS = (0.9, 0.95)


def hidden_matrices(model):
    """The weights of the linear layers inside the network: every nn.Linear except the output and halting heads
    (the output head may be the embedding itself, when tied)."""
    heads = {id(model.embed.weight), id(model.lm_head.weight)}
    if model.halt is not None:
        heads |= {id(p) for p in model.halt.parameters()}
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in heads]


def adamw(params, args, device):
    decay = [p for p in params if p.dim() >= 2]  # matrices; gains and biases none here, but stay safe
    no_decay = [p for p in params if p.dim() < 2]
    return keep_settings(torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=args.lr, betas=BETAS, fused=device.type == "cuda"))


def keep_settings(optimizer):
    """The optimizer, its groups keeping the settings this command built them with when a checkpoint's state is
    loaded. torch's load_state_dict takes every setting of the saved groups: a resume with another --weight_decay
    trained on at the old one (while its checkpoints' args recorded the new one; --muon_ns_steps alike), and a CPU
    checkpoint resumed on CUDA ran AdamW unfused (its step counters left on the host). The saved groups are corrected
    before torch reads them, so the state is also placed for the kernel this machine runs. --lr is the command line's
    as well (the schedule sets it every step)."""
    built = [{k: group[k] for k in ("weight_decay", "fused", "foreach", "capturable", "ns_steps") if k in group}
             for group in optimizer.param_groups]

    def correct(opt, state_dict):
        state_dict = dict(state_dict, param_groups=[dict(saved, **mine)
                                                    for saved, mine in zip(state_dict["param_groups"], built)])
        return state_dict

    optimizer.register_load_state_dict_pre_hook(correct)
    return optimizer


def build_optimizer(model, args, device):
    """torch.optim.AdamW for --optimizer adamw (exactly as before the flag existed, checkpoints included), or a
    MuonAdamW that steps Muon and AdamW as one optimizer for --optimizer muon."""
    if args.optimizer == "adamw":
        return adamw(list(model.parameters()), args, device)
    hidden = hidden_matrices(model)
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    muon = keep_settings(Muon(hidden, lr=args.lr, weight_decay=args.weight_decay, momentum=0.95, nesterov=True,
                              ns_steps=args.muon_ns_steps, ns_coefficients=args.muon_ns_coefficients))
    return MuonAdamW(muon, adamw(rest, args, device))


class MuonAdamW:
    """Two optimizers that the trainer steps, clears, schedules and saves as one. param_groups lists both, so the
    schedule's `group["lr"] = lr` drives both at one learning rate (Muon's per-matrix scaling happens inside it)."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def clip_and_step(params, optimizer, grad_clip, loss, bad):
    """Clip the gradients (grad_clip 0: no clipping), note a non-finite loss or gradient in the device flag `bad` (no
    host sync: the trainer reads it on log steps), and step: the training loop's and --compile whole's graph's own."""
    # (foreach left to torch: its fused kernels on CUDA, captured there as any other; MPS has none, and would refuse)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    bad.logical_or_(~torch.isfinite(loss.detach()) | ~torch.isfinite(norm))
    optimizer.step()


def checkpoint_optimizer(ckpt):
    """The --optimizer a checkpoint was trained with (checkpoints from before the flag: adamw)."""
    return (ckpt.get("args") or {}).get("optimizer", "adamw")


def resume_problem(ckpt, optimizer):
    """A one-line reason why a checkpoint cannot continue with this --optimizer, or None."""
    trained = checkpoint_optimizer(ckpt)
    if trained == optimizer:
        return None
    return (f"the checkpoint was trained with --optimizer {trained}, and its optimizer state cannot continue as "
            f"--optimizer {optimizer}: resume with --optimizer {trained}, or start a new run with --optimizer "
            f"{optimizer} (--overwrite, or another --save_dir)")


def describe(optimizer, tokens_per_step=None, model_flops_per_token=None):
    """One line for the log: which optimizer steps how many weights; for Muon, what its Newton-Schulz costs a token at
    tokens_per_step (one process's tokens an optimizer step) against the model's training FLOPs a token."""
    if not isinstance(optimizer, MuonAdamW):
        return "AdamW"
    count = lambda opt: sum(p.numel() for g in opt.param_groups for p in g["params"])  # noqa: E731
    n_muon = sum(len(g["params"]) for g in optimizer.muon.param_groups)
    ns_steps = optimizer.muon.param_groups[0]["ns_steps"]
    polynomials = "" if optimizer.muon.ns_coefficients == "jordan" else " (Polar Express)"
    cost = ""
    if tokens_per_step:  # a fixed cost a step: more tokens a step (--batch_size, --grad_accum) spread it
        per_token = optimizer.muon.flops_per_step() / tokens_per_step
        share = f", {per_token / model_flops_per_token:.0%} of the model's" if model_flops_per_token else ""
        cost = f": {per_token / 1e6:.1f} MFLOP a token at {tokens_per_step:,} tokens a step{share}"
    return (f"Muon for {n_muon} hidden matrices ({count(optimizer.muon):,} parameters; {ns_steps} Newton-Schulz "
            f"iterations{polynomials} a step{cost}), AdamW for the embedding, heads, vectors and adapters "
            f"({count(optimizer.adamw):,})")
