r"""Does thinking longer help? Validation bits/byte against the supervision rounds used at inference, and against
the halting threshold of adaptive depth.

    python bench/depth.py --data validation_0.jsonl.gz --checkpoints fixed=ck_a/final_step_600.pt \
        random=ck_b/final_step_600.pt --rounds 1 2 3 4 6 8 --halt_thresholds 1.0 0.9 0.7 0.5 0.3

Test-time depth changes no weights: each checkpoint is scored (EMA weights, same windows) with --supervision_steps
set to each value of --rounds. Checkpoints with a halting head (--act_weight) are also scored the way adaptive
generation runs (trm/halting.py computes over whole windows what decoding computes token by token; tested equal),
at each of --halt_thresholds (1.0 = the fixed depth): bits/byte and the share of the recursion spent. Prints tables
(also as --json) and draws depth_curve.png.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.checkpoint import CheckpointError, load_model  # noqa: E402
from trm.corpus import iter_texts  # noqa: E402
from trm.data import DataError, check_paths, document_ids, eval_windows  # noqa: E402
from trm.device import pick_device  # noqa: E402
from trm.evaluate import evaluate  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", nargs="+", required=True)
p.add_argument("--checkpoints", nargs="+", required=True, help="NAME=PATH pairs")
p.add_argument("--rounds", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8])
p.add_argument("--eval_tokens", type=int, default=100_000)
p.add_argument("--halt_thresholds", nargs="*", type=float, default=[1.0, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0])
p.add_argument("--device", default="auto", help="auto, cuda, cpu, mps (bf16 on a capable GPU, as the trainer)")
p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
p.add_argument("--plot", default="depth_curve.png")
p.add_argument("--json", default=None)
args = p.parse_args()
specs = [spec.split("=", 1) for spec in args.checkpoints]
for spec, pair in zip(args.checkpoints, specs):
    if len(pair) != 2 or not all(pair):
        p.error(f"--checkpoints takes NAME=PATH pairs, got {spec!r}")
try:  # a missing file was "the validation corpus has fewer than 2 tokens", in a traceback
    args.data = check_paths(args.data, "--data")
except DataError as e:
    sys.exit(f"error: {e}")

if args.threads:
    import torch
    torch.set_num_threads(args.threads)
device, amp_dtype, why = pick_device(args.device, args.dtype)
print(f"device: {device} ({why})")
texts = [t for f in args.data for t in iter_texts(f)]  # read once; each checkpoint tokenizes with its own vocabulary
rows, halting = {}, {}
for name, path in specs:
    try:
        model, tokenizer, state = load_model(path)
    except CheckpointError as e:
        sys.exit(f"error: --checkpoints {name}={path}: {e}")
    model.to(device)
    ids = np.array([i for doc in document_ids(tokenizer, texts) for i in doc])
    windows = eval_windows(ids, model.config.max_seq_len, args.eval_tokens)
    trained = model.config.supervision_steps
    token_bytes = tokenizer.token_bytes()
    rows[name] = {}
    for r in args.rounds:
        result = evaluate(model, windows, token_bytes, 32, device, amp_dtype, supervision_steps=r)
        rows[name][r] = result["bits_per_byte"]
        print(f"{name:<12} rounds {r:>2} ({r / trained:.1f}x training): {result['bits_per_byte']:.4f} bits/byte, "
              f"loss {result['loss']:.4f}", flush=True)
    if not model.can_halt:
        continue
    halting[name] = {}
    for p_halt in args.halt_thresholds:
        t0 = time.perf_counter()
        result = evaluate(model, windows, token_bytes, 32, device, amp_dtype, halt_threshold=p_halt)
        result["seconds"] = time.perf_counter() - t0
        halting[name][p_halt] = result
        print(f"{name:<12} halting at p > {p_halt:<4}: {result['bits_per_byte']:.4f} bits/byte, "
              f"{result['rounds_per_token']:.3f} of {trained} rounds per token "
              f"({100 * result['recursion_share']:.1f}% of the recursion), {result['seconds']:.1f} s", flush=True)

print("\n| checkpoint | " + " | ".join(f"{r} rounds" for r in args.rounds) + " |")
print("|---|" + "---|" * len(args.rounds))
for name, by_round in rows.items():
    print(f"| {name} | " + " | ".join(f"{by_round[r]:.4f}" for r in args.rounds) + " |")
for name, by_p in halting.items():
    base = by_p.get(1.0)
    print(f"\n{name}: | halting threshold | bits/byte | vs fixed depth | rounds per token | share of the recursion | "
          f"scoring s |\n|---|---|---|---|---|---|")
    for p_halt, r in by_p.items():
        vs = f"{100 * (r['bits_per_byte'] / base['bits_per_byte'] - 1):+.2f}%" if base else "-"
        print(f"| {p_halt} | {r['bits_per_byte']:.4f} | {vs} | {r['rounds_per_token']:.3f} | "
              f"{100 * r['recursion_share']:.1f}% | {r['seconds']:.1f} |")
if args.json:
    with open(args.json, "w") as f:
        json.dump({"rounds": rows, "halting": halting}, f, indent=1)

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
fig, axes = plt.subplots(1, 2 if halting else 1, figsize=(11 if halting else 6, 4), squeeze=False)
ax = axes[0, 0]
for name, by_round in rows.items():
    ax.plot(list(by_round), list(by_round.values()), "o-", label=name)
ax.set_xlabel("supervision rounds at inference")
ax.set_ylabel("validation bits/byte")
ax.grid(alpha=0.3)
ax.legend()
if halting:
    ax = axes[0, 1]
    for name, by_p in halting.items():
        ax.plot([100 * r["recursion_share"] for r in by_p.values()], [r["bits_per_byte"] for r in by_p.values()],
                "o-", label=name)
        for p_halt, r in by_p.items():
            ax.annotate(f"{p_halt}", (100 * r["recursion_share"], r["bits_per_byte"]), fontsize=7)
    ax.set_xlabel("share of the recursion spent (%), labels: halting threshold")
    ax.set_ylabel("validation bits/byte")
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
fig.savefig(args.plot, dpi=110)
print(f"wrote {args.plot}")
