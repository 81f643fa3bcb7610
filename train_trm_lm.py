r"""Step 3: train a Generative TRM on JSONL.GZ files.

    python train_trm_lm.py --tokenizer sentencepiece --sp_model ja_trm.model \
        --train_paths train_{0..10}.jsonl.gz --valid_paths validation_0.jsonl.gz \
        --save_dir checkpoints_new --batch_size 4 --max_seq_len 512 --max_steps 50000 --eval_every 500 --log_every 100

More GPUs: torchrun --nproc_per_node=N train_trm_lm.py ... (--batch_size is per GPU; the global batch is
batch_size x grad_accum x N sequences). Resume: add --resume auto (the newest readable checkpoint in --save_dir).
A --save_dir belongs to one run: a new run there is refused unless --overwrite (which moves the old files aside).

Deep supervision update rule: each step runs all supervision rounds on the batch and takes ONE optimizer step on the
mean of the rounds' losses. y and z are detached between rounds, so this equals accumulating the rounds' gradients
(the paper instead steps the optimizer after every round: N_sup times the optimizer work and a different effective
learning rate, with no measured gain for language modeling here; see README).
"""
import os
import random
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from trm.checkpoint import CheckpointError
from trm.cli import fail, fail_once, one_line_when_a_peer_is_lost, quiet_interrupt
from trm.clock import RunClock, hms
from trm import depth as depth_schedule
from trm.corpus import unique_paths, validation_in_training
from trm.data import CacheWriteError, DataError, PackedLoader, check_cache_dir, check_paths, eval_windows, load_corpora
from trm.device import (bytecode_note, compile_training, distributed, end_processes, pick_device, start_processes,
                        training_out_of_memory)
from trm.ema import EMA
from trm.evaluate import compile_blocks, describe, evaluate, slow_note, trainer_batch, unknown_note
from trm.flags import ARCH_FLAGS, check_flags, choose_compile, not_compilable, trainer_parser
from trm.guard import CollapseGuard, last_good_checkpoint, unigram_entropy
from trm.metrics import MetricsLog, peak_flops, resumed_log
from trm.model import TRM, TRMConfig
from trm.optim import build_optimizer, describe as describe_optimizer
from trm.resume import (every_rank_rng, keep_checkpoint_settings, resume_error, restore, rng_state, run_ended,
                        schedule_changes)
from trm.run_dir import RunDir, SaveDirError, disk_warning, open_save_dir, resume_advice, take_ownership
from trm.saver import Saver
from trm.schedule import budget_warning, lr_at, warmup_warning
from trm.tokenizer import Tokenizer, TokenizerError
from trm.step import EagerStep
from trm.whole_step import WholeStep, refusal as whole_step_refusal

p = trainer_parser(__doc__)
args = p.parse_args()
quiet_interrupt()  # until the loop's own Ctrl-C handling (clock.catch_signals) takes over
t_process = time.time()  # the wall clock of the summary line
# log lines reach `> train.log` as they happen, not in 8 KB blocks; a file name that is not UTF-8 (or a terminal that is
# not) prints escaped instead of ending the run
sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")


if problem := check_flags(args, int(os.environ.get("WORLD_SIZE", "1"))):
    fail_once(problem)  # (every process of a torchrun has the same command line: one says it)

# ----------------------------------------------------------------------------------------------------------------
# setup: processes, device, tokenizer, the checkpoint to resume, the configuration, data, model, optimizer
device, amp_dtype, device_why = pick_device(args.device, args.dtype)
world_size, rank, device = start_processes(device)
ddp, master = world_size > 1, rank == 0


def log(msg):
    if master:
        tqdm.write(msg)  # above the progress bar, when there is one


if ddp:  # a rank that dies ends the run with one line, not a traceback from every other rank
    one_line_when_a_peer_is_lost(master, lambda: run_dir.survivor() if "run_dir" in globals() else
                                 "no checkpoint of this run was saved yet", args.save_dir,
                                 resume_advice(args.overwrite))


