"""Where the time of one training step goes: forward, backward, optimizer, EMA; and the top operators.

    python bench/step_profile.py                              # seed architecture, batch 4 x 512, this CPU
    python bench/step_profile.py --batch_size 64 --device cuda

Random tokens (speed does not depend on them). Prints a table of phase times (median of --steps) and the
torch.profiler operator summary of one step.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.device import autocast, pick_device  # noqa: E402
from trm.ema import EMA  # noqa: E402
from trm.model import TRM, TRMConfig  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--device", default="auto")
p.add_argument("--batch_size", type=int, default=4)
p.add_argument("--max_seq_len", type=int, default=512)
p.add_argument("--d_model", type=int, default=256)
p.add_argument("--n_heads", type=int, default=4)
p.add_argument("--n_layers", type=int, default=2)
p.add_argument("--vocab_size", type=int, default=16000)
p.add_argument("--arch", default="trm")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--threads", type=int, default=0)
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

device, amp, why = pick_device(args.device)
cfg = TRMConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                max_seq_len=args.max_seq_len, arch=args.arch)
model = TRM(cfg).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
ema = EMA(model, 0.995)
x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.max_seq_len), device=device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(times):
    t0 = time.perf_counter()
    with autocast(device, amp):
        _, loss = model(x, x)
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t3 = time.perf_counter()
    ema.update(model)
    sync()
    t4 = time.perf_counter()
    for k, v in zip(("forward", "backward", "optimizer", "ema"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        times.setdefault(k, []).append(v)


step({})  # warm-up
times = {}
for _ in range(args.steps):
    step(times)
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
total = sum(med.values())
tokens = args.batch_size * args.max_seq_len
print(f"# {device} ({why}), torch {torch.__version__}, threads {torch.get_num_threads()}; {cfg.arch} d_model "
      f"{cfg.d_model} n_layers {cfg.n_layers} vocab {cfg.vocab_size}, batch {args.batch_size} x {args.max_seq_len}, "
      f"{model.flops_per_token(args.max_seq_len) / 1e6:.1f} MFLOP/token")
print(f"{'phase':<10} {'ms':>9} {'share':>7}")
for k, v in med.items():
    print(f"{k:<10} {1000 * v:>9.1f} {100 * v / total:>6.1f}%")
print(f"{'step':<10} {1000 * total:>9.1f}  -> {tokens / total:,.0f} tokens/s, "
      f"{model.flops_per_token(args.max_seq_len) * tokens / total / 1e9:.1f} GFLOP/s")

with torch.profiler.profile() as prof:
    step({})
print(prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                row_limit=12))
