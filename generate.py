"""Step 4: generate text from a trained TRM checkpoint, streaming it to the terminal as it comes.

    python generate.py --model_path checkpoints_new/final_step_50000.pt --sp_model ja_trm.model \
        --prompt "日本語のプロンプト" --max_new_tokens 100

--sp_model is optional: the checkpoint carries its tokenizer (when given, it must be the same vocabulary).
With neither --prompt nor --prompt_file, prompts are read interactively. Generated text goes to stdout;
everything else (device, per-sample speed, errors) to stderr, so `> out.txt` captures just the text.

Samples are decoded in batches: the --num_samples of a prompt, and the prompts of a --prompt_file that have the same
token length, go through the model together (at most --batch_size rows). A batch of one streams its text as it comes;
a larger batch prints each sample whole once it is finished, always in input order.
"""
import argparse
import math
import os
import sys
import time

import torch

from trm.checkpoint import CheckpointError, load_model
from trm.cli import quiet_interrupt
from trm.depth import add_depth_flags, depth_flags, depth_refused
from trm.device import bytecode_note, out_of_memory, pick_device
from trm.sampling import StreamDecoder, generate, generate_batch, prompt_ids
from trm.tokenizer import Tokenizer, TokenizerError


parser = argparse.ArgumentParser(
    description="Generate text with a trained Generative TRM checkpoint.",
    epilog='example:\n  python generate.py --model_path checkpoints_new/final_step_50000.pt --prompt "日本語のプロンプト" '
           '--max_new_tokens 100', formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model_path", required=True,
                    help="a step_N.pt / final_step_N.pt / best.pt written by train_trm_lm.py, its save dir (then its "
                         "best.pt, else its newest checkpoint), or a folder written by export.py")
parser.add_argument("--sp_model", default=None, help="optional; must match the tokenizer stored in the checkpoint")
parser.add_argument("--prompt", default=None, help="one prompt ('' starts from BOS)")
parser.add_argument("--prompt_file", default=None,
                    help="a text file with one prompt per line (blank lines skipped); prompts of one token length are "
                         "decoded in one batch, the output keeps the file's order")
parser.add_argument("--max_new_tokens", type=int, default=100, help="tokens per sample (default: %(default)s)")
parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
parser.add_argument("--top_k", type=int, default=50, help="0 = off (default: %(default)s)")
parser.add_argument("--top_p", type=float, default=0.95, help="1.0 = off (default: %(default)s)")
parser.add_argument("--repetition_penalty", type=float, default=1.1, help="1.0 = off (default: %(default)s)")
parser.add_argument("--seed", type=int, default=None, help="default: a fresh one, printed so a sample can be redone")
parser.add_argument("--num_samples", type=int, default=1,
                    help="samples per prompt, decoded together in one batch; with more than one, each sample is "
                         "printed whole when it is finished (in order) instead of streamed (default: %(default)s)")
parser.add_argument("--batch_size", type=int, default=64,
                    help="most samples decoded together; a batch's cache grows with it (default: %(default)s)")
parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                    help="the EMA of the weights or the raw ones (default: %(default)s)")
parser.add_argument("--device", default="auto",
                    help="auto (cuda, then mps, then cpu), cuda, mps or cpu (default: %(default)s)")
parser.add_argument("--no_cache", action="store_true", help="recompute every token from scratch (slow; for checking)")
parser.add_argument("--compile", action="store_true",
                    help="CUDA: torch.compile the decoding step before capturing it (about 1.6x the tokens/s on an "
                         "H200, after tens of seconds compiling: for long outputs)")
add_depth_flags(parser)
parser.add_argument("--halt_threshold", type=float, default=None,
                    help="adaptive depth (a model trained with --act_weight): a token stops its supervision rounds "
                         "once the halting head's probability exceeds this (1.0 = never; default: off)")
