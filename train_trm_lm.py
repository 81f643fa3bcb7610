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
import argparse
import contextlib
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from trm.checkpoint import CheckpointError
from trm.clock import RunClock
from trm import depth as depth_schedule
from trm.data import DataError, PackedLoader, check_paths, eval_windows, load_tokens
from trm.device import autocast, pick_device
from trm.ema import EMA
from trm.evaluate import evaluate
from trm.flags import GRAPH_TOKENS, check_flags, choose_compile
from trm.metrics import MetricsLog, peak_flops
from trm.model import TRM, TRMConfig
from trm.run_dir import RunDir, SaveDirError, disk_warning, open_save_dir, take_ownership
from trm.schedule import budget_warning, lr_at, warmup_warning
from trm.tokenizer import Tokenizer, TokenizerError

# the flags that make the architecture: a resumed run keeps the checkpoint's values
ARCH_FLAGS = ("arch", "d_model", "n_heads", "n_layers", "latent_steps", "deep_steps", "supervision_steps", "dropout",
              "max_seq_len", "grad_deep_steps", "single_stream")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The epilog's layout as written; each flag's default shown once (appended unless its help already says it)."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
                            epilog="example (the procedure's step 3):\n" + __doc__.split("\n\n")[1])
# data and tokenizer (the procedure's flags)
p.add_argument("--tokenizer", default="sentencepiece", choices=["sentencepiece", "byte"],
               help="byte: raw UTF-8 bytes, no model file")
p.add_argument("--sp_model", default="ja_trm.model", help="the SentencePiece model of step 2")
p.add_argument("--train_paths", nargs="+", default=[f"train_{i}.jsonl.gz" for i in range(11)],
               help="training JSONL.GZ files (default: train_0.jsonl.gz ... train_10.jsonl.gz)")
p.add_argument("--valid_paths", nargs="*", default=["validation_0.jsonl.gz"],
               help="validation files; none: no evaluation (default: validation_0.jsonl.gz)")
p.add_argument("--text_field", default="text", help="the JSON field holding each document's text")
p.add_argument("--save_dir", default="checkpoints_new",
               help="checkpoints, metrics.jsonl, training_curves.png; one run's alone (see --overwrite)")
p.add_argument("--cache_dir", default=None, help="token cache folder (default: token_cache/ beside --save_dir)")
p.add_argument("--num_workers", type=int, default=0, help="tokenizer threads for the token cache (0 = all cores)")
# schedule and logging
p.add_argument("--batch_size", type=int, default=4, help="sequences per GPU per micro-step")
p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
p.add_argument("--max_seq_len", type=int, default=512, help="tokens per window (a resumed run keeps its own)")
p.add_argument("--max_steps", type=int, default=50000, help="optimizer steps of the whole run")
p.add_argument("--max_minutes", type=float, default=0,
               help="also stop after this many minutes of training (evaluation and saving not counted; 0 = off); "
                    "the lr schedule then follows whichever of steps or minutes runs out first")
p.add_argument("--eval_every", type=int, default=500, help="evaluate the EMA weights every N steps")
p.add_argument("--eval_tokens", type=int, default=262144, help="validation target tokens per evaluation")
p.add_argument("--log_every", type=int, default=100, help="a log line every N steps")
p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0 = at every evaluation)")
p.add_argument("--keep_last", type=int, default=3,
               help="keep the newest N step_N.pt (0 = keep all); final_step_N.pt and best.pt (lowest validation loss) "
                    "are always kept, and the checkpoint just written")
p.add_argument("--resume", default=None,
               help="'auto': the newest checkpoint of the run in --save_dir; or a checkpoint path (default: a new run)")
p.add_argument("--overwrite", action="store_true",
               help="start a new run in a --save_dir that holds another run's checkpoints: its files are moved to "
                    "<save_dir>.replaced-<time>/ (nothing is deleted)")