log(f"device: {device} ({device_why})" + (f", {world_size} processes" if ddp else ""))
if note := bytecode_note():
    log(f"note: {note}")
if warning := warmup_warning(args.lr, args.warmup_steps, args.max_steps):
    log(f"warning: {warning}")
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.save_dir)), "token_cache")
try:
    tokenizer = Tokenizer.from_args(args.tokenizer, args.sp_model)
    args.train_paths, args.valid_paths = check_paths(args.train_paths, "train"), check_paths(args.valid_paths, "valid")
    for name in ("train_paths", "valid_paths"):  # a file named twice would count its documents twice
        setattr(args, name, unique_paths(getattr(args, name), name, log))
    if warning := validation_in_training(args.train_paths, args.valid_paths):
        log(f"warning: {warning}")
    if master:  # (the other ranks only read it)
        check_cache_dir(cache_dir)
except (TokenizerError, DataError) as e:
    fail(str(e))
log(f"tokenizer: {args.tokenizer}" + (f" {args.sp_model}" if args.tokenizer == "sentencepiece" else "") +
    f", vocab {tokenizer.vocab_size:,}, fingerprint {tokenizer.fingerprint()}")

# The save dir is this run's alone (trm/run_dir.py): rank 0 locks it, removes partial files of killed trainers and
# picks the checkpoint to resume; all of it, and the configuration, is settled before the corpus is tokenized.
run_id = None
try:
    lock, ckpt, ckpt_path = open_save_dir(args.save_dir, args.resume, log, ddp, master)
except (SaveDirError, CheckpointError) as e:
    fail(str(e))
if ckpt is not None:
    log(f"resuming from {ckpt_path} (step {ckpt['step']})")
    if changes := schedule_changes(ckpt, args):
        log(f"note: {changes}")
    if problem := resume_error(ckpt, ckpt_path, tokenizer, args):
        fail_once(problem)
    if ended := run_ended(ckpt, ckpt_path, args):  # a finished run resumed (--resume auto again): said, not redone
        log(ended)
        end_processes(0, ddp)  # (every rank is here: the same checkpoint)
try:
    config = TRMConfig(**ckpt["config"]) if ckpt is not None else \
        TRMConfig(vocab_size=tokenizer.vocab_size, halt_head=args.act_weight > 0,
                  **{name: getattr(args, name) for name in ARCH_FLAGS})
except (ValueError, TypeError) as e:
    fail(str(e))

keep_checkpoint_settings(args, p, config, ckpt, log)
if args.act_weight and not (config.halt_head and config.recursive):
    fail_once("--act_weight needs --arch trm and, when resuming, a checkpoint that was trained with a halting head")
if master:
    try:
        run_id = take_ownership(args.save_dir, ckpt, ckpt_path, args.resume, args.overwrite, log, vars(args))
    except SaveDirError as e:
        fail(str(e))
    except OSError as e:  # run.json on a full disk: the old one stays (AtomicFile)
        fail(f"could not write {e.filename or args.save_dir}: {e.strerror or e}; nothing was trained. Free some space "
             f"(or fix the folder), then run the same command again.", 1)
if args.resume == "auto" and ckpt is None:  # (said only now that the folder is this run's: it really starts)
    log(f"--resume auto: no checkpoint in {args.save_dir}, starting from scratch")
L = config.max_seq_len
tokens_per_step = args.batch_size * L * args.grad_accum * world_size
halt_args = {"act_weight": args.act_weight, "halt_threshold": args.train_halt_threshold}  # the head and its use

try:
    train_tokens, valid_tokens = load_corpora(args.train_paths, args.valid_paths, tokenizer, cache_dir,
                                              args.text_field, args.num_workers or os.cpu_count(), log, ddp, master)
