"""Training throughput of the real trainer, and how fast the data path can feed it.

Runs train_trm_lm.py itself (so the figures are the ones users see in its log lines: tokens/s and MFU counted by
the model's own flops_per_token) for a few configurations, and times the packed loader alone on the same corpus.

    python bench/train_speed.py --data ../shared/corpus/aozora --sp_model ja_trm.model --steps 300
    python bench/train_speed.py --data DIR --configs "seed b64" "seed b4"     # a subset

Prints one table; --json FILE also writes the rows.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from trm.cli import fail  # noqa: E402 (after the path)
from trm.corpus import SUFFIXES, train_shards  # noqa: E402
from trm.tokenizer import Tokenizer, TokenizerError  # noqa: E402

CONFIGS = {  # name: extra train_trm_lm.py flags
    "seed b64": ["--batch_size", "64"],
    "seed b4": ["--batch_size", "4"],
    "seed b4 graphs": ["--batch_size", "4", "--compile", "graphs"],
    "d512 b64": ["--batch_size", "64", "--d_model", "512", "--n_heads", "8"],
    "gpt2L b64": ["--batch_size", "64", "--arch", "gpt"],
    "gpt12L b64": ["--batch_size", "64", "--arch", "gpt", "--n_layers", "12"],
}

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--data", required=True, help="folder with train_N and validation_0 corpus files (.jsonl[.gz|.xz|.zst], "
                                             ".parquet)")
p.add_argument("--sp_model", default="ja_trm.model")
p.add_argument("--steps", type=int, default=300,
               help="steps per configuration, at least 20: tokens/s and MFU are the median of its log windows (every "
                    "max(10, steps // 5) steps) but the first, which compiles")
p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
               help=f"a subset of: {', '.join(repr(c) for c in CONFIGS)}")
p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every run")
p.add_argument("--json", default=None)
args = p.parse_args()
if args.steps < 20:  # one log window only: it is left out, and the table printed 0 tokens/s
    p.error("--steps must be at least 20 (two log windows: the first holds compilation and is left out)")

if not os.path.isdir(args.data):
    fail(f"--data {args.data} is not a folder")
train_paths = train_shards(args.data)
if not train_paths:
    fail(f"no training shards (train_N{' or train_N'.join(SUFFIXES)}) in --data {args.data}")
# the trainer's formats, as race.py finds it: a folder of .jsonl shards has a validation_0.jsonl, not .jsonl.gz
valid = next((v for s in SUFFIXES if os.path.isfile(v := os.path.join(args.data, "validation_0" + s))), None)
if valid is None:
    fail(f"no validation_0 file (validation_0{' or validation_0'.join(SUFFIXES)}) in --data {args.data}")
try:  # every run needs it, and the loader's timing after them: one line now, not a failure per run and a traceback
    Tokenizer.from_args("sentencepiece", args.sp_model)
except TokenizerError as e:
    fail(str(e))
work = tempfile.mkdtemp(prefix="trm_bench_")  # the runs' checkpoints and two token caches: removed at the end
rows = []


def run_trainer(name, flags):
    log_every = max(10, args.steps // 5)
    save_dir = os.path.join(work, "ck_" + re.sub(r"\W+", "_", name))  # a save dir per run: each one owns its own
    cmd = [sys.executable, os.path.join(ROOT, "train_trm_lm.py"), "--sp_model", args.sp_model,
           "--train_paths", *train_paths, "--valid_paths", valid, "--save_dir", save_dir,
           "--max_steps", str(args.steps), "--eval_every", str(10 ** 9), "--log_every", str(log_every),
           "--cache_dir", os.path.join(work, "token_cache"), *flags, *args.extra]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{name}: failed\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step")]
    # skip the first log window: compilation and warm-up
    tok = [float(re.search(r"([\d,]+) tok/s", ln).group(1).replace(",", "")) for ln in lines[1:]]
    mfu = [float(m.group(1)) for ln in lines[1:] if (m := re.search(r"MFU ([\d.]+)%", ln))]
    return {"config": name, "flags": " ".join(flags), "tok_s": statistics.median(tok) if tok else None,
            "mfu_pct": statistics.median(mfu) if mfu else None, "wall_s": round(time.time() - t0, 1)}


def loader_speed(batch_size=64, seq_len=512, batches=2000):
    """Tokens/s the packed loader delivers (host side, into pinned memory), fresh and after a state round trip."""
    import torch
    from trm.data import PackedLoader, load_tokens
    tok = Tokenizer.from_args("sentencepiece", args.sp_model)
    cache = os.path.join(work, "token_cache_loader")
    t0 = time.time()
    tokens = load_tokens(train_paths, tok, cache, log=lambda m: None)
    build_s = time.time() - t0
    out = {"cache_build_s": round(build_s, 2), "cache_tokens": len(tokens),
           "tokenize_tok_s": round(len(tokens) / build_s)}
    loader = PackedLoader(tokens, seq_len, batch_size, seed=0)
    for label in ("loader_tok_s", "loader_after_resume_tok_s"):
        t0 = time.time()
        for _ in range(batches):
            x, y = loader.next_batch()
            if torch.cuda.is_available():  # as the trainer does: both pinned, for the copy that does not wait
                x, y = x.pin_memory(), y.pin_memory()
        out[label] = round(batches * batch_size * seq_len / (time.time() - t0))
        state = loader.state_dict()
        loader = PackedLoader(tokens, seq_len, batch_size, seed=0)
        loader.load_state_dict(state)
    return out


for name in args.configs:
    row = run_trainer(name, CONFIGS[name])
    if row:
        rows.append(row)
        print(json.dumps(row), flush=True)
    else:  # its output is above; the table names it too rather than leave it out
        rows.append({"config": name, "flags": " ".join(CONFIGS[name]), "tok_s": None, "mfu_pct": None, "failed": True})
loader = loader_speed()
print(json.dumps(loader), flush=True)

print(f"\n{'config':<16} {'tokens/s':>12} {'MFU':>7}  flags")
for r in rows:
    mfu = f"{r['mfu_pct']:.1f}%" if r["mfu_pct"] is not None else "-"
    tok_s = "failed" if r.get("failed") else f"{r['tok_s']:,.0f}" if r["tok_s"] is not None else "-"
    print(f"{r['config']:<16} {tok_s:>12} {mfu:>7}  {r['flags']}")
print(f"\nloader (64 x 512): {loader['loader_tok_s']:,} tokens/s fresh, {loader['loader_after_resume_tok_s']:,} after "
      f"resume; token cache built at {loader['tokenize_tok_s']:,} tokens/s ({loader['cache_tokens']:,} tokens)")
if args.json:
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "loader": loader}, f, indent=1)
shutil.rmtree(work, ignore_errors=True)
