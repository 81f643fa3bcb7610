"""Equal wall-clock races between model configurations: one run per visible GPU at a time, all with the same budget.

    python bench/race.py --data_dir corpus/ --sp_model ja_trm.model --minutes 2 --out race_out \
        --run "trm=--supervision_steps 1 --grad_deep_steps 0 --lr 3e-3" --run "gpt12=--arch gpt --n_layers 12"

Every run is train_trm_lm.py with the shared flags (--batch_size 64 --weight_decay 0.1 --max_minutes M, evaluation every
--eval_every steps on 262k validation tokens) plus its own. The budget counts the trainer's training time, compilation
included; evaluation and saving do not count. Every distinct graph is compiled once before the race (untimed), so each
run finds the inductor cache warm and none pays a cold compile that another does not. When a run ends, its final
checkpoint (EMA weights) is scored by trm.evaluate on --eval_tokens of validation_0 (at most: the header names the
tokens scored) at its trained depth and at 0.5x and 2x its supervision rounds (deep steps for 1-round models). The table
also shows the best validation along the run (the trainer's own evaluations), since at 30+ epochs a model can be past
its best when the clock stops; best.pt, the checkpoint of the best evaluation, is scored on the same tokens as the final
one (its score reused when it holds the final weights). "GPU busy" is the median of nvidia-smi's utilization while a
run's trainer ran (its start-up and evaluations included, a small share): well under 100% means the GPU waited for the
host, and that run's tokens/s says more about the machine than about the model. A run that fails, or that race.py itself
fails on, keeps its row, saying why.

Prints a markdown table and the tokenizer's fingerprint (rows compare exactly only on one tokenizer: two trainings of
ja_trm.model on several threads differ), and writes race.json, every run's log and race.png under --out: validation
bits/byte against training minutes and against training tokens, one line per run, so the race is seen at a glance.
`--plot_only` redraws race.png from the runs already under --out (a race still going, or one stopped early) without
racing.
"""
import argparse
import json
import os
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from trm import depth as depth_schedule  # noqa: E402
from trm.checkpoint import same_weights  # noqa: E402
from trm.corpus import SUFFIXES, train_shards  # noqa: E402
from trm.model import TRM, TRMConfig  # noqa: E402
from trm.tokenizer import Tokenizer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--run", action="append", help="NAME=FLAGS, one per configuration (repeatable; required)")
p.add_argument("--data_dir", help="folder with train_N and validation_0 corpus files (.jsonl[.gz|.xz|.zst], "
                                  ".parquet; required)")
p.add_argument("--sp_model", help="the SentencePiece model (required)")
p.add_argument("--minutes", type=float, default=2.0, help="training budget of every run")
p.add_argument("--out", default="race_out")
p.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: every visible GPU)")
p.add_argument("--common", default="--batch_size 64 --weight_decay 0.1 --eval_every 500 --log_every 250",
               help="flags every run shares")
p.add_argument("--eval_tokens", type=int, default=1_000_000)
p.add_argument("--no_depth", action="store_true", help="score at the trained depth only")
p.add_argument("--no_warm", action="store_true",
               help="skip the untimed compile of every distinct graph before the race")
p.add_argument("--plot_only", action="store_true", help="only redraw race.png from the runs under --out")
args = p.parse_args()
args.out = os.path.abspath(args.out)


def speed(trains):
    """Tokens/s of a run's log windows: (median, slowest, fastest), the first window left out (it holds compilation)
    when there are others. The spread shows a run whose speed wandered (a host-bound step: the GPT-12 with Muon ran
    at 1.48-1.97M tokens/s from one run to the next, BENCHMARKS.md), which the median alone hides."""
    speeds = sorted(h["tok_s"] for h in (trains[1:] if len(trains) > 1 else trains) if "tok_s" in h)
    return (statistics.median(speeds), speeds[0], speeds[-1]) if speeds else (0, 0, 0)


def best_eval(evals):
    """The run's best evaluation at its full depth (None before one): --depth_warmup's first evaluations score the
    shallow model it trains then, another function, which best.pt does not keep either."""
    return min((h for h in evals if "eval_depth" not in h), key=lambda h: h["bits_per_byte"], default=None)