except DataError as e:
    fail(str(e), 1 if isinstance(e, CacheWriteError) else 2)
except KeyboardInterrupt:  # (Ctrl-C is the trainer's own only from the loop on: clock.catch_signals)
    fail_once("interrupted while tokenizing the corpus: nothing was trained and nothing lost (a partial token cache "
              "is removed). Run the same command again to start.", 130)
loader = PackedLoader(train_tokens, L, args.batch_size, args.seed, rank, world_size)
val_windows = eval_windows(valid_tokens, L, args.eval_tokens) if valid_tokens is not None else None
token_bytes = tokenizer.token_bytes()
data_line, short = loader.describe(tokens_per_step)
log(f"data: {data_line}" + (f"; {val_windows.shape[0]} validation windows" if val_windows is not None else ""))
if val_windows is not None and (note := unknown_note(val_windows, tokenizer)):
    log(f"note: validation: {note}")
if short:
    log(f"warning: {short}")

torch.manual_seed(args.seed)  # identical initial weights on every rank
model = TRM(config).to(device)
flops_per_token = model.flops_per_token(L, reembed=args.sup_update == "each")
log(f"model: {config.arch}, {model.num_params():,} parameters ({model.num_params(non_embedding=True):,} without "
    f"embeddings), {model.net_calls()} net call{'s' * (model.net_calls() != 1)} per token, "
    f"{flops_per_token / 1e6:.1f} MFLOP per training token")
optimizer = build_optimizer(model, args, device)
ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
checkpoint_bytes = 4 * model.num_params() * (4 if ema is not None else 3)  # fp32 weights, Adam's 2 moments, EMA
n_kept = args.keep_last + 2 if args.keep_last else args.max_steps // (args.save_every or args.eval_every) + 1
if master and (warning := disk_warning(args.save_dir, shutil.disk_usage(args.save_dir).free, checkpoint_bytes, n_kept)):
    log(f"warning: {warning}")
step, tokens_seen, last_eval = 0, 0, None
if ckpt is not None:
    step, tokens_seen, last_eval, rng_restored = restore(ckpt, model, optimizer, ema, loader, device, rank, world_size)
    if not rng_restored:  # written by another number of processes: distinct dropout per rank all the same
        torch.manual_seed(args.seed + 1000 * rank + step)
else:
    torch.manual_seed(args.seed + rank)  # distinct dropout noise per rank
    random.seed(args.seed + rank)

raw_model = model  # what gets saved, evaluated and sampled; never the compiled or DDP wrapper
if config.halt_head and not args.act_weight:  # a halting checkpoint resumed without --act_weight: no loss reaches the
    raw_model.halt.requires_grad_(False)  # head, and DDP, waiting for its gradient, would end the run at step 2
compile_mode, why = choose_compile(args.compile, device.type, args.batch_size * L, not_compilable(args),
                                   whole_step_refusal(args, world_size))
use_compile, cuda_graphs = compile_mode != "off", compile_mode == "graphs"
log(f"compile: {why}")
if ddp:
    model = distributed(model, device)
if use_compile:
    model = compile_training(model, optimizer, compile_mode, config.deep_steps)
log(f"optimizer: {describe_optimizer(optimizer, args.batch_size * L * args.grad_accum, flops_per_token)}")
compiled_eval = use_compile and device.type == "cuda" and ema is not None and val_windows is not None
if compiled_eval:
    # the evaluation's blocks fused (trm/evaluate.py): one block's compile at the first evaluation, then each takes half
    # the eager time (the procedure's 100: 21.1 s -> 12.9 s on an H100, BENCHMARKS.md, issue 20); its head's loss too
    # (run_eval: 96 -> 76 ms an evaluation). The EMA's copy only: the trained model is compiled above, as the step
    compile_blocks(ema.model)
    log("compile: the evaluation's blocks too, and its head's loss (the EMA's copy), at the first evaluation")