# model
p.add_argument("--arch", default="trm", choices=["trm", "gpt"], help="gpt: the same blocks stacked, no recursion")
p.add_argument("--d_model", type=int, default=256, help="width of the hidden states")
p.add_argument("--n_heads", type=int, default=4, help="attention heads (d_model / n_heads must be even)")
p.add_argument("--n_layers", type=int, default=2, help="transformer blocks in the recursive net")
p.add_argument("--latent_steps", type=int, default=2, help="n: z updates per latent recursion")
p.add_argument("--deep_steps", type=int, default=2, help="T: latent recursions per deep recursion")
p.add_argument("--supervision_steps", type=int, default=2, help="N_sup: deep supervision rounds, each with a loss")
p.add_argument("--dropout", type=float, default=0.1, help="dropout rate")
p.add_argument("--grad_deep_steps", type=int, default=1,
               help="deep steps per supervision round that backpropagate, the last ones (the paper: 1; 0 = all)")
p.add_argument("--single_stream", action="store_true",
               help="one latent state instead of the answer y and the latent z (same net calls; a variant)")
# optimizer
p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
p.add_argument("--lr_schedule", default="cosine", choices=["cosine", "linear", "constant"],
               help="after warm-up: decay to 10%% of --lr, or constant")
p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay of the weight matrices")
p.add_argument("--warmup_steps", type=int, default=500, help="linear warm-up to --lr over N steps")
p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 = no clipping)")
p.add_argument("--ema_decay", type=float, default=0.995, help="EMA of the weights, evaluated and saved (0 = none)")
p.add_argument("--random_depth", nargs="?", const="all", default=None, choices=["all", "deep"],
               help="draw the depth every step (seeded), so the model also works at depths it was not trained at. "
                    "all (the flag alone): latent_steps in 1..2n, deep_steps in 1..2T and supervision_steps in 1..2N "
                    "(no compile); deep: deep_steps in 1..2T only, compiled (one graph per depth)")
p.add_argument("--depth_warmup", type=float, default=0.0,
               help="train with one deep step per round for this fraction of the run, then the full depth (0 = off)")
p.add_argument("--act_weight", type=float, default=0.0,
               help="weight of a per-token halting head's loss (0 = no head), for generate.py --halt_threshold")
p.add_argument("--train_halt_threshold", type=float, default=None,
               help="train with adaptive depth (needs --act_weight): a token stops its rounds once the halting head's "
                    "probability exceeds this, as in generate.py --halt_threshold (default: off)")
p.add_argument("--sup_update", default="mean", choices=["mean", "each"],
               help="one optimizer step on the mean of the rounds' losses, or one after each round as in the paper "
                    "(one process, not compiled)")
# system
p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cpu or mps")
p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
               help="auto: bf16 autocast on GPUs that have it, else fp32")
p.add_argument("--compile", default="auto", choices=["auto", "on", "off", "graphs"],
               help="torch.compile; graphs: with CUDA graphs (mode reduce-overhead); auto: on CUDA, with graphs when "
                    f"a micro-step has <= {GRAPH_TOKENS} tokens (launch-bound), and the choice is logged")
p.add_argument("--seed", type=int, default=1337, help="weights, data order, dropout")
args = p.parse_args()
t_process = time.time()  # the wall clock of the summary line
sys.stdout.reconfigure(line_buffering=True)  # log lines reach `> train.log` as they happen, not in 8 KB blocks


