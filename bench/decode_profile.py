"""Where a decoding step's time goes on a GPU: kernels per token, their time, the gaps between them, the launch floor.

    python bench/decode_profile.py                          # seed size, batch 1, 256-token prompt, CUDA graphs
    python bench/decode_profile.py --d_model 512 --n_heads 8 --no_graph

Decodes greedily from a random-weight model (speed does not depend on the weights) through trm.sampling's own loop,
profiles --tokens decoding steps after a warm-up, and prints per token: wall time (timed without the profiler, whose
own cost would count as idle; the profiled wall is printed apart), CUDA kernels, the sum of their durations (busy,
from one profiled run) and wall minus busy (idle: launch and host gaps). The launch floor is kernels x the shortest
kernel seen: what the step would cost if every kernel were as cheap as the cheapest one, the limit of fusing nothing
and only removing gaps. Then the ten kernels that take the most time.
"""
import argparse
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.model import TRM, TRMConfig  # noqa: E402
from trm.sampling import generate_batch  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--d_model", type=int, default=256)
p.add_argument("--n_heads", type=int, default=4)
p.add_argument("--vocab_size", type=int, default=16000)
p.add_argument("--prompt_len", type=int, default=256)
p.add_argument("--tokens", type=int, default=64, help="decoding steps profiled (after as many unprofiled)")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--no_graph", action="store_true", help="eager decoding steps instead of CUDA-graph replays")
p.add_argument("--compile", action="store_true", help="torch.compile the decoding step before capturing it")
p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the weights' and states' type")
args = p.parse_args()
if not torch.cuda.is_available():
    sys.exit("error: this profile needs a CUDA GPU")

torch.manual_seed(0)
model = TRM(TRMConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads)).cuda().eval()
if args.dtype == "bf16":
    model = model.to(torch.bfloat16)
prompts = torch.randint(4, args.vocab_size, (args.batch, args.prompt_len)).tolist()


def decode(n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in generate_batch(model, prompts, n, temperature=0, cuda_graph=not args.no_graph, compile=args.compile):
        pass
    torch.cuda.synchronize()
    return time.perf_counter() - t0


decode(2 * args.tokens)  # warm-up: allocator, cuBLAS handles, the graph's first capture
# Wall time without the profiler: CUPTI's own cost per kernel went into "wall" and "idle" when they were read inside
# the profile (the compiled bf16 step: 1.60 ms a token profiled against 0.70 ms in generate_speed.py, so the 0.98 ms
# "idle" was mostly the profiler's, BENCHMARKS.md). Each decode captures its graph in its prefill: the difference of a
# run of tokens + 1 steps and a run of one step is the decoding steps alone.
prefill = decode(1)  # one step: the prefill (and the capture) and the first token
per_token = (decode(args.tokens + 1) - prefill) / args.tokens
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    profiled = decode(args.tokens + 1)

kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
           and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
busy_us = sum(e.device_time for e in kernels)
# the profile also holds the prefill; its kernels are counted apart by comparing with a one-step profile
with profile(activities=[ProfilerActivity.CUDA]) as prof1:
    profiled_prefill = decode(1)
k1 = [e for e in prof1.events() if e.device_type == torch.autograd.DeviceType.CUDA
      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
busy1_us = sum(e.device_time for e in k1)
n_per_token = (len(kernels) - len(k1)) / args.tokens
busy_per_token = (busy_us - busy1_us) / args.tokens / 1e6
shortest = min(e.device_time for e in kernels) / 1e6

print(f"model d_model {args.d_model}, {model.net_calls()} net calls x {model.config.n_layers} blocks per token, "
      f"batch {args.batch}, prompt {args.prompt_len}, {'eager' if args.no_graph else 'CUDA graph'} steps, "
      f"{args.dtype}{', compiled' if args.compile else ''}; wall without the profiler (under it: "
      f"{(profiled - profiled_prefill) / args.tokens * 1e3:.3f} ms a token)")
print("| per token | wall | kernels | busy (kernel time) | idle (wall - busy) | shortest kernel | launch floor "
      "(kernels x shortest) | tokens/s |")
print("|---|---|---|---|---|---|---|---|")
print(f"| | {per_token * 1e3:.3f} ms | {n_per_token:.0f} | {busy_per_token * 1e3:.3f} ms | "
      f"{(per_token - busy_per_token) * 1e3:.3f} ms | {shortest * 1e6:.1f} us | "
      f"{n_per_token * shortest * 1e3:.3f} ms | {args.batch / per_token:,.0f} |")

by_name = defaultdict(lambda: [0, 0.0])
for e in kernels:
    by_name[e.name][0] += 1
    by_name[e.name][1] += e.device_time
print("\n| kernel (whole profile) | calls per token | us per call | share of busy |")
print("|---|---|---|---|")
for name, (calls, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:10]:
    print(f"| {name[:90]} | {calls / (args.tokens + 1):.1f} | {us / calls:.1f} | {100 * us / busy_us:.1f}% |")