step_flops = {}  # a step's FLOPs at each depth it runs (--depth_warmup and --random_depth change it step by step)


def flops_at(depth):
    key = tuple(sorted(depth.items()))
    if key not in step_flops:
        step_flops[key] = raw_model.flops_per_token(L, reembed=args.sup_update == "each", **depth) * tokens_per_step
    return step_flops[key]


peak = peak_flops(device)

# ----------------------------------------------------------------------------------------------------------------
# the run's state and the few things the loop does besides stepping: evaluate, save, check, time
eval_weights = "EMA" if ema is not None else "raw"  # the weights run_eval scores: --ema_decay 0 keeps no EMA
run_dir = RunDir(args.save_dir, args.keep_last, log, ckpt_path, ckpt.get("best") if ckpt is not None else None,
                 args.overwrite)
metrics = MetricsLog(args.save_dir, f"{config.arch} d_model={config.d_model} n_layers={config.n_layers}",
                     f"validation loss ({eval_weights} weights)", args.tensorboard)
if master:
    try:  # rewritten whole on a resume: a nearly full disk fails here first (the old log stays, AtomicFile)
        metrics.start(step if ckpt is not None else None, resumed_log(ckpt_path, args.save_dir))
    except OSError as e:
        fail(run_dir.failure(e, metrics.path, step), 1)
clock = RunClock(ckpt.get("train_seconds", 0.0) if ckpt is not None else 0.0,  # --max_minutes counts across resumes
                 args.max_minutes, ddp, master, device)
save_every = args.save_every or args.eval_every
# the loop only copies the state to CPU memory; a background thread writes it (trm/saver.py)
saver = Saver(run_dir, log, on_error=lambda message: fail(message, 1))
bad = torch.zeros((), device=device, dtype=torch.bool)  # sticky: any non-finite loss or grad since the last check
loss_sum = torch.zeros((), device=device)
loss_count = 0
if ckpt is not None and ckpt.get("loss_window") and not ddp:
    loss_sum += ckpt["loss_window"][0]
    loss_count = ckpt["loss_window"][1]
# --compile whole: the step as one CUDA graph (trm/whole_step.py), its optimizer made capturable after restore()
whole = (WholeStep(model, raw_model, optimizer, ema, args.grad_clip, amp_dtype, loss_sum, bad, halt_args)
         if compile_mode == "whole" else None)
eager = EagerStep(model, raw_model, optimizer, ema, args, amp_dtype, loss_sum, bad, halt_args, cuda_graphs)
guarded = args.collapse_guard == "on" and val_windows is not None  # the same on every rank; rank 0 judges
# a resumed guard starts from the best it can know: best.pt's, or, inside a depth warm-up (whose shallow scores best.pt
# does not keep), the resumed checkpoint's own evaluation, which the guard passed
shallow = last_eval.get("eval_depth") if last_eval else None
guard = CollapseGuard(unigram_entropy(train_tokens, tokenizer.vocab_size), args.warmup_steps,
                      last_eval["loss"] if shallow else run_dir.best.get("loss"), step, tokens_seen=tokens_seen,
                      depth=shallow) if guarded and master else None
if guard is not None:
    log(f"collapse guard: {guard.describe()}")


def checkpoint_state(rng_ranks=None):
    return {"config": config.to_dict(), "model": raw_model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
            "step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(),
            "rng": rng_state(device), "rng_ranks": rng_ranks,
            "args": vars(args), "tokenizer": tokenizer.to_state(), "metrics": last_eval,
            "train_seconds": clock.seconds(), "run_id": run_id,
            # the log's open window (a save off a log step): a resume logs the same losses (one process; under DDP the
            # window is each rank's own and starts afresh)
            "loss_window": None if ddp else [loss_sum.item(), loss_count]}


def evaluated_now():
    """Whether last_eval scored these very weights (the step's own evaluation, or the resumed checkpoint's)."""
    return last_eval is not None and last_eval["step"] == step


