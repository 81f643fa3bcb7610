"""The trainer's flags: checked before any work starts (a bad value is one line naming the flag and its range), and
what --compile auto resolves to.

Every number is checked, because each wrong one fails late or silently: --grad_clip -1 trains uphill, --lr nan
trains nothing, a negative --keep_last deletes checkpoints.
"""
import argparse

from trm import whole_step
from trm.cli import PathList, range_error
from trm.metrics import tensorboard_missing
from trm.schedule import WSD_COOLDOWN

# the flags that make the architecture: a resumed run keeps the checkpoint's values
ARCH_FLAGS = ("arch", "d_model", "n_heads", "n_layers", "latent_steps", "deep_steps", "supervision_steps", "dropout",
              "max_seq_len", "grad_deep_steps", "single_stream", "qk_norm", "zero_init", "logit_softcap",
              "prelude_layers", "coda_layers", "step_embed", "adapter_rank", "tie_embeddings")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The epilog's layout as written; each flag's default shown once (appended unless its help already says it)."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


RANGES = {  # flag: its range (trm/cli.py's notation), or (its range, what a value at the edge means)
    **{name: "[1, inf)" for name in ("batch_size", "grad_accum", "max_seq_len", "max_steps", "eval_every",
                                     "log_every", "eval_tokens", "d_model", "n_heads", "n_layers", "latent_steps",
                                     "deep_steps", "supervision_steps")},
    **{name: "[0, inf)" for name in ("warmup_steps", "save_every", "keep_last", "num_workers", "seed")},
    "grad_deep_steps": ("[0, inf)", "0 = all"),
    **{name: "[0, inf)" for name in ("prelude_layers", "coda_layers")},
    "adapter_rank": ("[0, inf)", "0 = off"),
    "logit_softcap": ("[0, inf)", "0 = off"),
    "muon_ns_steps": "[1, inf)",
    "lr": "(0, inf)",
    "weight_decay": "[0, inf)",
    "grad_clip": ("[0, inf)", "0 = no clipping"),
    "dropout": "[0, 1)",
    "ema_decay": ("[0, 1)", "0 = no EMA"),
    "max_minutes": ("[0, inf)", "0 = no time budget"),
    "act_weight": ("[0, inf)", "0 = no halting head"),
    "train_halt_threshold": "[0, 1]",
    "depth_warmup": ("[0, 1)", "0 = off"),
    "lr_cooldown": "(0, 1]",
}


def check_flags(args, world_size=1):
    """The first problem with the flags as a one-line message, or None."""
    if problem := range_error(args, RANGES):
        return problem
    if args.sup_update == "each" and (world_size > 1 or args.grad_accum > 1):
        return "--sup_update each runs one process without --grad_accum (its optimizer steps inside the forward pass)"
    if args.random_depth and args.depth_warmup:  # (the draw would win, and the warm-up be ignored without a word)
        return ("--depth_warmup fixes one deep step for the start and --random_depth draws the depth every step: "
                "choose one")
    if args.lr_cooldown is not None and args.lr_schedule != "wsd":
        return f"--lr_cooldown is the cool-down of --lr_schedule wsd; this run's schedule is {args.lr_schedule}"
    if args.train_halt_threshold is not None and not args.act_weight:
        return "--train_halt_threshold needs --act_weight > 0"
    if args.tensorboard and (problem := tensorboard_missing()):
        return problem
    if args.overwrite and args.resume == "auto":
        return "--overwrite starts a new run and --resume auto continues the old one: choose one"
    if args.compile == "whole" and (why := not_compilable(args)):
        return f"--compile whole cannot capture this step: {why}"
    if args.compile == "whole" and (problem := whole_step.refusal(args, world_size)):
        return problem
    return None