args = parser.parse_args()
quiet_interrupt()  # (loading the model; decoding has its own below)
if sys.stdout.errors == "strict":  # a terminal without some character (cp932 has no emoji): '?', not a stop mid-stream
    sys.stdout.reconfigure(errors="replace")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def undecodable(text):
    """Where `text` holds bytes that were not UTF-8 (a terminal in another encoding: Python hands them over as lone
    surrogates, which no tokenizer or terminal takes), or None."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            byte = f"byte 0x{ord(ch) - 0xDC00:02x}" if ord(ch) >= 0xDC80 else "a lone surrogate"
            return f"{byte} at character {i + 1}"
    return None


if args.prompt is not None and args.prompt_file is not None:
    fail("give --prompt or --prompt_file, not both")
# every number before any work, each with its range (NaN fails every comparison, so isfinite comes first)
for name, lo, hi in [("max_new_tokens", 0, 1_000_000), ("temperature", 0, 100), ("top_k", 0, 1_000_000),
                     ("top_p", 0, 1), ("repetition_penalty", 0.01, 100), ("seed", 0, 2**63 - 1),
                     ("num_samples", 1, 10_000), ("batch_size", 1, 10_000),
                     ("supervision_steps", 1, 1000), ("deep_steps", 1, 1000),
                     ("latent_steps", 1, 1000), ("halt_threshold", 0, 1)]:
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        fail(f"--{name} must be between {lo:,} and {hi:,}, got {value}")
if 0 < args.temperature < 0.001:  # logits / 1e-45 overflow to inf, and softmax of inf is NaN
    fail(f"--temperature must be 0 (greedy) or between 0.001 and 100, got {args.temperature}")
if args.halt_threshold is not None and args.no_cache:
    fail("--halt_threshold works through the KV cache (not with --no_cache)")
if args.prompt is not None and (where := undecodable(args.prompt)):
    fail(f"--prompt is not valid UTF-8 ({where}); set the terminal to UTF-8, or put the prompt in a UTF-8 file "
         f"and pass --prompt_file")

# ---- load ----------------------------------------------------------------------------------------------------
try:
    model, tokenizer, state = load_model(args.model_path, weights=args.weights)
except (CheckpointError, TokenizerError) as e:
    fail(e)
except Exception as e:  # torch.load(weights_only=True) ran no code; whatever else went wrong, the file is bad
    fail(f"{args.model_path} could not be loaded ({type(e).__name__}: {str(e).strip()[:160]})")
if args.sp_model:
    if not os.path.isfile(args.sp_model):  # (the trainer's own hint names a --tokenizer flag this script has not)
        fail(f"--sp_model {args.sp_model} not found; leave --sp_model out to use the tokenizer stored in "
             f"{args.model_path}")
    try:
        given = Tokenizer.from_args("sentencepiece", args.sp_model)
    except TokenizerError as e:
        fail(e)
    if given.fingerprint() != tokenizer.fingerprint():
        fail(f"--sp_model {args.sp_model} is not the vocabulary {args.model_path} was trained with "
             f"(fingerprint {given.fingerprint()} vs {tokenizer.fingerprint()}); leave --sp_model out to use the "
             f"tokenizer stored in the checkpoint")
prompts = None
if args.prompt is not None:
    prompts = [args.prompt]
elif args.prompt_file is not None:
    try:
        with open(args.prompt_file, encoding="utf-8-sig") as f:  # (a BOM, as Windows editors write, is no prompt)
            prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read --prompt_file {args.prompt_file} ({type(e).__name__}: {e})")
    if not prompts:  # exiting 0 having printed nothing would look like a model that generates nothing
        fail(f"--prompt_file {args.prompt_file} holds no prompt (only blank lines): write one prompt per line")

if args.halt_threshold is not None and not model.can_halt:
    fail(f"--halt_threshold needs a TRM trained with a halting head (train_trm_lm.py --act_weight > 0); "
         f"{args.model_path} has none")

# Decoding is bound by per-token latency more than arithmetic (at batch 1 entirely), so fp32 everywhere.
device, _, why = pick_device(args.device, "fp32")
model.to(device)
seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
generator = torch.Generator(device=device).manual_seed(seed)
depth = depth_flags(args)
if refused := depth_refused(model, depth, args.model_path):
    fail(refused)
n, T_deep, N_sup = model.steps(**depth)
c = model.config
adaptive = f" (adaptive: halting at p > {args.halt_threshold})" if args.halt_threshold is not None else ""
decoding = "no cache" if args.no_cache else "KV cache"
graphed = device.type == "cuda" and not args.no_cache and not adaptive
if graphed:
    decoding += " (compiled CUDA-graph steps)" if args.compile else " (CUDA-graph steps)"
elif args.compile:
    print("note: --compile applies to the CUDA-graph decoding steps (CUDA, KV cache, no --halt_threshold); "
          "decoding runs uncompiled", file=sys.stderr)
print(f"{args.model_path}: step {state.get('step', '?')}, {model.num_params() / 1e6:.2f}M parameters, "
      f"{state['weights']} weights, arch {c.arch}, depth n={n} T={T_deep} N_sup={N_sup}{adaptive}, "
      f"window {c.max_seq_len} tokens, {decoding}, device {device.type} ({why.split(',')[0]}), seed {seed}",
      file=sys.stderr)
if note := bytecode_note():
    print(f"note: {note}", file=sys.stderr)


# ---- generate --------------------------------------------------------------------------------------------------
sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, eos_id=tokenizer.eos_id, use_cache=not args.no_cache,
                halt_threshold=args.halt_threshold, generator=generator, compile=args.compile, **depth)


def batches(prompts):
    """Rows (output position, sample number, prompt, token ids), --num_samples per prompt, in batches of one length.

    Rows of one length share every position, so a batch needs no padding (left padding would need masks and change
    the numbers). Batches come in order of their first row: when one starts, every row before its first is finished.
    """
    by_length = {}
    for p, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt)
        if len(ids) > c.max_seq_len:
            which = "the prompt" if len(prompts) == 1 else f"prompt {p + 1}"
            print(f"note: {which} is {len(ids)} tokens, longer than the model's {c.max_seq_len}-token window; "
                  f"generation starts from its last {c.max_seq_len // 2} tokens", file=sys.stderr)
        rows = by_length.setdefault(len(ids), [])
        rows += [(p * args.num_samples + i, i, prompt, ids) for i in range(args.num_samples)]
    chunks = [rows[i:i + args.batch_size] for rows in by_length.values() for i in range(0, len(rows), args.batch_size)]
    return sorted(chunks, key=lambda rows: rows[0][0])


def rounds_note(stats):
    if not stats.get("tokens"):
        return ""
    mean = stats["rounds"] / stats["tokens"]
    return f", {mean:.2f} of {N_sup} supervision rounds per token ({100 * mean / N_sup:.0f}% of the depth)"


def stream(row):
    """A batch of one: its text goes out as it comes."""
    _, i, prompt, ids = row
    decoder = StreamDecoder(tokenizer, ids)
    print(prompt, end="", flush=True)
    t0, count, stats = time.perf_counter(), 0, {}
    for token in generate(model, ids, args.max_new_tokens, stats=stats, **sampling):
        count += 1
        print(decoder.push(token), end="", flush=True)
    print(decoder.flush(), flush=True)
    stop = "EOS" if count < args.max_new_tokens else "max_new_tokens"
    dt = time.perf_counter() - t0
    print(f"[sample {i + 1}/{args.num_samples}] prompt {len(ids)} tokens, generated {count} tokens in {dt:.2f} s, "
          f"{count / dt:.1f} tokens/s{rounds_note(stats)} (stopped at {stop})", file=sys.stderr, flush=True)


def decode(rows):
    """A batch of several: yields (output position, text, stderr line) for each row once it is finished."""
    out = [[] for _ in rows]
    going = set(range(len(rows)))
    t0, stats = time.perf_counter(), {}

    def finished(r):
        position, i, prompt, ids = rows[r]
        # decoding all ids at once gives what streaming them would have printed (StreamDecoder's promise)
        text = prompt + tokenizer.decode(ids + out[r])[len(tokenizer.decode(ids)):]
        stop = "EOS" if len(out[r]) < args.max_new_tokens else "max_new_tokens"
        return position, text, (f"[sample {i + 1}/{args.num_samples}] prompt {len(ids)} tokens, generated "
                                f"{len(out[r])} tokens (stopped at {stop}; batch of {len(rows)})")

    for tokens in generate_batch(model, [ids for *_, ids in rows], args.max_new_tokens, stats=stats, **sampling):
        for r, token in enumerate(tokens):
            if token is not None:
                out[r].append(token)
            elif r in going:  # it has just emitted EOS
                going.remove(r)
                yield finished(r)
    for r in sorted(going):
        yield finished(r)
    count, dt = sum(map(len, out)), time.perf_counter() - t0
    print(f"[batch of {len(rows)}] generated {count} tokens in {dt:.2f} s, {count / dt:.1f} tokens/s in total"
          f"{rounds_note(stats)}", file=sys.stderr, flush=True)


def run(prompts):
    ready, printed = {}, 0  # finished samples waiting for the ones before them (None: streamed); how many are out

    def print_ready():
        nonlocal printed
        while printed in ready:
            done = ready.pop(printed)
            if done is not None:
                print(done[0], flush=True)
                print(done[1], file=sys.stderr, flush=True)
            printed += 1

    for rows in batches(prompts):
        if len(rows) == 1:
            stream(rows[0])  # every row before it is out (see batches)
            ready[rows[0][0]] = None
            print_ready()
            continue
        for position, text, line in decode(rows):
            ready[position] = text, line
            print_ready()


def read_prompt():
    """One line of stdin. stdout holds only generated text (`> out.txt`), so the "> " prompt goes there only for a
    person at a terminal, to stderr when stdout is a file, and nowhere for piped prompts."""
    if not sys.stdin.isatty():
        return input()
    if sys.stdout.isatty():
        return input("> ")
    print("> ", end="", file=sys.stderr, flush=True)
    return input()


try:
    if prompts is not None:
        run(prompts)
    else:
        print("Type a prompt and press Enter (an empty line samples from BOS); 'exit' or Ctrl-D quits.",
              file=sys.stderr)
        while True:
            try:
                prompt = read_prompt().rstrip("\r").lstrip("\ufeff")  # (a Windows file piped in: CRLF and a BOM)
            except EOFError:
                print(file=sys.stderr)
                break
            except UnicodeDecodeError as e:  # stdin in another encoding than the terminal's
                print(f"error: that line is not valid UTF-8 ({e.reason}); type it again", file=sys.stderr)
                continue
            if prompt.strip() in ("exit", "quit"):
                break
            if where := undecodable(prompt):
                print(f"error: that line is not valid UTF-8 ({where}); type it again", file=sys.stderr)
                continue
            run([prompt])
except KeyboardInterrupt:
    print(file=sys.stderr)
    sys.exit(130)
except (MemoryError, RuntimeError) as e:
    if (more := out_of_memory(e)) is None:
        raise
    rows = min(args.batch_size, args.num_samples * len(prompts or [""]))
    print(file=sys.stderr)
    fail(f"out of memory decoding {rows:,} samples at once{more}: lower --batch_size (now {args.batch_size:,}; "
         f"e.g. {max(1, args.batch_size // 8)}); the samples are then decoded in more, smaller batches")
except BrokenPipeError:  # `generate.py ... | head`: the reader left; say nothing more
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
