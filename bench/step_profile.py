"""Where the time of one training step goes: forward, backward, optimizer, EMA; the whole step as the trainer runs it
(no sync inside), and on a GPU whether that step is bound by its math or by the host launching its kernels.

    python bench/step_profile.py                              # seed architecture, batch 4 x 512, this CPU
    python bench/step_profile.py --batch_size 64 --device cuda --compile on
    python bench/step_profile.py --batch_size 64 --device cuda --arch gpt --n_layers 12 --optimizer muon \
        --qk_norm --zero_init --compile graphs
    python bench/step_profile.py --device cuda --compile graphs --loop_steps 3000 --save_every 500   # the loop
    python bench/step_profile.py --device cuda --compile on --whole_graph          # the whole step as one graph
    python bench/step_profile.py --device cuda --compile on --whole_graph --optimizer muon --muon_ns_steps 3 \
        --arch gpt --n_layers 4 --d_model 1024 --n_heads 16 --qk_norm --zero_init --tie_embeddings --dropout 0
        # the equal-compute pair's GPT as raced; its TRM: --d_model 1024 --n_heads 16 --latent_steps 1 --deep_steps 1
        # --supervision_steps 1 --grad_deep_steps 0 and the same recipe
    python bench/step_profile.py --device cuda --compile on --whole_graph --overlap_eval   # an evaluation beside it
    python bench/step_profile.py --device cuda --compile on --whole_graph --background_compile   # its compile beside it
    python bench/step_profile.py --device cuda --batch_size 64 --dropout 0 --compile on --d_model 384 --n_heads 6 \
        --latent_steps 1 --supervision_steps 1 --grad_deep_steps 0 --tie_embeddings --optimizer muon --qk_norm \
        --zero_init --adapter_rank 4                                                          # the adapters' cost

Random tokens (speed does not depend on them). Prints the phase times (each phase synced, median of --steps), then the
whole step unsynchronized as in the trainer's loop: ms, tokens/s, MFU. On CUDA, one profiled run of --steps whole
steps gives the kernels per step, busy (the sum of their durations) and idle (wall - busy): a step whose idle share is
large is host-bound, the GPU waiting for Python to launch kernels (CUDA graphs or fewer, fused kernels help); a busy
one is bound by its math, and the top kernels say where. The 12-layer GPT with Muon ran at 1.25-1.94M tokens/s from one
log window to the next in a race while the TRM held 1.43M (BENCHMARKS.md, Round 2, fourth session): this says why.
--compile as the trainer's: off (default here, as before the flag), on (torch.compile), graphs (with CUDA graphs).
--loop_steps N then times N steps as the trainer's loop takes them, without and with its background checkpoints: the
difference from the whole step above is what the loop costs besides the math.
--overlap_eval (CUDA) times one of the trainer's evaluations (the procedure's 512 windows, 256 a batch) alone, then
from a second thread on a second stream while the steps go on: what it costs the steps there against its time alone.
--background_compile (CUDA, --whole_graph) compiles the trainer's evaluation (trm.evaluate's compiled=True) on a second
thread while the whole-step graph replays as the trainer's loop takes it (a batch from the loader, pinned, copied), and
prints what training lost meanwhile, an evaluation's time eager and compiled, and after how many evaluations the
compile pays back. --switch_interval sets Python's thread switch interval while it compiles (0: Python's own, 5 ms).
Run it with fresh TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR for a cold compile, again with the same for a warm one.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.data import PackedLoader  # noqa: E402
from trm.device import autocast, pick_device  # noqa: E402
from trm.ema import EMA  # noqa: E402
from trm.evaluate import evaluate  # noqa: E402
from trm.flags import check_flags, trainer_parser  # noqa: E402
from trm.metrics import peak_flops  # noqa: E402
from trm.model import TRM, TRMConfig  # noqa: E402
from trm.optim import build_optimizer  # noqa: E402
from trm.run_dir import RunDir  # noqa: E402
from trm.saver import Saver  # noqa: E402
from trm.whole_step import WARMUP, WholeStep  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default="auto")
p.add_argument("--batch_size", type=int, default=4)
p.add_argument("--max_seq_len", type=int, default=512)
p.add_argument("--d_model", type=int, default=256)
p.add_argument("--n_heads", type=int, default=4)
p.add_argument("--n_layers", type=int, default=2)
p.add_argument("--supervision_steps", type=int, default=2)
p.add_argument("--grad_deep_steps", type=int, default=1)
p.add_argument("--latent_steps", type=int, default=2)
p.add_argument("--deep_steps", type=int, default=TRMConfig.deep_steps,
               help="as the trainer's (1: the TRM-1024's equal-compute row)")
p.add_argument("--tie_embeddings", action="store_true")
p.add_argument("--adapter_rank", type=int, default=0, help="per-call adapters (trm/adapters.py)")
p.add_argument("--vocab_size", type=int, default=16000)
p.add_argument("--arch", choices=("trm", "gpt"), default="trm")
p.add_argument("--qk_norm", action="store_true")
p.add_argument("--zero_init", action="store_true")
p.add_argument("--dropout", type=float, default=0.1, help="the seed's; the races train with 0")
p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
p.add_argument("--muon_ns_steps", type=int, default=trainer_parser().get_default("muon_ns_steps"),
               help="as the trainer's: Newton-Schulz iterations of Muon")
p.add_argument("--compile", choices=("off", "on", "graphs"), default="off")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--threads", type=int, default=0)
p.add_argument("--loop_steps", type=int, default=0,
               help="also time N steps taken as the trainer's loop takes them (a fresh pinned batch, the rate set, "
                    "the finite check, the loss sum), then the same with a checkpoint every --save_every steps")
p.add_argument("--save_every", type=int, default=100)
p.add_argument("--whole_graph", action="store_true",
               help="CUDA: the trainer's --compile whole, the whole step (forward, backward, clipping, the "
                    "optimizer, the EMA) as one CUDA graph, timed by its replays: against --compile graphs, which "
                    "captures the forward and backward only (issue 20: the procedure's batch 4)")
p.add_argument("--overlap_eval", action="store_true",
               help="CUDA: one evaluation alone, then beside the steps on a second stream: what it costs them")
p.add_argument("--background_compile", action="store_true",
               help="CUDA, --whole_graph: the compiled evaluation's compile on a thread beside the steps: what it costs")
p.add_argument("--switch_interval", type=float, default=0.0,
               help="with --background_compile: Python's thread switch interval in seconds while it compiles")
args = p.parse_args()
if args.whole_graph and (args.compile == "graphs" or args.loop_steps):
    sys.exit("error: --whole_graph takes --compile off or on (the model is compiled inside the graph), without "
             "--loop_steps")
if args.whole_graph and args.optimizer == "muon" and args.compile == "off":  # (Muon's stacks follow the compile)
    sys.exit("error: --whole_graph with --optimizer muon takes --compile on, as the trainer's --compile whole")
if args.threads:
    torch.set_num_threads(args.threads)

device, amp, why = pick_device(args.device)
if args.whole_graph and device.type != "cuda":
    sys.exit("error: --whole_graph captures CUDA graphs: it needs a CUDA device")
if args.overlap_eval and device.type != "cuda":
    sys.exit("error: --overlap_eval runs the evaluation on a second CUDA stream: it needs a CUDA device")
if args.background_compile and not args.whole_graph:
    sys.exit("error: --background_compile compiles beside the replays of --whole_graph: add it (and a CUDA device)")
if args.switch_interval < 0:
    sys.exit("error: --switch_interval is a number of seconds > 0 (or 0 for Python's own)")
try:  # (a shape the model refuses, e.g. --d_model 100 --n_heads 3: its reason in one line, not a traceback)
    cfg = TRMConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                    max_seq_len=args.max_seq_len, arch=args.arch, supervision_steps=args.supervision_steps,
                    grad_deep_steps=args.grad_deep_steps, qk_norm=args.qk_norm, zero_init=args.zero_init,
                    dropout=args.dropout, latent_steps=args.latent_steps, deep_steps=args.deep_steps,
                    tie_embeddings=args.tie_embeddings, adapter_rank=args.adapter_rank)
except ValueError as e:
    sys.exit(f"error: {e}")
raw = TRM(cfg).to(device)
# the trainer's optimizer, rate and weight decay of the races (the step's time does not depend on them), every other
# optimizer flag at the trainer's default (parsed, so a new one cannot go missing here)
opt_args = trainer_parser().parse_args(["--optimizer", args.optimizer, "--lr", "1e-3", "--weight_decay", "0.1",
                                        "--muon_ns_steps", str(args.muon_ns_steps)])
if problem := check_flags(opt_args):
    sys.exit(f"error: {problem}")
opt = build_optimizer(raw, opt_args, device)
ema = EMA(raw, 0.995)
graphs = args.compile == "graphs" and device.type == "cuda"
model = raw
if args.compile != "off":  # as the trainer does under --compile: the model, and Muon's step
    model = torch.compile(raw, mode="reduce-overhead" if graphs else None)
    if args.optimizer == "muon":  # captured whole as under the trainer's --compile whole: its wide shapes stay apart
        opt.muon.compile(graphed=args.whole_graph)
x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.max_seq_len), device=device)
# targets a tensor of their own, as the trainer's. With one tensor for both, --whole_graph compiled again inside its
# capture, which CUDA refused (an H100, 2026-12-06), most likely because the warm-ups compiled for aliased inputs and
# the capture passes two buffers
y = torch.roll(x, -1, 1)
tokens = args.batch_size * args.max_seq_len
flops = raw.flops_per_token(args.max_seq_len) * tokens
whole = None  # --whole_graph: the trainer's --compile whole step (trm/whole_step.py), warmed up and captured below
if args.whole_graph:
    whole = WholeStep(model, raw, opt, ema, 1.0, amp, torch.zeros((), device=device),
                      torch.zeros((), device=device, dtype=torch.bool), {})


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(times=None):
    """One training step as the trainer's loop takes it; with `times`, synced after each phase and timed."""
    stamps = [time.perf_counter()]

    def lap():  # the end of a phase, when timing phases
        if times is not None:
            sync()
            stamps.append(time.perf_counter())

    if whole is not None:  # one replay: its phases cannot be told apart
        whole.step(x, y, 1e-3, {})
        lap()
        if times is not None:
            times.setdefault("replay", []).append(stamps[1] - stamps[0])
        return
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(device, amp):
        _, loss = model(x, y)
    lap()
    loss.backward()
    lap()
    torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    lap()
    ema.update(raw)
    lap()
    if times is not None:
        for k, t0, t1 in zip(("forward", "backward", "optimizer", "ema"), stamps, stamps[1:]):
            times.setdefault(k, []).append(t1 - t0)


