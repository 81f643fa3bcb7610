"""Validation loss, perplexity and bits per UTF-8 byte; also a command that scores any checkpoint on any text.

    python -m trm.evaluate --model_path checkpoints_new/step_500.pt --data validation_0.jsonl.gz [--eval_tokens N]
        [--halt_threshold P]   # a model with a halting head, scored as adaptive generation runs

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes the target tokens stand for (SentencePiece: of
the text as it normalizes it, NFKC), so it compares models with different tokenizers. EOS and BOS targets (a
document's end, and the next one's start) count their loss but no bytes (slightly pessimistic); the stream's first
BOS is never a target, and tokens past the last whole window are not scored (trm/data.py eval_windows).
"""
import argparse
import functools
import itertools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from trm.cli import PathList, quiet_interrupt
from trm.device import autocast
from trm.model import Block


@torch.no_grad()
def evaluate(model, windows, token_bytes, batch_size=16, device="cpu", amp_dtype=None, halt_threshold=None,
             head_windows=None, compiled=False, compiled_head=False, **depth):
    """Score fixed windows [n, L + 1] with the model's final-round logits. Returns a dict of plain floats/ints.

    batch_size windows go through the recursion together, and the head and its loss take head_windows of them at a
    time (None: all): a batch's logits are [windows, L, vocab] in float32, 2 GB for 64 windows of 512 at 16k, so a
    larger batch (fewer kernel launches through the recursion) can keep the logits of a small one.

    halt_threshold (a model with a halting head): score the way adaptive generation runs, every token stopping its
    supervision rounds once the head's probability exceeds it (trm/halting.py computes over whole windows what
    decoding computes token by token; tested equal). Adds the mean rounds per token and their share of the depth.
    Without a threshold, a model with a halting head also gets halt_accuracy: how often, over every round and token,
    the head's "stop" (p > 0.5) agrees with "this round's argmax is the target".

    compiled=True scores each batch with one torch.compile graph (score_batch) where the model has no halting head and
    no threshold is given (otherwise eagerly, as without it). The first call of each batch shape and depth compiles
    (seconds to minutes), so it pays only where evaluation is repeated often on a GPU: in the procedure's run its 20 s
    compile costs more than it saves, and the trainer compiles the blocks alone instead (compile_blocks).
    compiled_head=True (without compiled) runs the head and its float32 loss as one compiled function (head_nats), a
    graph per chunk shape, so that the loss is reduced as the logits are read.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    token_bytes = torch.as_tensor(token_bytes, device=device)
    windows = windows.to(device)  # once: a copy per batch from pageable memory would wait for the device each time
    head_accuracy = model.can_halt and halt_threshold is None
    N_sup = model.n_rounds(**depth)
    # the sums stay on the device and are read once at the end (an .item() per batch would wait for the device each
    # time); nats in float64, but float32 on MPS, which has no float64
    nats = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    n_bytes, halt_right, rounds_run = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
    n_tokens = 0
    head_windows = head_windows or batch_size

    def head_chunks(y, targets):  # (logits, their targets, their slice) head_windows windows at a time
        for j in range(0, len(y), head_windows):
            part = slice(j, j + head_windows)
            yield model.head(y[part]), targets[part], part

    nats_of = compiled_head_nats() if compiled_head else head_nats
    score = compiled_score_batch() if compiled and halt_threshold is None and not model.can_halt else None
    for i in range(0, len(windows), batch_size):
        idx, targets = windows[i:i + batch_size, :-1], windows[i:i + batch_size, 1:]
        if score is not None:
            with autocast(device, amp_dtype):
                batch_nats, batch_bytes = score(model, idx, targets, token_bytes, head_windows, **depth)
            nats += batch_nats
            n_bytes += batch_bytes
            n_tokens += targets.numel()
            continue
        with autocast(device, amp_dtype):
            for y, running in model.scored_rounds(idx, None, halt_threshold, **depth):
                rounds_run += running.sum() if running is not None else targets.numel()
                if head_accuracy:
                    stop = model.halt(y).squeeze(-1) > 0
                    for logits, t, part in head_chunks(y, targets):
                        halt_right += (stop[part] == (logits.argmax(-1) == t)).sum()
            for j in range(0, len(y), head_windows):
                nats += nats_of(model, y[j:j + head_windows], targets[j:j + head_windows])
        n_tokens += targets.numel()
        n_bytes += token_bytes[targets].sum()
    model.train(was_training)
    nats, n_bytes, halt_right, rounds_run = nats.item(), int(n_bytes), int(halt_right), int(rounds_run)
    loss = nats / n_tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
              "bits_per_byte": nats / math.log(2) / max(n_bytes, 1), "tokens": n_tokens, "bytes": n_bytes}
    if head_accuracy:
        result["halt_accuracy"] = halt_right / (n_tokens * N_sup)
    if halt_threshold is not None:
        result.update(rounds_per_token=rounds_run / n_tokens, recursion_share=rounds_run / n_tokens / N_sup)
    return result


def trainer_batch(device):
    """evaluate()'s batch_size and head_windows keywords for the trainer's evaluations. On a GPU few windows a pass are
    launch-bound (16: 637 ms, 69% idle); 256 through the recursion, the head and its loss 64 at a time (their logits:
    2 GB in float32), took 176 ms against 191-208 at 64 (bench/eval_speed.py, H200)."""
    return dict(batch_size=256, head_windows=64) if device.type == "cuda" else dict(batch_size=16)


def describe(r, short=False):
    """An evaluation in words: the trainer's eval lines (short) or its end-of-run summary."""
    sep, loss, ppl = (" | ", "val loss", "ppl") if short else (", ", "loss", "perplexity")
    parts = [f"{loss} {r['loss']:.4f}", f"{ppl} {r['perplexity']:.1f}", f"{r['bits_per_byte']:.4f} bits/byte"]
    if "halt_accuracy" in r:
        parts.append(f"halting head accuracy {r['halt_accuracy']:.3f}")
    if "eval_depth" in r:  # a --depth_warmup's shallow score
        deep = r["eval_depth"]["deep_steps"]
        parts.append(f"at {deep} deep step (warm-up)" if short else f"at the warm-up's {deep} deep step")
    return sep.join(parts)