def at_minutes(evals):
    """The run's bits/byte at each whole training minute it reached: its latest evaluation at or before the minute (a
    3 s margin for the last one, which the budget ends a moment early). Runs compared minute by minute are compared at
    equal wall-clock, even when one of them was cut short."""
    last = evals[-1]["train_seconds"]
    marks = range(1, int((last + 3) // 60) + 1)
    return [(m, max((h for h in evals if h["train_seconds"] <= 60 * m + 3 * (m == marks[-1])),
                    key=lambda h: h["train_seconds"], default=None)) for m in marks]


def at_tokens(evals, marks):
    """The run's bits/byte at each of the token marks: its latest evaluation at or before the mark, or None."""
    return [max((h for h in evals if h["tokens_seen"] <= mark), key=lambda h: h["tokens_seen"], default=None)
            for mark in marks]


def plot_race(names):
    """race.png: each run's validation bits/byte (the trainer's evaluations) against its training minutes, the clock
    that --max_minutes counts, and against the tokens it had trained on. A run without evaluations yet is named in
    the printout and left out of the plot.

    Printed per run: the minute marks (equal wall-clock), then, on a second line, the marks at 1/8, 1/4, 1/2 and all
    of the tokens the shortest run saw (equal data: a model that is slower per token but better per token shows here,
    where the minute marks hide it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    runs = {}
    for name in names:
        path = os.path.join(args.out, name, "metrics.jsonl")
        history = list(map(json.loads, open(path))) if os.path.isfile(path) else []
        evals = [h for h in history if h.get("kind") == "eval" and "train_seconds" in h]
        if not evals:
            print(f"race.png: {name}: no evaluation with train_seconds in {path}", flush=True)
            continue
        runs[name] = history, evals
    counted = {name for name, (_, evals) in runs.items() if all("tokens_seen" in h for h in evals)}  # (older logs)
    fewest = min((runs[name][1][-1]["tokens_seen"] for name in counted), default=0)
    token_marks = [fewest // 8, fewest // 4, fewest // 2, fewest] if fewest else []
    for name, (history, evals) in runs.items():
        minutes = [h["train_seconds"] / 60 for h in evals]
        bpb = [h["bits_per_byte"] for h in evals]
        by_time.plot(minutes, bpb, "o-", ms=3, lw=1.5, label=name)
        median, slowest, fastest = speed([h for h in history if h.get("kind") == "train"])
        marks = at_minutes(evals)
        along = (f"; at {' / '.join(str(m) for m, _ in marks)} min: " +
                 " / ".join(f"{h['bits_per_byte']:.4f}" if h else "-" for _, h in marks)) if marks else ""
        best = best_eval(evals)
        shallow = [h for h in evals if "eval_depth" in h]
        print(f"race.png: {name}: {len(evals)} evaluations, {evals[-1]['bits_per_byte']:.4f} bits/byte at "
              f"{minutes[-1]:.2f} min" + (f" (best {best['bits_per_byte']:.4f} at "
                                          f"{best['train_seconds'] / 60:.2f} min)" if best else "") +
              f", {median / 1e6:.2f}M tokens/s ({slowest / 1e6:.2f}-{fastest / 1e6:.2f}M)" + along, flush=True)
        if shallow:
            print(f"race.png: {name}: {len(shallow)} of its evaluations score the depth warm-up's shallow model "
                  f"({shallow[0]['eval_depth']}), not the full one", flush=True)
        if token_marks and name in counted:
            by_tokens.plot([h["tokens_seen"] / 1e6 for h in evals], bpb, "o-", ms=3, lw=1.5, label=name)
            print(f"race.png: {name}: at {' / '.join(f'{m / 1e6:.3g}M' for m in token_marks)} tokens: " +
                  " / ".join(f"{h['bits_per_byte']:.4f}" if h else "-" for h in at_tokens(evals, token_marks)),
                  flush=True)
    by_time.set_xlabel("training minutes (compilation included, evaluation and saving not)")
    by_time.set_ylabel("validation bits/byte")
    by_tokens.set_xlabel("training tokens (millions)")
    fig.suptitle(f"race: {os.path.basename(args.out)}")
    for ax in (by_time, by_tokens):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "race.png"), dpi=110)
    plt.close(fig)


if args.plot_only:  # the runs are the save dirs under --out; _prep and _warm are not runs
    if not os.path.isdir(args.out):
        sys.exit(f"error: --out {args.out} is not a folder of race runs")
    plot_race(sorted(d for d in os.listdir(args.out) if not d.startswith("_") and
                     os.path.isfile(os.path.join(args.out, d, "metrics.jsonl"))))
    sys.exit(0)
if not (args.run and args.data_dir and args.sp_model):
    p.error("--run, --data_dir and --sp_model are required (unless --plot_only)")
args.data_dir, args.sp_model = map(os.path.abspath, (args.data_dir, args.sp_model))
if not os.path.isdir(args.data_dir):  # (train_shards would end in a FileNotFoundError traceback)
    sys.exit(f"error: --data_dir {args.data_dir} is not a folder")
runs = [spec.split("=", 1) for spec in args.run]
for spec, run in zip(args.run, runs):
    # a run's name is its save dir and log under --out: a "/" would put its log in a folder nobody made (the worker
    # thread died there and every run queued after it never raced); "_prep", "_warm" and token_cache are the race's own
    if len(run) != 2 or not run[0] or os.sep in run[0] or run[0].startswith(("_", ".")) or run[0] == "token_cache":
        sys.exit(f"error: --run {spec!r}: give NAME=FLAGS, the NAME without '/' and not starting with '_' or '.', "
                 f"nor token_cache (it names the run's folder under --out)")
for what, flags in [(f"--run {spec!r}", run[1]) for spec, run in zip(args.run, runs)] + [("--common", args.common)]:
    try:  # an unclosed quote would end the warm-up, or the run's own thread, in a traceback
        shlex.split(flags)
    except ValueError as e:
        sys.exit(f"error: {what}: its flags do not parse ({e})")
if len({name for name, _ in runs}) != len(runs):
    sys.exit("error: run names must be unique")


def gpu_ids():
    if args.gpus:
        return args.gpus.split(",")
    n = torch.cuda.device_count()
    # Each run's CUDA_VISIBLE_DEVICES replaces the race's own, and nvidia-smi -i takes the host's ids: under
    # CUDA_VISIBLE_DEVICES=2,3 the visible GPUs are 2 and 3, not 0 and 1 (the numbers torch counts from)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if n and len(visible) >= n:
        return visible[:n]
    return [str(i) for i in range(n)] or ["cpu"]


train_paths = train_shards(args.data_dir)
valid_path = next((v for s in SUFFIXES if os.path.isfile(v := os.path.join(args.data_dir, "validation_0" + s))), None)
if not train_paths or valid_path is None:
    sys.exit(f"error: --data_dir {args.data_dir} needs train_N and validation_0 files ({', '.join(SUFFIXES)})")
cache_dir = os.path.join(args.out, "token_cache")
os.makedirs(args.out, exist_ok=True)


def trainer_cmd(name, flags, extra=()):
    return [sys.executable, os.path.join(ROOT, "train_trm_lm.py"), "--sp_model", args.sp_model,
            "--train_paths", *train_paths, "--valid_paths", valid_path, "--cache_dir", cache_dir,
            "--save_dir", os.path.join(args.out, name), *shlex.split(args.common), *shlex.split(flags), *extra]


def score(name, ckpt, env, **depth):
    cmd = [sys.executable, "-m", "trm.evaluate", "--model_path", ckpt, "--data", valid_path,
           "--eval_tokens", str(args.eval_tokens)]
    for k, v in depth.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


class GpuBusy:
    """The GPU's utilization while a run trains (nvidia-smi's share of time a kernel was running, sampled each second),
    as the median of the samples: a run whose GPU waits for Python shows it where tokens/s alone does not. On one H200
    lease the TRM-384 under plain torch.compile sat at 74-77% and trained at 1.49M tokens/s, 20% below another
    lease's, while the GPT on CUDA graphs held 95-100% and its usual speed (BENCHMARKS.md, Round 2): the host, not the
    model, had set the TRM's pace. None without nvidia-smi (a race on the CPU)."""

    def __init__(self, gpu):
        self.samples, self.smi = [], None
        if gpu == "cpu" or not shutil.which("nvidia-smi"):
            return
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", gpu, "-l", "1"]
        self.smi = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.smi.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def median(self):
        """Stops sampling; the median utilization in percent, or None when nothing was read."""
        if self.smi is None:
            return None
        self.smi.terminate()
        self.smi.wait()
        self.reader.join(timeout=5)
        samples = sorted(self.samples)
        return samples[len(samples) // 2] if samples else None


def along_run(history):
    """A finished run's figures from its metrics.jsonl entries: steps, the best and last evaluation, tokens/s."""
    evals = [h for h in history if h["kind"] == "eval"]
    best = best_eval(evals) or {"bits_per_byte": None, "step": None}  # (every evaluation inside a depth warm-up)
    tok_s = speed([h for h in history if h["kind"] == "train"])
    return dict(steps=max(h["step"] for h in history), best_val=best["bits_per_byte"], best_step=best["step"],
                last_val=evals[-1]["bits_per_byte"], tok_s=tok_s[0], tok_s_min=tok_s[1], tok_s_max=tok_s[2])


def race(name, flags, gpu):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    log_path = os.path.join(args.out, f"{name}.log")
    save_dir = os.path.join(args.out, name)
    shutil.rmtree(save_dir, ignore_errors=True)  # a run of the same name in an earlier race must not be scored
    t0 = time.time()
    with open(log_path, "w") as log:  # (opened before the sampler starts: a log that cannot be opened starts none)
        busy = GpuBusy(gpu)
        try:
            rc = subprocess.call(trainer_cmd(name, flags, ["--max_steps", "10000000", "--max_minutes",
                                                           str(args.minutes)]),
                                 env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        finally:  # (the sampler stops even when the run could not start: it would sample on beside the next runs)
            gpu_util = busy.median()
    row = {"name": name, "flags": flags, "gpu": gpu, "rc": rc, "wall_s": time.time() - t0, "gpu_util": gpu_util}
    finals = [f for f in os.listdir(save_dir) if f.startswith("final_step_")] if os.path.isdir(save_dir) else []
    if rc or not finals:
        lines = [line for line in open(log_path, errors="replace").read().splitlines() if line.strip()]
        said = [line for line in lines if line.startswith("error: ")]  # the trainer's one line
        # else what stopped it first: a signal (the kernel's OOM killer: SIGKILL), a traceback's last line (its
        # exception), or no final checkpoint; the log's last 600 characters began mid-traceback or with a log line
        last = f"; its log ends: {lines[-1][:300]}" if lines else ""
        if said:
            row["error"] = said[-1]
        elif rc < 0:
            row["error"] = f"killed by {signal.Signals(-rc).name}{last}"
        else:
            row["error"] = (f"exit status {rc}" if rc else f"no final checkpoint in {save_dir}") + last
        return row
    history = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl")) if line.strip()]
    row.update(along_run(history))
    ckpt = os.path.join(save_dir, finals[0])
    trained = score(name, ckpt, env)
    row.update(params=trained.get("params"), bpb=trained.get("bits_per_byte"), error=trained.get("error"),
               scored_tokens=trained.get("tokens"))  # at most --eval_tokens: a validation file may hold fewer
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    best_ckpt = os.path.join(save_dir, "best.pt")  # the trainer keeps the checkpoint of its best evaluation
    if os.path.exists(best_ckpt):
        # a run whose last evaluation was its best (most runs of a few minutes) ends with best.pt holding the final
        # weights: scored once, not twice (each scoring is a process, ~10 s of the GPU's time between two runs)
        row["best_is_final"] = same_weights(torch.load(best_ckpt, map_location="cpu", weights_only=True), state)
        row["bpb_best"] = row["bpb"] if row["best_is_final"] else score(name, best_ckpt, env).get("bits_per_byte")
    cfg = state["config"]
    row["tokenizer"] = Tokenizer.from_state(state["tokenizer"]).fingerprint()  # which draw of ja_trm.model it used
    model, depths = TRM(TRMConfig(**cfg)), depth_schedule.grid(TRMConfig(**cfg), state["args"].get("random_depth"))
    reembed = state["args"].get("sup_update") == "each"  # the paper's rule runs the prelude again every round
    # (as trained, and as the trainer's log counts it)
    row["mflop_per_token"] = sum(model.flops_per_token(reembed=reembed, **d) for d in depths) / len(depths) / 1e6
    if not args.no_depth and cfg["arch"] == "trm":
        key = "supervision_steps" if cfg["supervision_steps"] > 1 else "deep_steps"
        half, double = max(1, cfg[key] // 2), 2 * cfg[key]
        row["depth_key"] = key
        if half != cfg[key]:
            row["bpb_half"] = score(name, ckpt, env, **{key: half}).get("bits_per_byte")
        row["bpb_double"] = score(name, ckpt, env, **{key: double}).get("bits_per_byte")
    return row


# The token cache is built once, before the runs start, so no run pays for tokenizing (or races another to build it).
print(f"building the token cache in {cache_dir}", flush=True)
shutil.rmtree(os.path.join(args.out, "_prep"), ignore_errors=True)  # a save_dir belongs to one run
prep = subprocess.run(trainer_cmd("_prep", "--device cpu --compile off --batch_size 1 --max_seq_len 16 --d_model 32 "
                                           "--n_heads 2 --eval_tokens 64", ["--max_steps", "1"]),
                      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
if prep.returncode:  # the trainer's own one line where it gave one (a missing --sp_model), else its output's end
    said = [line for line in prep.stderr.splitlines() if line.startswith("error: ")]
    sys.exit(f"error: preparing the token cache failed: {said[-1][len('error: '):]}" if said else
             f"error: preparing the token cache failed:\n{prep.stdout[-2000:]}\n{prep.stderr[-2000:]}")

# torch.compile's first build of a graph takes 20-40 s of the budget; later builds of the same graph load from the
# inductor cache. Measured on aozora-xl (BENCHMARKS.md): the first run of each architecture lost ~20% of its steps
# that way. So every distinct graph is compiled once, untimed, before the race: each timed run then finds a warm cache.
def graph_key(flags):
    words, key = shlex.split(flags), []
    for i, w in enumerate(words):  # the learning rate and seed change no graph
        if w in ("--lr", "--seed") or (i and words[i - 1] in ("--lr", "--seed")):
            continue
        key.append(w)
    return tuple(key)


if not args.no_warm:
    warmed = {}
    for name, flags in runs:
        if graph_key(flags) in warmed:
            continue
        warmed[graph_key(flags)] = name
        print(f"warming the compile cache for {name}", flush=True)
        shutil.rmtree(os.path.join(args.out, "_warm"), ignore_errors=True)
        warm = ["--max_steps", "20", "--eval_every", "1000000", "--log_every", "10"]
        subprocess.run(trainer_cmd("_warm", flags, warm),
                       cwd=ROOT, capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpu_ids()[0]))

todo, rows, lock = queue.Queue(), [], threading.Lock()
for r in runs:
    todo.put(r)


def worker(gpu):
    while True:
        try:
            name, flags = todo.get_nowait()
        except queue.Empty:
            return
        print(f"[gpu {gpu}] {name}: {flags}", flush=True)
        try:
            row = race(name, flags, gpu)
        except Exception as e:  # a row that says so, not a dead worker: its run, and those queued after, kept
            row = {"name": name, "flags": flags, "gpu": gpu, "error": f"race.py: {type(e).__name__}: {e}"}
        with lock:
            rows.append(row)
            json.dump(rows, open(os.path.join(args.out, "race.json"), "w"), indent=1)
        print(f"[gpu {gpu}] {name} done: " + json.dumps({k: v for k, v in row.items() if k != "flags"}), flush=True)


threads = [threading.Thread(target=worker, args=(g,)) for g in gpu_ids()]
for t in threads:
    t.start()
for t in threads:
    t.join()


plot_race([name for name, _ in runs])


def fmt(v, spec=".4f"):
    return "" if v is None else format(v, spec)


# the tokens trm.evaluate scored, not those asked for: --eval_tokens is a ceiling, and aozora-xl's validation_0 gives
# 562,876 of the default 1,000,000 (its whole windows, BENCHMARKS.md)
scored = ", ".join(f"{n:,}" for n in sorted({r["scored_tokens"] for r in rows if r.get("scored_tokens")})) or "no"
print(f"\n{args.minutes:g} minutes each; bits/byte on validation_0 ({scored} tokens scored, --eval_tokens "
      f"{args.eval_tokens:,}; EMA) at the end and "
      "of best.pt (the checkpoint of the trainer's best evaluation); best along run = that evaluation itself (its "
      "own, smaller sample)")
print("| run | params | MFLOP/token | tok/s (slowest-fastest log window) | GPU busy | steps | bits/byte | best.pt | "
      "best along run (step) | 0.5x depth "
      "| 2x depth | flags |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=lambda r: r.get("bpb") or 9):
    if r.get("error") and r.get("bpb") is None:
        # the start of the trainer's error line says why; the end of it, a resume hint, did not
        why = repr(r["error"][:160]).replace("|", "\\|")  # (a log line's own "|" would split the cell)
        print(f"| {r['name']} | failed: {why} |||||||||| `{r['flags']}` |")
        continue
    busy = "" if r.get("gpu_util") is None else f"{r['gpu_util']}%"
    print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['mflop_per_token']:.0f} | {r['tok_s'] / 1e6:.2f}M "
          f"({r['tok_s_min'] / 1e6:.2f}-{r['tok_s_max'] / 1e6:.2f}M) | {busy} | "
          f"{r['steps']:,} | {fmt(r['bpb'])} | {fmt(r.get('bpb_best'))} | {fmt(r['best_val'])} ({fmt(r['best_step'], ',')}) | "
          f"{fmt(r.get('bpb_half'))} | "
          f"{fmt(r.get('bpb_double'))} | `{r['flags']}` |")
if fingerprints := sorted({r["tokenizer"] for r in rows if "tokenizer" in r}):  # (see the docstring)
    print("\ntokenizer fingerprint: " + ", ".join(fingerprints))
if len(fingerprints) > 1:  # (a run's own --sp_model or --tokenizer byte): which rows compare with which
    print("warning: the rows are on different tokenizers and compare only within one: " + "; ".join(
        f"{fp}: {', '.join(r['name'] for r in rows if r.get('tokenizer') == fp)}" for fp in fingerprints))