for _ in range(3 + (WARMUP + 1 if whole is not None else 0)):  # warm-up: compilation, CUDA graph capture, allocator
    step()
sync()
times = {}
for _ in range(args.steps):
    step(times)
med = {k: statistics.median(v) for k, v in times.items()}
total = sum(med.values())
print(f"# {device} ({why}), torch {torch.__version__}, threads {torch.get_num_threads()}; {cfg.arch} d_model "
      f"{cfg.d_model} n_layers {cfg.n_layers} vocab {cfg.vocab_size}, batch {args.batch_size} x {args.max_seq_len}, "
      f"{raw.flops_per_token(args.max_seq_len) / 1e6:.1f} MFLOP/token, {args.optimizer}"
      f"{f' ({args.muon_ns_steps} Newton-Schulz iterations)' if args.optimizer == 'muon' else ''}, --compile "
      f"{'whole' if args.whole_graph else args.compile}")
print(f"{'phase':<10} {'ms':>9} {'share':>7}   (each phase synced)")
for k, v in med.items():
    print(f"{k:<10} {1000 * v:>9.1f} {100 * v / total:>6.1f}%")
print(f"{'step':<10} {1000 * total:>9.1f}  -> {tokens / total:,.0f} tokens/s, {flops / total / 1e9:.1f} GFLOP/s")


