"""How long one of the trainer's evaluations takes, by windows per batch, and on a GPU what bounds it.

    python bench/eval_speed.py                                   # the procedure's model and evaluation, this CPU
    python bench/eval_speed.py --device cuda --batch_sizes 16 64 128 256 512
    python bench/eval_speed.py --device cuda --batch_sizes 64 128 256 512 --head_windows 64   # the head in chunks
    python bench/eval_speed.py --device cuda --batch_sizes 256 --head_windows 64 --compiled   # the trainer's call
    python bench/eval_speed.py --device cuda --batch_sizes 256 --head_windows 64 --compiled_blocks   # regional
    python bench/eval_speed.py --device cuda --batch_sizes 256 --head_windows 64 --compiled_blocks --compiled_head

The procedure's run spends most of its overhead evaluating (BENCHMARKS.md, "The procedure's run under `--compile
whole`"): 512 windows of 512 tokens every 500 steps, scored by trm.evaluate.evaluate at 256 windows a batch on CUDA
(the head 64 at a time), in eager mode.
This times that call as the trainer makes it (the procedure's model, random weights and tokens: its speed does not
depend on them), median of --reps after one untimed call, for each batch size. On CUDA one profiled call per batch
size gives the kernels, busy (the sum of their durations) and idle (wall - busy): a large idle share means the host
launching kernels bounds it (larger batches through the recursion would help), a small one that its math does (the
16k head and its loss). --head_windows N runs the head and its loss N windows at a time, as evaluate() can, so that a
large batch keeps a small batch's logits (2 GB in float32 for 64 windows of 512 at 16k). --compiled times
evaluate(compiled=True), one torch.compile graph a batch, as the trainer calls it where its step is compiled (the
untimed first call compiles); without it, the eager call of the same arguments. --compiled_blocks times the eager
call with each transformer block compiled in place first (trm.evaluate.compile_blocks: one block's compile, not the
whole recursion's), as the trainer's call on a GPU, its compile in the first call's time; --compiled_head runs the
head with its loss as one compiled function (evaluate(compiled_head=True)), with or without it. For a cold compile,
give each run fresh TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.device import pick_device  # noqa: E402
from trm.evaluate import compile_blocks, evaluate  # noqa: E402
from trm.model import TRM, TRMConfig  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default="auto")
p.add_argument("--windows", type=int, default=512, help="the trainer's: --eval_tokens 262144 / --max_seq_len")
p.add_argument("--max_seq_len", type=int, default=512)
p.add_argument("--vocab_size", type=int, default=16000)
p.add_argument("--d_model", type=int, default=256)
p.add_argument("--n_heads", type=int, default=4)
p.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 64])
p.add_argument("--head_windows", type=int, default=None, help="windows per pass of the head (default: the batch)")
p.add_argument("--compiled", action="store_true", help="evaluate(compiled=True), as the trainer on a GPU")
p.add_argument("--compiled_blocks", action="store_true",
               help="each transformer block compiled in place (trm.evaluate.compile_blocks), the rest eager")
p.add_argument("--compiled_head", action="store_true", help="the head and its loss compiled (evaluate(compiled_head))")
p.add_argument("--reps", type=int, default=5)
args = p.parse_args()
if args.compiled and args.compiled_blocks:
    sys.exit("error: --compiled and --compiled_blocks are two ways to compile the evaluation: pick one")
if args.compiled and args.compiled_head:
    sys.exit("error: --compiled already compiles the head with the rest: --compiled_head is for the eager call")

device, amp, why = pick_device(args.device)
print(f"device: {device} ({why})")
try:
    cfg = TRMConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads,
                    max_seq_len=args.max_seq_len)
except ValueError as e:  # (a shape the model refuses: one line, not a traceback)
    sys.exit(f"error: {e}")
model = TRM(cfg).to(device)
if args.compiled_blocks:
    compile_blocks(model)  # (lazily: the first call compiles)
g = torch.Generator().manual_seed(0)
windows = torch.randint(0, cfg.vocab_size, (args.windows, args.max_seq_len + 1), generator=g)
token_bytes = torch.randint(1, 4, (cfg.vocab_size,), generator=g)
tokens = args.windows * args.max_seq_len
print(f"model: {model.num_params():,} parameters; {args.windows} windows of {args.max_seq_len} tokens an evaluation")


def one_eval(batch_size):
    t = time.perf_counter()
    evaluate(model, windows, token_bytes, batch_size, device, amp, head_windows=args.head_windows,
             compiled=args.compiled, compiled_head=args.compiled_head)  # ends synced
    return time.perf_counter() - t


if args.compiled or args.compiled_blocks or args.compiled_head:  # a graph per batch size and per shape of a short
    import torch._dynamo  # last batch; past dynamo's limit, silently eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(args.batch_sizes))
how = "compiled" if args.compiled else "eager" + {(True, False): ", its blocks compiled",
                                                  (False, True): ", its head's loss compiled",
                                                  (True, True): ", its blocks and the head's loss compiled",
                                                  }.get((args.compiled_blocks, args.compiled_head), "")
print(f"\nthe head over {args.head_windows or 'all the'} windows at a time, {how}")
print("\n| windows a batch | first call s | ms an evaluation (min-max) | tokens/s | kernels | busy ms | idle |")
print("|---|---|---|---|---|---|---|")
for batch_size in args.batch_sizes:
    first = one_eval(batch_size)  # allocations, cuBLAS's choices, --compiled's compiling: a run pays it once
    times = [one_eval(batch_size) for _ in range(args.reps)]
    wall = statistics.median(times)
    profiled = " |  | "  # (no profile on a CPU)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            one_eval(batch_size)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        busy = sum(e.device_time for e in kernels) / 1e6
        profiled = f"{len(kernels):,} | {1000 * busy:.1f} | {100 * max(wall - busy, 0.0) / wall:.0f}%"
    print(f"| {batch_size} | {first:.1f} | {1000 * wall:.1f} ({1000 * min(times):.1f}-{1000 * max(times):.1f}) | "
          f"{tokens / wall:,.0f} | {profiled} |", flush=True)