def save(name, rng_ranks, quiet=False):
    full_depth = evaluated_now() and "eval_depth" not in last_eval  # a shallow score is not the saved model's
    return saver.save(checkpoint_state(rng_ranks), name, last_eval["loss"] if full_depth else None, quiet)


def run_eval():
    trained = round(clock.seconds(), 2)  # read before scoring: the pause around this call has only just begun
    # (under --compile on CUDA the EMA's blocks and the head's loss are compiled, above; evaluate(compiled=True), the
    # whole recursion as one graph, is faster a call but its compile costs more than it saves in the procedure's run:
    # BENCHMARKS.md, issue 20)
    started = time.perf_counter()
    result = evaluate(ema.model if ema is not None else raw_model, val_windows, token_bytes, device=device,
                      amp_dtype=amp_dtype, compiled_head=compiled_eval, **trainer_batch(device), **eval_depth)
    # its own seconds (it ends synced, reading its sums): what one costs, apart from the curves drawn after it
    result.update(step=step, kind="eval", tokens_seen=tokens_seen, train_seconds=trained,
                  seconds=round(time.perf_counter() - started, 3))
    if eval_depth:
        result["eval_depth"] = dict(eval_depth)
    metrics.append(result)
    metrics.plot()
    return result


said = set()  # the keys of the one-time warnings already given


def say_once(key, text):
    """A warning or hint worth one line, not one per evaluation or log step."""
    if text and key not in said:
        said.add(key)
        log(text if text.startswith("note") else f"warning: {text}")


def check_finite():
    """Stop before a non-finite loss or gradient reaches a checkpoint (the last good one stays intact)."""
    if ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        saver.wait()  # the write in flight decides which checkpoint is the last good one
        # (once: rank 0, which saves, knows which checkpoint survived; another rank would say "none saved yet")
        fail_once(f"non-finite loss or gradient before step {step}: stopping without saving; {run_dir.survivor()}. "
                  f"Try a lower --lr or more --warmup_steps" + (f", then {run_dir.advice}." if run_dir.saved else "."),
                  3)


def judge(result):
    """The collapse guard's verdict on an evaluation (rank 0)."""
    if guard is not None and (line := guard.observe(step, tokens_seen, result["loss"], result.get("eval_depth"))):
        log(line if line.startswith("note") else f"warning: {line}")


def collapse_error():
    saver.wait()  # a write in flight may be the last good checkpoint the message names
    return guard.message(args.lr, last_good_checkpoint(run_dir.saved, guard.last_good_step, args.save_dir))


def stop_if_collapsed():
    """A collapsed run stops before its weights reach a checkpoint, with exit code 3 as a non-finite one: rank 0
    judged, every rank stops."""
    collapsed = torch.tensor(guard is not None and guard.collapsed, device=device)
    if ddp:
        dist.broadcast(collapsed, 0)
    if collapsed.item():  # (rank 0 knows the last good checkpoint; the others wait for its line: fail_once)
        fail_once(collapse_error() if master else None, 3)


def next_batch():
    x, targets = loader.next_batch()
    if device.type == "cuda":  # pinned, so the copy is asynchronous and the CPU runs ahead of the GPU
        x, targets = x.pin_memory(), targets.pin_memory()
    return x.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def abort():  # a second Ctrl-C: stop now, the write in flight given up
    saver.abort(master, f"error: interrupted twice: stopped at step {step} without saving it; {run_dir.survivor()}. "
                        f"Continue with {run_dir.advice}.")


clock.catch_signals(log, on_abort=abort)

# ----------------------------------------------------------------------------------------------------------------
# training loop
bar = tqdm(total=args.max_steps, initial=step, desc="train", unit="step", disable=not master or None,
           dynamic_ncols=True, leave=False)
