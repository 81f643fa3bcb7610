"""Does thinking longer help? Validation bits/byte against the supervision rounds used at inference.

    python bench/depth.py --data validation_0.jsonl.gz --checkpoints fixed=ck_a/final_step_600.pt \
        random=ck_b/final_step_600.pt --rounds 1 2 3 4 6 8

Test-time depth changes no weights: each checkpoint is scored (EMA weights, same windows) with --supervision_steps
set to each value of --rounds. Prints a table (also as --json) and draws depth_curve.png.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.checkpoint import load_model  # noqa: E402
from trm.corpus import iter_texts  # noqa: E402
from trm.data import document_ids, eval_windows  # noqa: E402
from trm.evaluate import evaluate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--data", nargs="+", required=True)
p.add_argument("--checkpoints", nargs="+", required=True, help="NAME=PATH pairs")
p.add_argument("--rounds", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8])
p.add_argument("--eval_tokens", type=int, default=100_000)
p.add_argument("--plot", default="depth_curve.png")
p.add_argument("--json", default=None)
args = p.parse_args()

texts = [t for f in args.data for t in iter_texts(f)]  # read once; each checkpoint tokenizes with its own vocabulary
rows = {}
for spec in args.checkpoints:
    name, path = spec.split("=", 1)
    model, tokenizer, state = load_model(path)
    ids = np.array([i for doc in document_ids(tokenizer, texts) for i in doc])
    windows = eval_windows(ids, model.config.max_seq_len, args.eval_tokens)
    trained = model.config.supervision_steps
    token_bytes = tokenizer.token_bytes()
    rows[name] = {}
    for r in args.rounds:
        result = evaluate(model, windows, token_bytes, batch_size=32, supervision_steps=r)
        rows[name][r] = result["bits_per_byte"]
        print(f"{name:<12} rounds {r:>2} ({r / trained:.1f}x training): {result['bits_per_byte']:.4f} bits/byte, "
              f"loss {result['loss']:.4f}", flush=True)

print("\n| checkpoint | " + " | ".join(f"{r} rounds" for r in args.rounds) + " |")
print("|---|" + "---|" * len(args.rounds))
for name, by_round in rows.items():
    print(f"| {name} | " + " | ".join(f"{by_round[r]:.4f}" for r in args.rounds) + " |")
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
fig, ax = plt.subplots(figsize=(6, 4))
for name, by_round in rows.items():
    ax.plot(list(by_round), list(by_round.values()), "o-", label=name)
ax.set_xlabel("supervision rounds at inference")
ax.set_ylabel("validation bits/byte")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(args.plot, dpi=110)
print(f"wrote {args.plot}")