def fail(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


if problem := check_flags(args, int(os.environ.get("WORLD_SIZE", "1"))):
    fail(problem)

# ----------------------------------------------------------------------------------------------------------------
# setup: processes, device, tokenizer, the checkpoint to resume, the configuration, data, model, optimizer
world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
local_rank = int(os.environ.get("LOCAL_RANK", "0"))
ddp, master = world_size > 1, rank == 0

device, amp_dtype, device_why = pick_device(args.device, args.dtype)
if ddp:
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def log(msg):
    if master:
        tqdm.write(msg)  # above the progress bar, when there is one


log(f"device: {device} ({device_why})" + (f", {world_size} processes" if ddp else ""))
if warning := warmup_warning(args.lr, args.warmup_steps, args.max_steps):
    log(f"warning: {warning}")
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

try:
    tokenizer = Tokenizer.from_args(args.tokenizer, args.sp_model)
    check_paths(args.train_paths, "train")
    check_paths(args.valid_paths, "valid")
except (TokenizerError, DataError) as e:
    fail(str(e))
log(f"tokenizer: {args.tokenizer}" + (f" {args.sp_model}" if args.tokenizer == "sentencepiece" else "") +
    f", vocab {tokenizer.vocab_size:,}")

# The save dir is this run's alone (trm/run_dir.py): rank 0 locks it, removes partial files of killed trainers and
# picks the checkpoint to resume; all of it, and the configuration, is settled before the corpus is tokenized.
run_id = None
try:
    lock, ckpt, ckpt_path = open_save_dir(args.save_dir, args.resume, log, ddp, master)
except (SaveDirError, CheckpointError) as e:
    fail(str(e))
if args.resume == "auto" and ckpt is None:
    log(f"--resume auto: no checkpoint in {args.save_dir}, starting from scratch")
elif ckpt is not None:
    log(f"resuming from {ckpt_path} (step {ckpt['step']})")
    if ckpt.get("tokenizer") and Tokenizer.from_state(ckpt["tokenizer"]).fingerprint() != tokenizer.fingerprint():
        fail(f"the checkpoint was trained with a different tokenizer than {args.tokenizer} {args.sp_model}")
try:
    config = TRMConfig(**ckpt["config"]) if ckpt is not None else \
        TRMConfig(vocab_size=tokenizer.vocab_size, halt_head=args.act_weight > 0,
                  **{name: getattr(args, name) for name in ARCH_FLAGS})
except (ValueError, TypeError) as e:
    fail(str(e))
for name in ARCH_FLAGS:  # a resumed run keeps its architecture and window length; say so when a flag disagrees
    given, kept = getattr(args, name), getattr(config, name)
    if given != kept and given != p.get_default(name):
        log(f"warning: --{name} {given} ignored: the resumed run keeps its checkpoint's {name} {kept} (a new run, "
            f"e.g. with --overwrite, can change it)")
    setattr(args, name, kept)
if args.act_weight and not (config.halt_head and config.arch == "trm"):
    fail("--act_weight needs --arch trm and, when resuming, a checkpoint that was trained with a halting head")
if master:
    try:
        run_id = take_ownership(args.save_dir, ckpt, ckpt_path, args.resume, args.overwrite, log)
    except (SaveDirError, OSError) as e:
        fail(str(e))
L = config.max_seq_len
tokens_per_step = args.batch_size * L * args.grad_accum * world_size
halting = {"act_weight": args.act_weight, "halt_threshold": args.train_halt_threshold}

# Rank 0 tokenizes into the cache; the others wait and then map the same files.
cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.save_dir)), "token_cache")
threads = args.num_workers or os.cpu_count()
try:
    for turn in (0, 1) if ddp else (0,):
        if (turn == 0) == master:
            train_tokens = load_tokens(args.train_paths, tokenizer, cache_dir, args.text_field, threads, "train", log)
            valid_tokens = (load_tokens(args.valid_paths, tokenizer, cache_dir, args.text_field, threads, "valid", log)
                            if args.valid_paths else None)
        if ddp:
            dist.barrier()
except DataError as e:
    fail(str(e))
loader = PackedLoader(train_tokens, L, args.batch_size, args.seed, rank, world_size)
val_windows = eval_windows(valid_tokens, L, args.eval_tokens) if valid_tokens is not None else None
token_bytes = tokenizer.token_bytes()
log(f"data: {len(train_tokens):,} train tokens = {loader.n_windows:,} windows of {L} "
    f"({loader.n_windows * L / tokens_per_step:,.0f} steps per epoch at {tokens_per_step:,} tokens/step)"
    + (f"; {val_windows.shape[0]} validation windows" if val_windows is not None else ""))