clock.start()
start_step = step
seconds_at_log, tokens_at_log, steps_at_log, seconds_at_eval = 0.0, tokens_seen, step, 0.0
flops_at_log = 0.0  # the FLOPs of the steps since the last log line, each at its own depth
# the depth the evaluations score: the one the last step trained at (--depth_warmup's shallow start, then the
# configured one; before the loop, that of the step before this one, for a resumed run with no steps left)
eval_depth = depth_schedule.trained_depth(config, args.random_depth, args.depth_warmup,
                                          max(max(step - 1, 0) / args.max_steps, clock.budget_frac))
if master and depth_schedule.trained_depth(config, args.random_depth, args.depth_warmup, 0):
    log(f"note: --depth_warmup {args.depth_warmup:g}: 1 deep step a round until that share of the run" +
        (", and the evaluations meanwhile score that depth (best.pt keeps only full-depth ones)"
         if val_windows is not None else "") + "; a checkpoint from the warm-up samples with generate.py --deep_steps 1")
model.train()
try:
    while step < args.max_steps and not clock.out_of_time():
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.lr_schedule, clock.budget_frac,
                   args.lr_cooldown)
        progress = max(step / args.max_steps, clock.budget_frac)
        depth = depth_schedule.for_step(config, args.random_depth, args.depth_warmup, args.seed, step, progress)
        eval_depth = depth_schedule.trained_depth(config, args.random_depth, args.depth_warmup, progress)
        flops_at_log += flops_at(depth)
        if whole is not None:  # the whole step, EMA included, as one graph; it writes the rate into a device tensor
            whole.step(*next_batch(), lr, depth)
            loss_count += 1
        else:  # trm/step.py: either update rule, over --grad_accum micro-batches
            loss_count += eager.step(next_batch, lr, depth)
        step += 1
        tokens_seen += tokens_per_step
        bar.update(1)
        saver.poll()  # the background write's lines, and its failure, between steps
        # read before the log line: a run stopped by its budget or a signal logs its last stretch's loss too
        stop = clock.should_stop(step)

        if step % args.log_every == 0 or step == args.max_steps or stop:
            check_finite()  # .item() forces a CPU-GPU sync; only on log steps
            if ddp:
                dist.all_reduce(loss_sum)  # the global batch's loss, not rank 0's share (SUM: older gloo has no AVG)
                loss_sum /= world_size
            train_loss = loss_sum.item() / loss_count
            loss_sum.zero_()
            loss_count = 0
            dt = max(clock.session_seconds() - seconds_at_log, 1e-9)  # training time only: evaluations excluded
            tok_s = (tokens_seen - tokens_at_log) / dt
            mfu = flops_at_log / dt / world_size / peak if peak else None
            ahead = depth_schedule.flops_ahead(config, args.random_depth, args.depth_warmup, step, args.max_steps,
                                               flops_at)  # (inside --depth_warmup the steps ahead cost more)
            eta = clock.eta(args.max_steps - step, dt / max(step - steps_at_log, 1) if ahead is None else
                            dt / max(flops_at_log, 1.0) * ahead / max(args.max_steps - step, 1))  # wall seconds
            if args.max_minutes and steps_at_log > start_step:  # (not from the first window: it holds compilation)
                say_once("budget", budget_warning(step, args.warmup_steps, (step - steps_at_log) / dt,
                                                  clock.budget_left()))
            seconds_at_log, tokens_at_log, steps_at_log, flops_at_log = clock.session_seconds(), tokens_seen, step, 0.0
            if master:
                metrics.append({"step": step, "kind": "train", "loss": train_loss, "lr": lr, "tok_s": tok_s,
                                "tokens_seen": tokens_seen, "epoch": loader.epoch,
                                "train_seconds": round(clock.seconds(), 2)})
                log(f"step {step:>6}/{args.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                          f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "") +
                          f" | epoch {loader.epoch:.2f} | ETA {hms(eta)}")
        if master and val_windows is not None and step % args.eval_every == 0 and step < args.max_steps:
            if device.type == "cuda":  # the steps still queued on the GPU (off a log step) are training, not the pause's
                torch.cuda.synchronize(device)
            trained = clock.session_seconds() - seconds_at_eval
            with clock.pause("evaluating"):  # evaluation time is neither training throughput nor --max_minutes
                last_eval = r = run_eval()
            seconds_at_eval = clock.session_seconds()
            log(f"eval  {step:>6} | {describe(r, short=True)}")
            judge(r)
            if device.type == "cpu":  # (the pause also holds a drawing of the curves)
                say_once("eval", slow_note(r["seconds"], trained, args.eval_tokens, args.eval_every))
        if guarded and step % args.eval_every == 0 and step < args.max_steps:
            stop_if_collapsed()
        if step % save_every == 0 and step < args.max_steps:
            check_finite()
            rng_ranks = every_rank_rng(device, world_size)  # (every rank, before rank 0 alone saves)
            if master and not (guard is not None and guard.suspect):  # an evaluation clears the weights first
                with clock.pause("saving"):
                    save(f"step_{step}.pt", rng_ranks)
        if stop:
            break