# Tokens per micro-step up to which a CUDA step is launch-bound: at the procedure's batch 4 x 512 = 2,048 the GPU waits
# on kernel launches, and CUDA graphs (one launch per step) ran 6x faster on an H100; at 64 x 512 plain torch.compile
# is compute-bound and graphs only cost memory (BENCHMARKS.md, step 3 speed).
GRAPH_TOKENS = 8192


def not_compilable(args):
    """Why the trainer's flags make a step that torch.compile cannot take whole, or None."""
    if args.sup_update == "each":
        return "--sup_update each steps the optimizer inside the forward pass"
    if args.random_depth == "all":
        return "--random_depth makes a new graph for every depth drawn"
    if args.train_halt_threshold is not None:
        return "--train_halt_threshold stops tokens depending on the data"
    return None


def choose_compile(requested, device_type, tokens_per_micro_step, not_compilable=None, whole_refused=None):
    """(mode, why): how the step runs for --compile auto|on|off|graphs|whole. mode is "off", "on" (torch.compile),
    "graphs" (its forward and backward as CUDA graphs) or "whole" (compiled without graphs of its own:
    trm/whole_step.py captures the whole step around it). not_compilable: why this run's step cannot be compiled, or
    None; whole_refused: why auto should not capture it whole (trm/whole_step.py refusal), or None."""
    if requested == "off":
        return "off", "--compile off"
    if not_compilable:
        return "off", f"not compiled: {not_compilable}"
    if requested == "on":
        return "on", "--compile on"
    if requested in ("graphs", "whole") and device_type != "cuda":  # (the GPU commands on a CPU: minutes of compiling)
        return "off", f"--compile {requested}: no CUDA graphs on {device_type}, so not compiled (--compile on is)"
    if requested == "graphs":
        return "graphs", "--compile graphs"
    if requested == "whole":
        return "whole", "--compile whole: the step (forward, backward, clipping, optimizer, EMA) as one CUDA graph"
    if device_type != "cuda":
        return "off", f"--compile auto: not compiled on {device_type}"
    if tokens_per_micro_step > GRAPH_TOKENS:
        return "on", (f"--compile auto: torch.compile without CUDA graphs, as {tokens_per_micro_step:,} tokens per "
                      f"micro-step > {GRAPH_TOKENS:,} make the step compute-bound")
    bound = f"{tokens_per_micro_step:,} tokens per micro-step <= {GRAPH_TOKENS:,} make the step launch-bound"
    if whole_refused:  # (several processes, --grad_accum, Muon: the forward and backward graphed, the rest launched)
        return "graphs", f"--compile auto: CUDA graphs, as {bound}"
    # the optimizer, clipping and EMA captured too: at the procedure's batch 664-668k tokens/s in every log window,
    # against 482-655k with the forward and backward alone graphed (BENCHMARKS.md, issue 20)
    return "whole", f"--compile auto: the whole step (optimizer and EMA included) as one CUDA graph, as {bound}"