def slow_note(seconds, trained, eval_tokens, eval_every):
    """A note when an evaluation takes longer than the training between two (None otherwise)."""
    if seconds <= trained:
        return None
    return (f"note: an evaluation takes {seconds:.1f} s here, more than the {trained:.1f} s of training between two; "
            f"fewer --eval_tokens (now {eval_tokens:,}) or a larger --eval_every (now {eval_every:,}) leaves more of "
            f"the time to training")


def unknown_note(windows, tokenizer):
    """A line for a scored text whose targets include <unk> (a SentencePiece model without byte fallback, as the
    users' earlier ja_trm.model), or None. Such a target stands for characters the model cannot name, whose bytes no
    id carries: its loss counts, its bytes do not, so bits/byte reads high by their share (train_spm.py's models
    fall back to bytes and have none)."""
    n = int((windows[:, 1:] == tokenizer.unk_id).sum())
    if not n:
        return None
    share = n / windows[:, 1:].numel()
    return (f"{n:,} of the scored tokens ({share:.2%}) are <unk>: the tokenizer has no byte fallback, so their loss "
            f"counts in bits/byte but their bytes do not (it reads high); train_spm.py's tokenizers have none")


def score_batch(model, idx, targets, token_bytes, head_windows, **depth):
    """(summed nats in float32, summed bytes) of one batch's targets from the last round's logits, the head and its
    loss head_windows windows at a time: evaluate()'s plain case as straight-line code, for torch.compile to fuse
    into one graph (the eager loop launches each elementwise op of the recursion and the loss as a kernel of its own,
    and materialises the float32 logits)."""
    for y in model.rounds(idx, **depth):  # only the last round is scored: the others need no head
        pass
    nats = sum(head_nats(model, y[j:j + head_windows], targets[j:j + head_windows])
               for j in range(0, len(y), head_windows))
    return nats, token_bytes[targets].sum()


def head_nats(model, y, targets):
    """Summed nats of targets [n, L] under the head's logits of the states y [n, L, D], in float32. Eager, the logits,
    their float32 copy and their log-probabilities are each written out (1, 2 and 2 GB for 64 windows of 512 at 16k);
    compiled (evaluate(compiled_head=True)), the loss is reduced from the logits as they are read."""
    return F.cross_entropy(model.head(y).float().flatten(0, 1), targets.flatten(), reduction="sum")


@functools.cache
def compiled_score_batch():
    """score_batch compiled, once per process. The model is an argument, not a constant: the compiler's guards pick
    (or build) a graph per model structure, batch shape and depth, and the weights are inputs read at each call, so
    the EMA's, updated in place between evaluations, are scored as they are now (tested). No CUDA graphs: at the
    trainer's 256 windows a batch the kernels bound it, not their launches."""
    return torch.compile(score_batch, dynamic=False)


