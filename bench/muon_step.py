"""One Muon step over a model's hidden matrices: torch.optim.Muon (a matrix at a time) against trm/muon.py (a shape at
a time), and AdamW for scale.

    python bench/muon_step.py                                  # this CPU, the 12-layer GPT of the races
    python bench/muon_step.py --device cuda --arch trm --d_model 384 --n_heads 6 --n_layers 2

Prints milliseconds per optimizer step (median of --steps, after warm-up) for each optimizer and, on CUDA, the kernels
one step launches. Random gradients: the time does not depend on them.

trm.muon.Muon is timed both ways: a stack per shape (four Newton-Schulz calls, its choice on a CPU) and one padded
stack (one call, its choice on a GPU). --compiled adds both compiled as the trainer does under --compile
(Muon.compile(): default mode, the rate a device tensor); the warm-up steps compile. On CUDA it also adds both
compiled and captured by hand in one CUDA graph, as --compile whole captures the trainer's step: there the launches
cost next to nothing and the padding's extra FLOPs may decide (the Newton-Schulz GFLOP column). Inductor's own
CUDA graphs ("reduce-overhead") were tried on an H200 and dropped: it skips them for a step that mutates its inputs,
and the process then crashed (BENCHMARKS.md).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.model import TRM, TRMConfig  # noqa: E402
from trm.muon import Muon  # noqa: E402
from trm.optim import hidden_matrices  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default="cpu")
p.add_argument("--arch", choices=("trm", "gpt"), default="gpt")
p.add_argument("--d_model", type=int, default=256)
p.add_argument("--n_heads", type=int, default=4)
p.add_argument("--n_layers", type=int, default=12)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--compiled", action="store_true", help="also time trm.muon.Muon with a compiled step")
args = p.parse_args()

device = torch.device(args.device)
try:
    cfg = TRMConfig(vocab_size=16000, arch=args.arch, d_model=args.d_model, n_heads=args.n_heads,
                    n_layers=args.n_layers)
except ValueError as e:  # (a shape the model refuses: one line, not a traceback)
    sys.exit(f"error: {e}")
model = TRM(cfg).to(device)
weights = hidden_matrices(model)
shapes = sorted({tuple(w.shape) for w in weights})
print(f"# {args.arch} d_model {args.d_model} x {args.n_layers} layers: {len(weights)} hidden matrices in "
      f"{len(shapes)} shapes {shapes}, {sum(w.numel() for w in weights):,} parameters, {device}")

optimizers = {"AdamW (fused on CUDA)": lambda: torch.optim.AdamW(weights, lr=1e-3, fused=device.type == "cuda"),
              "trm.muon.Muon, a stack per shape": lambda: Muon(weights, lr=1e-3, weight_decay=0.1, one_stack=False),
              "trm.muon.Muon, one padded stack": lambda: Muon(weights, lr=1e-3, weight_decay=0.1, one_stack=True)}
if hasattr(torch.optim, "Muon"):
    optimizers["torch.optim.Muon"] = lambda: torch.optim.Muon(weights, lr=1e-3, weight_decay=0.1,
                                                              adjust_lr_fn="match_rms_adamw")


if args.compiled:
    for stacks, one in (("a stack per shape", False), ("one padded stack", True)):
        optimizers[f"trm.muon.Muon, {stacks}, compiled as the trainer does"] = \
            lambda one=one: Muon(weights, lr=1e-3, weight_decay=0.1, one_stack=one).compile()
    if device.type == "cuda":  # as --compile whole runs it: launches replayed by the GPU, the kernels' own time left
        for stacks, one in (("a stack per shape", False), ("one padded stack", True)):
            optimizers[f"trm.muon.Muon, {stacks}, compiled, in a CUDA graph (--compile whole)"] = \
                lambda one=one: graphed(Muon(weights, lr=1e-3, weight_decay=0.1, one_stack=one).compile())


def random_grads():
    """Fresh random gradients, written into the tensors there are (a CUDA graph reads the ones it captured)."""
    for w in weights:
        if w.grad is None:
            w.grad = torch.randn_like(w)
        else:
            w.grad.normal_()


def graphed(opt):
    """opt with its step captured in one CUDA graph after warm-up steps on a side stream (trm/whole_step.py captures
    the trainer's whole step so); step() replays it."""
    random_grads()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    opt.step = graph.replay
    return opt


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(opt):
    """(median ms per step, kernels per step or "-")."""
    random_grads()
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    kernels = "-"
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            sync()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return f"{1e3 * statistics.median(times):.2f}", kernels


print("| optimizer | ms per step | kernels per step | Newton-Schulz GFLOP a step | its TFLOP/s |")
print("|---|---|---|---|---|")
for name, build in optimizers.items():
    flops = rate = "-"
    try:
        opt = build()
        ms, kernels = measure(opt)
        if isinstance(opt, Muon):  # (the products as run: one padded stack computes its zeros too)
            gflop = opt.flops_per_step() / 1e9
            flops, rate = f"{gflop:.1f}", f"{gflop / float(ms):.1f}"
    except Exception as e:  # a compiled variant this torch cannot build: its row says why, the others still run
        ms, kernels = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", "-"
    print(f"| {name} | {ms} | {kernels} | {flops} | {rate} |", flush=True)