torch.manual_seed(args.seed)  # identical initial weights on every rank
model = TRM(config).to(device)
log(f"model: {config.arch}, {model.num_params():,} parameters ({model.num_params(non_embedding=True):,} without "
    f"embeddings), {model.net_calls()} net calls per token, {model.flops_per_token(L) / 1e6:.1f} MFLOP per "
    f"training token")
decay = [p_ for p_ in model.parameters() if p_.dim() >= 2]  # matrices; gains and biases none here, but stay safe
no_decay = [p_ for p_ in model.parameters() if p_.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
checkpoint_bytes = 4 * model.num_params() * (4 if ema is not None else 3)  # fp32 weights, Adam's 2 moments, EMA
n_kept = args.keep_last + 2 if args.keep_last else args.max_steps // (args.save_every or args.eval_every) + 1
if master and (warning := disk_warning(args.save_dir, shutil.disk_usage(args.save_dir).free, checkpoint_bytes, n_kept)):
    log(f"warning: {warning}")
step, tokens_seen, last_eval = 0, 0, None
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    loader.load_state_dict(ckpt["loader"])
    step, tokens_seen, last_eval = ckpt["step"], ckpt["tokens_seen"], ckpt.get("metrics")
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    random.setstate(ckpt["rng"]["python"])
    if ddp:
        torch.manual_seed(args.seed + 1000 * rank + step)  # distinct dropout per rank after a resume too
else:
    torch.manual_seed(args.seed + rank)  # distinct dropout noise per rank
    random.seed(args.seed + rank)

raw_model = model  # what gets saved, evaluated and sampled; never the compiled or DDP wrapper
not_compilable = ("--sup_update each steps the optimizer inside the forward pass" if args.sup_update == "each" else
                  "--random_depth makes a new graph for every depth drawn" if args.random_depth == "all" else
                  "--train_halt_threshold stops tokens depending on the data" if args.train_halt_threshold is not None
                  else None)
use_compile, cuda_graphs, why = choose_compile(args.compile, device.type, args.batch_size * L, not_compilable)
log(f"compile: {why}")
if ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    # the buffers (initial states, rotary tables) are constants: no need to broadcast them every forward
    model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
if use_compile:
    # compiled after DDP so that the compiler splits the graph at gradient buckets and overlaps the all-reduce;
    # CUDA graphs replay a whole step's kernels with one launch: small batches are launch-bound, not math-bound
    import torch._dynamo
    # one graph per depth a depth schedule asks for (--random_depth deep: 2T of them), each compiled once
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * config.deep_steps + 4)
    model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
depths = depth_schedule.grid(config, args.random_depth)  # the mean over the depths a step may run
flops_per_step = sum(raw_model.flops_per_token(L, **d) for d in depths) / len(depths) * tokens_per_step
peak = peak_flops(device)

# ----------------------------------------------------------------------------------------------------------------
# the run's state and the few things the loop does besides stepping: evaluate, save, check, time
metrics = MetricsLog(args.save_dir, f"{config.arch} d_model={config.d_model} n_layers={config.n_layers}")
if master:
    metrics.start(step if ckpt is not None else None)
clock = RunClock(ckpt.get("train_seconds", 0.0) if ckpt is not None else 0.0,  # --max_minutes counts across resumes
                 args.max_minutes, ddp, master, device)
save_every = args.save_every or args.eval_every
run_dir = RunDir(args.save_dir, args.keep_last, log, ckpt_path, ckpt.get("best") if ckpt is not None else None)
bad = torch.zeros((), device=device, dtype=torch.bool)  # sticky: any non-finite loss or grad since the last check
loss_sum = torch.zeros((), device=device)
loss_count = 0


def checkpoint_state():
    return {"config": config.to_dict(), "model": raw_model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
            "step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            "args": vars(args), "tokenizer": tokenizer.to_state(), "metrics": last_eval,
            "train_seconds": clock.seconds(), "run_id": run_id}