def compile_blocks(model):
    """Compile each transformer block of the model in place (nn.Module.compile: the state dict, its names and
    everything else stay as they are), so that evaluate() runs fused blocks with the rest eager: a regional
    compile. The blocks' weights are inputs of the graph, so every block of one shape, in every net call of the
    recursion, runs one graph per batch shape (tested): its compile is that of one block, where compiled=True's is
    that of the whole unrolled recursion (20 s on an H100 for the seed, BENCHMARKS.md). Returns the model."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(dynamic=False)
    return model


@functools.cache
def compiled_head_nats():
    """head_nats compiled, once per process; the model is an argument, so one function serves every model (and the
    EMA's weights, moved in place, are read at each call). The trainer's evaluations on a GPU use it beside
    compile_blocks: 96 -> 76 ms an evaluation on an H100, no dearer a first call (BENCHMARKS.md, issue 20)."""
    return torch.compile(head_nats, dynamic=False)


def main(argv=None):
    from trm.checkpoint import CheckpointError, load_model
    from trm.corpus import CorpusStats, iter_texts
    from trm.data import DataError, check_paths, document_ids, eval_windows
    from trm.depth import add_depth_flags, depth_flags, depth_refused
    from trm.device import out_of_memory, pick_device

    p = argparse.ArgumentParser(
        description="Score a checkpoint on held-out JSONL text; prints one JSON object.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example (from any folder): python /path/to/project/evaluate.py "
               "--model_path checkpoints_new/final_step_50000.pt --data validation_0.jsonl.gz")
    p.add_argument("--model_path", required=True,
                   help="a checkpoint written by train_trm_lm.py, its save dir (then its best.pt, else its newest "
                        "checkpoint), or a folder written by export.py")
    p.add_argument("--data", nargs="+", action=PathList, required=True,
                   help="JSONL files (plain, .gz, .xz, .zst) or .parquet of held-out documents")
    p.add_argument("--eval_tokens", type=int, default=1_000_000,
                   help="target tokens to score, in whole windows: at most this many, at least one window")
    p.add_argument("--seq_len", type=int, default=0, help="window length (0 = the model's max_seq_len, its largest)")
    p.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="the EMA or the raw weights")
    p.add_argument("--text_field", default="text", help="JSON field (Parquet: column) that holds the document")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu, mps (bf16 autocast where the trainer uses it)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast dtype")
    add_depth_flags(p)
    p.add_argument("--halt_threshold", type=float, default=None,
                   help="score as adaptive generation runs at this threshold (needs a halting head)")
    args = p.parse_args(argv)
    depth = depth_flags(args)
    counts = dict(eval_tokens=args.eval_tokens, batch_size=args.batch_size, **depth)
    bad = [f"--{name} must be at least 1" for name, value in counts.items() if value is not None and value < 1]
    if args.seq_len < 0 or (args.halt_threshold is not None and not 0 <= args.halt_threshold <= 1):
        bad.append("--seq_len must be >= 0 and --halt_threshold in [0, 1]")
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2

    try:
        args.data = check_paths(args.data, "data")
        device, amp, _ = pick_device(args.device, args.dtype)
        model, tokenizer, state = load_model(args.model_path, args.weights)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if refused := depth_refused(model, depth, args.model_path):
        print(f"error: {refused}", file=sys.stderr)
        return 2
    if args.seq_len > model.config.max_seq_len:  # positions it never saw: a score that compares with nothing
        print(f"error: --seq_len {args.seq_len} is longer than the {model.config.max_seq_len} tokens {args.model_path} "
              f"was trained on; give --seq_len {model.config.max_seq_len} or less (0 = the model's window)",
              file=sys.stderr)
        return 2
    model.to(device)
    stats, ids = CorpusStats(), []
    texts = (t for path in args.data for t in iter_texts(path, args.text_field, stats))
    while len(ids) <= args.eval_tokens + model.config.max_seq_len:  # enough for the windows, no more
        chunk = list(itertools.islice(texts, 256))
        if not chunk:
            break
        for doc in document_ids(tokenizer, chunk):
            ids.extend(doc)
    skipped = stats.skipped_note()
    if len(ids) < 2:  # (what was skipped is then the reason: a wrong --text_field skips every record)
        print(f"error: no readable documents in {', '.join(args.data)}" + (f": {skipped}" if skipped else ""),
              file=sys.stderr)
        return 2
    if skipped:
        print(f"warning: {skipped}; the score is on the {stats.documents:,} document{'s' * (stats.documents != 1)} "
              f"read", file=sys.stderr)
    windows = eval_windows(ids, args.seq_len or model.config.max_seq_len, args.eval_tokens)
    if args.halt_threshold is not None and not model.can_halt:
        print(f"error: --halt_threshold needs a TRM trained with a halting head; {args.model_path} has none",
              file=sys.stderr)
        return 2
    try:
        result = evaluate(model, windows, tokenizer.token_bytes(), args.batch_size, device, amp, args.halt_threshold,
                          **depth)
    except (MemoryError, RuntimeError) as e:
        if (more := out_of_memory(e)) is None:
            raise
        print(f"error: out of memory scoring {args.batch_size:,} windows at once{more}: lower --batch_size (e.g. "
              f"{max(1, args.batch_size // 4)})", file=sys.stderr)
        return 1
    # the weights scored, not those asked for: without an EMA load_model falls back to the raw ones (a note on stderr
    # that a results table built from this JSON never sees)
    # ... and the file scored, not the folder named: a save dir stands for its best.pt, else its newest checkpoint
    # (load_model's choice, said on stderr only), which the next evaluation of the same folder may not be
    result.update(params=model.num_params(), step=state.get("step"), weights=state["weights"],
                  checkpoint=state["path"])
    if note := unknown_note(windows, tokenizer):
        print(f"note: {note}", file=sys.stderr)
    if windows.shape[1] - 1 < (args.seq_len or model.config.max_seq_len):  # the one short window eval_windows gives
        print(f"warning: {', '.join(args.data)} holds fewer tokens than one window ({result['tokens']:,} scored): a "
              f"score from so little text says little about the model", file=sys.stderr)
    try:
        print(json.dumps(result), flush=True)
    except BrokenPipeError:  # `evaluate.py ... | head -c 100`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    quiet_interrupt()
    sys.exit(main())
