"""Generation speed, with and without the KV cache: greedy, seed model size, random weights, batch 1 or more.

    python bench/generate_speed.py                       # this CPU
    python bench/generate_speed.py --device cuda         # a GPU machine
    python bench/generate_speed.py --device cuda --modes cache --batch 1 8 64   # batched (generate.py --num_samples)
    python bench/generate_speed.py --modes cache --d_model 384 --n_heads 6 --latent_steps 1 --supervision_steps 1 \
        --tie_embeddings --qk_norm --adapter_rank 4          # README's recommended model (0: without the adapters)
    python bench/generate_speed.py --checkpoint halt_each/final_step_600.pt --prompt_len 32 --modes cache \
        --halt_thresholds 1.0 0.5 0.0                    # adaptive depth: a checkpoint with a halting head

Prints one row per mode and batch size: prefill time (the prompts' forward pass), then new tokens per second in total
(all rows together) over the whole run (prefill included) and over the decoding steps alone. A batch of B decodes B
different random prompts of one length. Random weights are fine: speed does not depend on them.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.model import TRM, TRMConfig  # noqa: E402
from trm.sampling import generate_batch  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--prompt_len", type=int, default=256)
parser.add_argument("--new_tokens", type=int, default=256)
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
parser.add_argument("--modes", default="cache,no_cache")
parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes to time (rows decoded together)")
parser.add_argument("--d_model", type=int, default=256)
parser.add_argument("--n_heads", type=int, default=4)
parser.add_argument("--vocab_size", type=int, default=16000)
parser.add_argument("--max_seq_len", type=int, default=512)
parser.add_argument("--latent_steps", type=int, default=2)
parser.add_argument("--supervision_steps", type=int, default=2)
parser.add_argument("--tie_embeddings", action="store_true")
parser.add_argument("--qk_norm", action="store_true")
parser.add_argument("--adapter_rank", type=int, default=0,
                    help="per-call adapters (generation merges them into the weights once, ahead)")
parser.add_argument("--checkpoint", default=None, help="time this checkpoint (EMA weights) instead of random weights")
parser.add_argument("--halt_thresholds", nargs="*", type=float, default=[],
                    help="also time adaptive depth at these thresholds (needs a checkpoint with a halting head)")
parser.add_argument("--compile", action="store_true", help="torch.compile the CUDA-graph decoding step")
parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the weights' and states' type")
args = parser.parse_args()

modes = args.modes.split(",")
if unknown := [m for m in modes if m not in ("cache", "no_cache")]:  # any other word ran uncached, under its name
    parser.error(f"--modes takes cache and no_cache, comma-separated; got {unknown[0]!r}")
if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(args.device)
torch.manual_seed(0)
try:  # a missing checkpoint, a shape the model refuses: one line, not a traceback
    if args.checkpoint:
        from trm.checkpoint import load_model
        model = load_model(args.checkpoint)[0].to(device).eval()
        cfg = model.config
    else:
        cfg = TRMConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads,
                        max_seq_len=args.max_seq_len, latent_steps=args.latent_steps,
                        supervision_steps=args.supervision_steps, tie_embeddings=args.tie_embeddings,
                        qk_norm=args.qk_norm, adapter_rank=args.adapter_rank)
        model = TRM(cfg).to(device).eval()
except (ValueError, RuntimeError) as e:  # (CheckpointError is a RuntimeError)
    sys.exit(f"error: {e}")
if args.halt_thresholds and not model.can_halt:
    sys.exit("error: --halt_thresholds needs a --checkpoint trained with a halting head (train_trm_lm.py --act_weight)")
if args.dtype == "bf16":
    model = model.to(torch.bfloat16)
prompts = torch.randint(4, cfg.vocab_size, (max(args.batch), args.prompt_len)).tolist()


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_run(use_cache, new_tokens, batch=1, halt_threshold=None, stats=None):
    """(seconds to the first step, total seconds, CPU seconds of this process, steps) for one greedy run."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    first, count = None, 0
    for _ in generate_batch(model, prompts[:batch], new_tokens, temperature=0, use_cache=use_cache,
                            halt_threshold=halt_threshold, stats=stats, compile=args.compile):
        count += 1
        if first is None:
            first = time.perf_counter() - t0
    sync()
    return first, time.perf_counter() - t0, time.process_time() - c0, count


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


name = torch.cuda.get_device_name() if device.type == "cuda" else \
    f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
print(f"# {name}, torch {torch.__version__}; d_model={cfg.d_model} n_heads={cfg.n_heads} n_layers={cfg.n_layers} "
      f"vocab={cfg.vocab_size} depth n={cfg.latent_steps} T={cfg.deep_steps} N_sup={cfg.supervision_steps} "
      f"({model.net_calls() * cfg.n_layers} block calls per token), {model.num_params() / 1e6:.2f}M params; "
      f"greedy, prompt {args.prompt_len}, new {args.new_tokens} per row, {args.dtype}"
      f"{', compiled step' if args.compile else ''}")
# tokens per CPU-second: on a shared machine, what one free core would give with --threads 1
print(f"| {'mode':8} | {'batch':>5} | {'prefill s':>9} | {'total s':>8} | {'tokens/s':>8} | {'decode tokens/s':>15} | "
      f"{'tokens/CPU-s':>12} | rounds per token |")
print(f"|{'-' * 10}|{'-' * 7}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 17}|{'-' * 14}|---|")
runs = [(mode, mode == "cache", None) for mode in modes]
runs += [(f"halt {p}", True, p) for p in args.halt_thresholds]
for B in args.batch:
    timed_run(True, 4, B)  # warm-up at this shape: allocator, kernels, lazy init
    for mode, use_cache, p_halt in runs:
        stats = {}
        first, total, cpu, steps = timed_run(use_cache, args.new_tokens, B, p_halt, stats)
        count = steps * B  # no EOS: every row runs every step
        decode = (count - B) / (total - first) if steps > 1 else float("nan")
        rounds = f"{stats['rounds'] / stats['tokens']:.2f}" if stats.get("tokens") else "-"
        print(f"| {mode:8} | {B:5} | {first:9.3f} | {total:8.2f} | {count / total:8.1f} | {decode:15.1f} | "
              f"{count / cpu:12.1f} | {rounds} |", flush=True)