def save(name, quiet=False):
    evaluated = last_eval is not None and last_eval["step"] == step  # these very weights were just evaluated
    try:
        return run_dir.save(checkpoint_state(), name, last_eval["loss"] if evaluated else None, quiet)
    except SaveDirError as e:
        fail(str(e), 1)


def run_eval():
    result = evaluate(ema.model if ema is not None else raw_model, val_windows, token_bytes, 16, device, amp_dtype)
    result.update(step=step, kind="eval", tokens_seen=tokens_seen)
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
        fail(f"non-finite loss or gradient before step {step}: stopping without saving; {run_dir.survivor()}. Try a "
             f"lower --lr or more --warmup_steps" + (", then --resume auto." if run_dir.saved else "."), 3)


def optimizer_step(loss):
    """Clip, note a non-finite loss or gradient (checked on log steps, no sync here), step: both update rules."""
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or math.inf)  # 0: no clip
    bad.logical_or_(~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def next_batch():
    x, y = loader.next_batch()
    if device.type == "cuda":  # pinned, so the copy is asynchronous and the CPU runs ahead of the GPU
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


clock.catch_signals(log)

# ----------------------------------------------------------------------------------------------------------------
# training loop
bar = tqdm(total=args.max_steps, initial=step, desc="train", unit="step", disable=not master or None,
           dynamic_ncols=True, leave=False)
clock.start()
start_step = step
seconds_at_log, tokens_at_log, steps_at_log, seconds_at_eval = 0.0, tokens_seen, step, 0.0
model.train()
try:
    while step < args.max_steps and not clock.out_of_time():
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.lr_schedule, clock.budget_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        depth = depth_schedule.for_step(config, args.random_depth, args.depth_warmup, args.seed, step,
                                        max(step / args.max_steps, clock.budget_frac))
        if args.sup_update == "each":  # the paper's rule: an optimizer step after every supervision round
            x, y = next_batch()
            round_losses = []
            for round_loss in raw_model.supervision_rounds(x, y, **halting, **depth):
                round_loss.backward()
                optimizer_step(round_loss)
                round_losses.append(round_loss.detach())
            loss_sum += torch.stack(round_losses).mean()
            loss_count += 1
        else:  # one optimizer step on the mean of the rounds' losses, over grad_accum micro-batches
            for micro in range(args.grad_accum):
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                x, y = next_batch()
                sync = not ddp or micro == args.grad_accum - 1  # DDP all-reduces only on the last micro-step
                with model.no_sync() if not sync else contextlib.nullcontext():
                    with autocast(device, amp_dtype):
                        _, loss = model(x, y, **halting, **depth)
                    (loss / args.grad_accum).backward()
                loss_sum += loss.detach()
                loss_count += 1
            optimizer_step(loss)
        if ema is not None:
            ema.update(raw_model)
        step += 1
        tokens_seen += tokens_per_step
        bar.update(1)

        if step % args.log_every == 0 or step == args.max_steps:
            check_finite()  # .item() forces a CPU-GPU sync; only on log steps
            if ddp:
                dist.all_reduce(loss_sum)  # the global batch's loss, not rank 0's share (SUM: older gloo has no AVG)
                loss_sum /= world_size
            train_loss = loss_sum.item() / loss_count
            loss_sum.zero_()
            loss_count = 0
            dt = max(clock.session_seconds() - seconds_at_log, 1e-9)  # training time only: evaluations excluded
            tok_s = (tokens_seen - tokens_at_log) / dt
            mfu = flops_per_step * (step - steps_at_log) / dt / world_size / peak if peak else None
            eta = min((args.max_steps - step) * dt / max(step - steps_at_log, 1), clock.budget_left())
            if args.max_minutes and steps_at_log > start_step:  # (not from the first window: it holds compilation)
                say_once("budget", budget_warning(step, args.warmup_steps, (step - steps_at_log) / dt,
                                                  clock.budget_left()))
            seconds_at_log, tokens_at_log, steps_at_log = clock.session_seconds(), tokens_seen, step
            if master:
                metrics.append({"step": step, "kind": "train", "loss": train_loss, "lr": lr, "tok_s": tok_s,
                                "tokens_seen": tokens_seen, "epoch": loader.epoch})
                log(f"step {step:>6}/{args.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                          f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "") +
                          f" | epoch {loader.epoch:.2f} | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        if master and val_windows is not None and step % args.eval_every == 0 and step < args.max_steps:
            trained = clock.session_seconds() - seconds_at_eval
            with clock.pause():  # evaluation time is neither training throughput nor --max_minutes
                last_eval = r = run_eval()
            seconds_at_eval = clock.session_seconds()
            log(f"eval  {step:>6} | val loss {r['loss']:.4f} | ppl {r['perplexity']:.1f} | "
                      f"{r['bits_per_byte']:.4f} bits/byte" +
                      (f" | halting head accuracy {r['halt_accuracy']:.3f}" if "halt_accuracy" in r else ""))
            if device.type == "cpu" and clock.last_pause > trained:
                say_once("eval", f"note: an evaluation takes {clock.last_pause:.1f} s here, more than the "
                                 f"{trained:.1f} s of training between two; fewer --eval_tokens (now "
                                 f"{args.eval_tokens:,}) or a larger --eval_every (now {args.eval_every:,}) leaves "
                                 f"more of the time to training")
        if step % save_every == 0 and step < args.max_steps:
            check_finite()
            if master:
                with clock.pause():
                    save(f"step_{step}.pt")
        if clock.should_stop(step):
            break
except OSError as e:  # metrics.jsonl or the curves: the same disk as the checkpoints
    fail(run_dir.failure(e, args.save_dir, step), 1)
except torch.cuda.OutOfMemoryError:
    fail(f"CUDA out of memory at --batch_size {args.batch_size} --max_seq_len {L} --d_model {config.d_model}. "
         f"Reduce --batch_size (e.g. 2 or 1; keep the global batch with --grad_accum), --max_seq_len (e.g. 256) or "
         f"--d_model (e.g. 128).", 1)
bar.close()

# ----------------------------------------------------------------------------------------------------------------
# the end: a final checkpoint (or an interrupted one), evaluation, summary
check_finite()
interrupted = clock.stop_requested
if master:
    try:
        with clock.pause():
            if not interrupted and val_windows is not None:
                last_eval = run_eval()
            path = save(f"step_{step}.pt" if interrupted else f"final_step_{step}.pt", quiet=True)
            if not interrupted and val_windows is None:
                metrics.plot()
    except OSError as e:
        fail(run_dir.failure(e, args.save_dir, step), 1)
    if interrupted:
        log(f"interrupted at step {step}: saved {path}; continue with the same command plus --resume auto")
    else:  # this process's minutes; a resumed run adds its earlier sessions' training minutes
        wall, trained = (time.time() - t_process) / 60, clock.session_seconds() / 60
        budget = " (the --max_minutes budget ran out)" if clock.out_of_time() else ""
        session = (f"in {wall:.1f} min ({trained:.1f} of them training)" if ckpt is None else
                   f"({step - start_step} in this session: {wall:.1f} min, {trained:.1f} of them training; "
                   f"{clock.seconds() / 60:.1f} min of training in all)")
        log(f"done: {step} steps{budget} {session}, {tokens_seen:,} tokens; final checkpoint {path}")
    if last_eval and not interrupted:
        log(f"validation (EMA): loss {last_eval['loss']:.4f}, perplexity {last_eval['perplexity']:.1f}, "
            f"{last_eval['bits_per_byte']:.4f} bits/byte" +
            (f", halting head accuracy {last_eval['halt_accuracy']:.3f}" if "halt_accuracy" in last_eval else "")
            + f"; curves in {metrics.curves_path}")
if ddp:
    # the others wait for rank 0's evaluation and save: a process group torn down on one side only can abort the
    # other (seen with gloo: "terminate called without an active exception", and torchrun then kills rank 0)
    dist.barrier()
    dist.destroy_process_group()
