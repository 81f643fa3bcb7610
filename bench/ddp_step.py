"""Where does a DDP training step's time go? One GPU against several, same per-GPU batch, random tokens.

    torchrun --nproc_per_node 1 bench/ddp_step.py --compile on
    torchrun --nproc_per_node 2 bench/ddp_step.py --compile on
    torchrun --nproc_per_node 2 bench/ddp_step.py --compile off --profile

The step is the trainer's (bf16 autocast, seed architecture, fused AdamW, clip, DDP with broadcast_buffers=False,
compiled after wrapping). Rank 0 prints: wall time per step (synchronized only at the end, so the CPU may run
ahead as in training), the CPU time to issue a step (if it is close to the wall time the step is launch-bound),
the time of one all-reduce of the gradients' size, and with --profile the top operators by GPU and by CPU time.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.model import TRM, TRMConfig  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--batch_size", type=int, default=64)
p.add_argument("--seq_len", type=int, default=512)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--compile", default="on", choices=["on", "off"])
p.add_argument("--arch", default="trm")
p.add_argument("--profile", action="store_true")
p.add_argument("--static_graph", action="store_true", help="DDP(static_graph=True)")
args = p.parse_args()

world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("LOCAL_RANK", "0"))
device = torch.device("cuda", rank)
torch.cuda.set_device(device)
if world > 1:
    dist.init_process_group("nccl")
torch.backends.cuda.matmul.allow_tf32 = True
torch.manual_seed(0)
model = TRM(TRMConfig(max_seq_len=args.seq_len, arch=args.arch)).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=True)
raw = model
if world > 1:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(model, device_ids=[rank], broadcast_buffers=False, static_graph=args.static_graph)
if args.compile == "on":
    model = torch.compile(model)
x = torch.randint(0, 16000, (args.batch_size, args.seq_len), device=device)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(5):  # compile and warm up
    step()
torch.cuda.synchronize()
if world > 1:
    dist.barrier()
issue = 0.0
t0 = time.perf_counter()
for _ in range(args.steps):
    c0 = time.perf_counter()
    step()
    issue += time.perf_counter() - c0
torch.cuda.synchronize()
wall = (time.perf_counter() - t0) / args.steps

reduce_ms = float("nan")
if world > 1:
    grads = torch.zeros(raw.num_params(), device=device)
    for _ in range(3):
        dist.all_reduce(grads)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(grads)
    torch.cuda.synchronize()
    reduce_ms = (time.perf_counter() - t1) / 10 * 1e3

if rank == 0:
    tok = args.batch_size * args.seq_len * world / wall
    print(f"{world} GPU(s) {torch.cuda.get_device_name()}, compile {args.compile}, batch {args.batch_size} x "
          f"{args.seq_len} per GPU, static_graph {args.static_graph}: {wall * 1e3:.1f} ms/step wall, "
          f"{issue / args.steps * 1e3:.1f} ms/step CPU issue, {tok:,.0f} tokens/s global; all-reduce of "
          f"{raw.num_params() * 4 / 1e6:.0f} MB: {reduce_ms:.2f} ms", flush=True)

if args.profile:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    if rank == 0:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
if world > 1:
    dist.destroy_process_group()