except OSError as e:  # metrics.jsonl or the curves: the same disk as the checkpoints
    fail(run_dir.failure(e, args.save_dir, step), 1)
except (MemoryError, RuntimeError) as e:  # CUDA's OutOfMemoryError, or the CPU allocator's
    if (advice := training_out_of_memory(e, device, args.batch_size, L, config.d_model)) is None:
        raise
    saver.wait()  # (a write in flight decides the last good checkpoint)
    fail(f"{advice}; {run_dir.survivor()}.", 1)
bar.close()

# ----------------------------------------------------------------------------------------------------------------
# the end: a final checkpoint (or an interrupted one), evaluation, summary
check_finite()
if ddp:  # a signal to one rank since the last agreement: every rank saves and exits as interrupted, as one process
    clock.should_stop(step, last=True)
interrupted = clock.interrupted
rng_ranks = every_rank_rng(device, world_size)
if master:
    try:
        # weights the loop evaluated and judged when the budget ended at an evaluation step (or a run resumed with
        # none left) are not judged again: one bad evaluation would count as two
        if not interrupted and val_windows is not None and not evaluated_now():
            with clock.pause("evaluating"):
                last_eval = run_eval()
            judge(last_eval)
        if guard is not None and guard.suspect:  # the guard said "not saved" of these weights: nor are they now,
            if not guard.first_look:  # unless all it saw was a first evaluation, which cannot tell a slow start
                fail(collapse_error(), 3)
            log("note: the run ended on its first evaluation, still at the unigram level: its weights are saved all "
                "the same (a slow start looks like a collapse until the next evaluation)")
        with clock.pause("saving"):
            path = save(f"step_{step}.pt" if interrupted else f"final_step_{step}.pt", rng_ranks, quiet=True)
            saver.close()
            metrics.plot(force=True)  # the curves are redrawn at most once a minute: the last one holds everything
    except OSError as e:
        fail(run_dir.failure(e, args.save_dir, step), 1)
    if interrupted:
        log(f"interrupted at step {step}: saved {path}; continue with {run_dir.advice}")
    else:
        minutes = clock.minutes(time.time() - t_process, step - start_step, ckpt is not None)
        log(f"done: {step} step{'s' * (step != 1)}{minutes}, {tokens_seen:,} tokens; final checkpoint {path}")
    log(clock.summary(t_process))
    if last_eval and not interrupted:
        log(f"validation ({eval_weights} weights): {describe(last_eval)}; curves in {metrics.curves_path}")
# the others wait for rank 0's evaluation and save. Interrupted: saved, but not done; `train && generate
# final_step_N.pt` stops here, as after any signal (128 + N)
end_processes(128 + signal.Signals[interrupted] if interrupted else 0, ddp)