def whole_steps(n, one_step=step):
    """Seconds a step over n of them, synced only at both ends, as the trainer's loop runs."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        one_step()
    sync()
    return (time.perf_counter() - t0) / n


wall = statistics.median(whole_steps(args.steps) for _ in range(3))
peak = peak_flops(device)
print(f"\nwhole step, no sync inside (median of 3 x {args.steps}): {1000 * wall:.2f} ms, {tokens / wall:,.0f} tokens/s"
      + (f", MFU {100 * flops / wall / peak:.1f}%" if peak else ""))
if device.type == "cuda":  # what --compile graphs costs in memory (its static buffers and pool) against on
    print(f"GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated at most, "
          f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved at most")

if args.overlap_eval or args.background_compile:
    # one of the trainer's evaluations (the procedure's 512 windows) of a copy of the weights, as the trainer scores the
    # EMA's model, not weights the steps update
    import copy
    import threading

    snapshot = copy.deepcopy(raw).eval()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (512, args.max_seq_len + 1), generator=g)
    token_bytes = torch.randint(1, 4, (cfg.vocab_size,), generator=g)

if args.overlap_eval:
    # The trainer evaluates between two steps while training waits: 21 of the 218 s of the procedure's 50,000 steps
    # (BENCHMARKS.md, "The procedure's whole run"). At batch 4 a step fills a small part of the GPU, so an evaluation
    # on a second stream, launched from a second thread, might run beside the steps for less than its own time.
    side = torch.cuda.Stream()

    def side_eval(done=None):
        with torch.cuda.stream(side):
            evaluate(snapshot, windows, token_bytes, 256, device, amp, head_windows=64)  # (ends synced: .item())
        if done is not None:
            done.set()

    side_eval()  # allocations, cuBLAS's choices
    t = time.perf_counter()
    side_eval()
    alone = time.perf_counter() - t
    # Both streams at the default priority, then the steps on a high-priority stream: the block scheduler gives its
    # kernels the next free SMs, so the evaluation's wide kernels (131k tokens a batch) delay the steps' narrow ones
    # less, and fill what they leave.
    for what, stream in (("same priority", None), ("steps at high priority", torch.cuda.Stream(priority=-1))):
        done = threading.Event()
        thread = threading.Thread(target=side_eval, args=(done,))
        sync()
        t = time.perf_counter()
        thread.start()
        n = 0
        with torch.cuda.stream(stream):  # (None: the current stream)
            while not done.is_set():
                step()
                n += 1
        sync()
        both = time.perf_counter() - t
        thread.join()
        cost = both - n * wall  # the steps' time beyond what they take alone
        print(f"evaluation alone: {1000 * alone:.1f} ms; beside the steps ({what}): {n} steps and the evaluation in "
              f"{1000 * both:.1f} ms against {1000 * n * wall:.1f} ms for the steps alone, so it cost the steps "
              f"{1000 * cost:.1f} ms ({100 * cost / alone:.0f}% of its time alone)")

if args.background_compile:
    # The compiled evaluation is 2.8x faster a call than the eager one the trainer runs (70 against 195 ms on an H100),
    # but its cold compile (20 s) is more than that saves over the procedure's 100 evaluations (BENCHMARKS.md). On a
    # thread of its own while the graph replays, the compile would cost training only what it takes from the loop: the
    # interpreter's lock (the loop's Python waits up to a switch interval for it), the CPU, and the first call's run on
    # the GPU. Measured here before the trainer does it.
    loader = PackedLoader(np.random.default_rng(0).integers(0, cfg.vocab_size, 4_000_000, dtype=np.uint16),
                          args.max_seq_len, args.batch_size)

    def loop_step():  # the trainer's host work a step under --compile whole: the batch, pinned and copied; a replay
        xb, yb = loader.next_batch()
        whole.step(xb.pin_memory().to(device, non_blocking=True), yb.pin_memory().to(device, non_blocking=True),
                   1e-3, {})

    whole_steps(100, loop_step)  # the loader's first batches, pinned memory
    per_step = statistics.median(whole_steps(1000, loop_step) for _ in range(3))
    compiled = {}

    def compile_eval():  # one batch: the first call compiles for the trainer's 256 windows a batch
        t0 = time.perf_counter()
        with torch.cuda.stream(torch.cuda.Stream()):
            evaluate(snapshot, windows[:256], token_bytes, 256, device, amp, head_windows=64, compiled=True)
        compiled["seconds"] = time.perf_counter() - t0

    python_interval = sys.getswitchinterval()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    thread = threading.Thread(target=compile_eval)
    sync()
    t0 = time.perf_counter()
    thread.start()
    n = 0
    while thread.is_alive():
        loop_step()
        n += 1
    sync()
    beside = time.perf_counter() - t0
    thread.join()
    sys.setswitchinterval(python_interval)
    if "seconds" not in compiled:
        sys.exit("error: the compile on the second thread failed (its traceback is above)")
    lost = beside - n * per_step

    def eval_seconds(**kw):  # the best of 3, after one to warm up (each ends synced: it reads its sums)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            evaluate(snapshot, windows, token_bytes, 256, device, amp, head_windows=64, **kw)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    eager, fused = eval_seconds(), eval_seconds(compiled=True)
    saved = eager - fused
    print(f"\nthe trainer's loop alone: {1000 * per_step:.2f} ms a step, {tokens / per_step:,.0f} tokens/s")
    print(f"the evaluation's compile on a second thread (switch interval "
          f"{1000 * (args.switch_interval or python_interval):g} ms): "
          f"{compiled['seconds']:.1f} s, beside {n:,} steps at {tokens * n / beside:,.0f} tokens/s: training lost "
          f"{lost:.1f} s ({100 * lost / beside:.0f}% of that time)")
    print(f"an evaluation (512 windows, 256 a batch): eager {1000 * eager:.1f} ms, compiled {1000 * fused:.1f} ms, "
          f"{1000 * saved:.1f} ms saved each: " + (f"the compile beside training pays back after "
                                                    f"{max(lost, 0) / saved:.0f} evaluations" if saved > 0 else
                                                    "the compiled one is not faster"))

if args.loop_steps:
    # The trainer's loop (train_trm_lm.py) does a little more each step than step() above, and saves in the background
    # every so often. At the procedure's batch 4 the step is ~3 ms on an H200, so each of these can show: on the GPU
    # the step above ran at 642k tokens/s and the trainer's logged windows at 450-585k (BENCHMARKS.md).
    loader = PackedLoader(np.random.default_rng(0).integers(0, cfg.vocab_size, 4_000_000, dtype=np.uint16),
                          args.max_seq_len, args.batch_size)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    loss_sum = torch.zeros((), device=device)
    save_dir = tempfile.mkdtemp(prefix="step_profile_")
    saver = Saver(RunDir(save_dir, keep_last=2, log=lambda line: None), log=lambda line: None)

    def loop_step(n):
        xb, yb = loader.next_batch()
        if device.type == "cuda":  # as the trainer's next_batch: pinned, so the copies are asynchronous
            xb, yb = xb.pin_memory(), yb.pin_memory()
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 - n / args.loop_steps)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp):
            _, loss = model(xb, yb)
        loss.backward()
        loss_sum.add_(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        bad.logical_or_(~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(raw)
        saver.poll()

    def timed_loop(save_every):
        stalls = 0.0
        sync()
        t0 = time.perf_counter()
        for n in range(args.loop_steps):
            loop_step(n)
            if save_every and (n + 1) % save_every == 0:
                t = time.perf_counter()  # the trainer's "saving" pause: the copy into pinned memory, not the write
                saver.save({"model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                            "step": n + 1}, f"step_{n + 1}.pt", quiet=True)
                stalls += time.perf_counter() - t
        sync()
        return time.perf_counter() - t0, stalls

    timed_loop(0)  # warm-up: the new input shapes and strides, pinned buffers
    for save_every in (0, args.save_every):
        seconds, stalls = timed_loop(save_every)
        trained = seconds - stalls
        print(f"the trainer's loop, {args.loop_steps} steps" +
              (f", a checkpoint every {save_every} ({stalls:.2f} s of copying excluded)" if save_every else "") +
              f": {1000 * trained / args.loop_steps:.2f} ms a step, {tokens * args.loop_steps / trained:,.0f} tokens/s")
    saver.close()
    shutil.rmtree(save_dir, ignore_errors=True)

if device.type == "cuda":
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        profiled = whole_steps(args.steps)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    busy = sum(e.device_time for e in kernels) / 1e6 / args.steps
    idle = max(wall - busy, 0.0)
    print(f"profiled: {1000 * profiled:.2f} ms a step (the profiler's own cost included), "
          f"{len(kernels) / args.steps:.0f} kernels, busy {1000 * busy:.2f} ms, idle {1000 * idle:.2f} ms of the "
          f"unprofiled {1000 * wall:.2f} ({100 * idle / wall:.0f}%): "
          + ("host-bound" if idle > 0.2 * wall else "bound by its kernels"))
    by_name = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time
    busy_us = sum(us for _, us in by_name.values())
    print("\n| kernel | calls per step | us per call | share of busy |")
    print("|---|---|---|---|")
    for name, (calls, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"| {name[:90]} | {calls / args.steps:.1f} | {us / calls:.1f} | {100 * us / busy_us:.1f}% |")
else:
    with torch.profiler.profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