def trainer_parser(doc=None):
    """train_trm_lm.py's flags: the procedure's, with their names, meanings and defaults, then this project's.

    doc: the script's docstring (first line: the description; second paragraph: the example) for --help; None for
    a parser that only reads flags (benchmarks and tests that want the trainer's defaults)."""
    p = argparse.ArgumentParser(description=doc and doc.split("\n")[0], formatter_class=HelpFormatter,
                                epilog=doc and "example (the procedure's step 3):\n" + doc.split("\n\n")[1])
    # data and tokenizer (the procedure's flags)
    p.add_argument("--tokenizer", default="sentencepiece", choices=["sentencepiece", "byte"],
                   help="byte: raw UTF-8 bytes, no model file")
    p.add_argument("--sp_model", default="ja_trm.model", help="the SentencePiece model of step 2")
    p.add_argument("--train_paths", nargs="+", action=PathList, default=[f"train_{i}.jsonl.gz" for i in range(11)],
                   help="training JSONL.GZ files (default: train_0.jsonl.gz ... train_10.jsonl.gz)")
    p.add_argument("--valid_paths", nargs="*", action=PathList, default=["validation_0.jsonl.gz"],
                   help="validation files; none: no evaluation (default: validation_0.jsonl.gz)")
    p.add_argument("--text_field", default="text", help="the JSON field (Parquet: column) holding each document's text")
    p.add_argument("--save_dir", default="checkpoints_new",
                   help="checkpoints, metrics.jsonl, training_curves.png; one run's alone (see --overwrite)")
    p.add_argument("--cache_dir", default=None, help="token cache folder (default: token_cache/ beside --save_dir)")
    p.add_argument("--num_workers", type=int, default=0, help="tokenizer threads for the token cache (0 = all cores)")
    # schedule and logging
    p.add_argument("--batch_size", type=int, default=4, help="sequences per GPU per micro-step")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--max_seq_len", type=int, default=512, help="tokens per window (a resumed run keeps its own)")
    p.add_argument("--max_steps", type=int, default=50000,
                   help="training steps of the whole run, one batch each (--sup_update each steps the optimizer once "
                        "per supervision round of a step)")
    p.add_argument("--max_minutes", type=float, default=0,
                   help="also stop after this many minutes of training (evaluation and saving not counted; 0 = off); "
                        "the lr schedule then follows whichever of steps or minutes runs out first")
    p.add_argument("--eval_every", type=int, default=500,
                   help="evaluate every N steps (the EMA weights; the raw ones with --ema_decay 0)")
    p.add_argument("--eval_tokens", type=int, default=262144, help="validation target tokens per evaluation")
    p.add_argument("--log_every", type=int, default=100, help="a log line every N steps")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write metrics.jsonl's numbers as TensorBoard scalars in DIR (needs the tensorboard "
                        "package; default: off)")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0 = at every evaluation)")
    p.add_argument("--keep_last", type=int, default=3,
                   help="keep the newest N step_N.pt (0 = keep all); final_step_N.pt, best.pt (lowest validation "
                        "loss) and the checkpoint just written are always kept")
    p.add_argument("--resume", default=None,
                   help="'auto': the newest checkpoint of the run in --save_dir, or a checkpoint path "
                        "(default: a new run)")
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
    p.add_argument("--tie_embeddings", action="store_true",
                   help="one matrix for the token embedding and the output head: at a 16k vocabulary that is "
                        "vocab x d_model parameters fewer (4.1M at d_model 256), counted once")
    p.add_argument("--grad_deep_steps", type=int, default=1,
                   help="deep steps per supervision round that backpropagate, the last ones (the paper: 1; 0 = all)")
    p.add_argument("--single_stream", action="store_true",
                   help="one latent state instead of the answer y and the latent z (same net calls; a variant)")
    # stabilizers and hybrid depth: off by default (the seed model)
    p.add_argument("--qk_norm", action="store_true", help="RMS-normalize queries and keys in every attention")
    p.add_argument("--zero_init", action="store_true",
                   help="attention and MLP output projections start at zero (every block starts as identity)")
    p.add_argument("--logit_softcap", type=float, default=0.0, help="logits = cap * tanh(logits / cap); 0 = off")
    p.add_argument("--prelude_layers", type=int, default=0,
                   help="--arch trm: unshared blocks on the embedded tokens before the recursion")
    p.add_argument("--coda_layers", type=int, default=0,
                   help="--arch trm: unshared blocks between each round's answer state and the output head")
    p.add_argument("--step_embed", action="store_true",
                   help="--arch trm: a learned vector per deep step, added to the tokens in that step's z-updates")
    p.add_argument("--adapter_rank", type=int, default=0,
                   help="--arch trm: a rank-R delta on every matrix of the shared blocks, one per net call of a deep "
                        "recursion, so the calls need not compute alike (trained with AdamW; 0 = off)")
    # optimizer
    p.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate (of both optimizers with --optimizer muon: see there)")
    p.add_argument("--lr_schedule", default="cosine", choices=["cosine", "linear", "constant", "wsd"],
                   help="after warm-up: cosine or linear decay to 10%% of --lr; constant; or wsd: --lr held, then a "
                        "linear cool-down to 0 over the last --lr_cooldown of the run")
    p.add_argument("--lr_cooldown", type=float, default=None,
                   help="--lr_schedule wsd: the share of the run after warm-up spent cooling down to 0 (default "
                        f"{WSD_COOLDOWN})")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                   help="muon: Muon (trm/muon.py) for the blocks' weight matrices, AdamW for the "
                        "embedding, the heads and the vectors. Muon scales its step per matrix to AdamW's update size "
                        "(Moonshot's rule), so the same --lr and --weight_decay are a sensible start")
    p.add_argument("--muon_ns_steps", type=int, default=5,
                   help="--optimizer muon: Newton-Schulz iterations a step. At small batches they are a large "
                        "share of a step's time; fewer are cheaper but orthogonalize less exactly")
    p.add_argument("--muon_ns_coefficients", default="jordan", choices=["jordan", "polar_express"],
                   help="--optimizer muon: the Newton-Schulz polynomials. jordan: Keller Jordan's one quintic (as "
                        "torch.optim.Muon); polar_express: one per iteration (arXiv 2505.16932), nearer orthogonal "
                        "at 5 iterations or more, at the same cost (trm/muon.py)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="weight decay of the weight matrices")
    p.add_argument("--warmup_steps", type=int, default=500, help="linear warm-up to --lr over N steps")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 = no clipping)")
    p.add_argument("--ema_decay", type=float, default=0.995, help="EMA of the weights, evaluated and saved (0 = none)")
    p.add_argument("--random_depth", nargs="?", const="all", default=None, choices=["all", "deep"],
                   help="draw the depth every step (seeded), so the model also works at depths it was not trained at. "
                        "all (the flag alone): latent_steps in 1..2n, deep_steps in 1..2T and supervision_steps in "
                        "1..2N (no compile); deep: deep_steps in 1..2T only, compiled (one graph per depth)")
    p.add_argument("--depth_warmup", type=float, default=0.0,
                   help="one deep step per round for this fraction of the run, then the full depth (0 = off); "
                        "the evaluations meanwhile score that depth, and best.pt keeps only full-depth ones")
    p.add_argument("--act_weight", type=float, default=0.0,
                   help="weight of a per-token halting head's loss (0 = no head), for generate.py --halt_threshold")
    p.add_argument("--train_halt_threshold", type=float, default=None,
                   help="train with adaptive depth (needs --act_weight): a token stops its rounds once the halting "
                        "head's probability exceeds this, as in generate.py --halt_threshold (default: off)")
    p.add_argument("--collapse_guard", default="on", choices=["on", "off"],
                   help="stop (exit code 3) a run whose validation loss falls back to the unigram level after "
                        "warm-up (two evaluations in a row at >= 97%% of the training tokens' unigram entropy and not "
                        "falling, or halfway back there from the best), naming a safer --lr; the collapsed weights are "
                        "never saved")
    p.add_argument("--sup_update", default="mean", choices=["mean", "each"],
                   help="one optimizer step on the mean of the rounds' losses, or one after each round as in the paper "
                        "(one process, not compiled)")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cpu or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on GPUs that have it, else fp32")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off", "graphs", "whole"],
                   help="torch.compile; graphs: with CUDA graphs (mode reduce-overhead); whole: the whole step, "
                        "optimizer and EMA included, as one CUDA graph (one process, no --grad_accum); auto: "
                        f"on CUDA, whole (else graphs) when a micro-step has <= {GRAPH_TOKENS} tokens (launch-bound), "
                        "and the choice is logged")
    p.add_argument("--seed", type=int, default=1337, help="weights, data order, dropout")
    return p
