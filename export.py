"""Share a trained model: a checkpoint -> a folder that generate.py, evaluate.py and other frameworks load.

    python export.py --model_path checkpoints_new/best.pt --out ja_trm_model
    python generate.py --model_path ja_trm_model --prompt "日本語のプロンプト"

The folder holds model.safetensors (the EMA weights, or --weights raw), config.json (the model's config and the
training summary), tokenizer.model (the SentencePiece model the run used; none for --tokenizer byte) and README.md,
a model card. Only what generation needs travels: one set of weights, no optimizer moments, data position or RNG
states, so the folder is about a quarter of the checkpoint (which holds the raw weights, their EMA and two Adam
moments). Nothing in it is pickled: it loads without running code, in any framework.

--model_path may be a save dir: its best.pt, or else its newest checkpoint. An --out that holds anything is refused
unless --overwrite, which replaces the four files (each atomically) and leaves any other file there alone.
"""
import argparse
import os
import sys

from trm.checkpoint import CheckpointError, checkpoint_of, load_model
from trm.cli import fail, quiet_interrupt
from trm.model_folder import CARD, CONFIG, TOKENIZER, WEIGHTS, is_model_folder, write_folder
from trm.tokenizer import TokenizerError

parser = argparse.ArgumentParser(
    description="Export a trained Generative TRM checkpoint as a folder of safetensors weights, config, tokenizer and "
                "model card.", formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="example:\n  python export.py --model_path checkpoints_new/best.pt --out ja_trm_model")
parser.add_argument("--model_path", required=True,
                    help="a checkpoint (step_N.pt, final_step_N.pt, best.pt), or a save dir: its best.pt, else its "
                         "newest checkpoint")
parser.add_argument("--out", required=True, help="the folder to write (created; must be empty unless --overwrite)")
parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                    help="the EMA of the weights (what validation scored) or the raw ones (default: %(default)s)")
parser.add_argument("--overwrite", action="store_true",
                    help=f"write into an --out that holds files: {WEIGHTS}, {CONFIG}, {TOKENIZER} and {CARD} are "
                         f"replaced, anything else stays")
args = parser.parse_args()
quiet_interrupt()


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---- which checkpoint, and where to ------------------------------------------------------------------------------
path = args.model_path
if is_model_folder(path):
    fail(f"{path} is already an exported model folder: generate.py and evaluate.py load it as it is")
if os.path.isdir(path):  # a save dir: the checkpoint a user would share is the best one
    if (path := checkpoint_of(args.model_path)) is None:
        fail(f"{args.model_path} is a folder with no checkpoint (best.pt, step_N.pt, final_step_N.pt) in it")
    log(f"{args.model_path} is a save dir: exporting {path}")
if os.path.exists(args.out) and not os.path.isdir(args.out):
    fail(f"--out {args.out} exists and is not a folder; choose another --out")
if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
    fail(f"--out {args.out} is not empty; choose another --out, or pass --overwrite to replace the export's files "
         f"there")
if os.path.realpath(args.out) == os.path.realpath(os.path.dirname(path)):  # (a link to it is the same folder)
    fail(f"--out {args.out} is the checkpoint's own folder; choose another --out")

# ---- load: the same call generate.py and evaluate.py make, so the folder holds exactly what they would use -------
try:
    model, tokenizer, state = load_model(path, weights=args.weights)
except (CheckpointError, TokenizerError) as e:
    fail(e)
weights = args.weights if state.get("ema") is not None else "raw"  # no EMA: load_model said so and took the raw ones
c = model.config
train_args = state.get("args") or {}
training = {key: state[key] for key in ("step", "tokens_seen", "train_seconds", "run_id", "best") if key in state}
training["checkpoint"] = os.path.basename(path)
if state.get("metrics"):
    # the trainer scores the EMA weights when it keeps an EMA, and the raw ones only without
    training["validation"] = {**state["metrics"], "weights": "ema" if state.get("ema") is not None else "raw"}
if train_args:
    training["args"] = train_args


# ---- the model card --------------------------------------------------------------------------------------------
def number(x, digits=4):
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def files_list(paths):
    paths = [os.path.basename(p) for p in paths or []]
    return ", ".join(paths) if len(paths) <= 4 else f"{', '.join(paths[:3])} ... {paths[-1]} ({len(paths)} files)"


def card():
    name = os.path.basename(os.path.abspath(args.out))
    if c.recursive:
        shape = (f"TRM: {c.n_layers} shared blocks applied recursively, n={c.latent_steps} latent steps, "
                 f"T={c.deep_steps} deep steps, N_sup={c.supervision_steps} supervision rounds"
                 + (f", {c.prelude_layers} prelude and {c.coda_layers} coda blocks"
                    if c.prelude_layers or c.coda_layers else "")
                 + (", one latent stream" if c.single_stream else "") + (", halting head" if c.halt_head else ""))
    else:
        shape = f"GPT baseline: {c.n_layers} blocks applied once"
    vocab = (f"SentencePiece, {tokenizer.vocab_size:,} pieces ({TOKENIZER})" if tokenizer.kind == "sentencepiece"
             else f"UTF-8 bytes ({tokenizer.vocab_size} ids: 4 specials + 256 bytes; no tokenizer file)")
    ema = f"EMA of the weights (decay {train_args['ema_decay']})" if "ema_decay" in train_args else "EMA of the weights"
    rows = [("architecture", shape), ("parameters", f"{model.num_params():,}"),
            ("width", f"d_model {c.d_model}, {c.n_heads} heads, SwiGLU {c.mlp_hidden}"),
            ("vocabulary", vocab), ("window", f"{c.max_seq_len:,} tokens"),
            ("weights", ema if weights == "ema" else "raw (not the EMA)")]
    lines = [f"# {name}: a Generative TRM for Japanese", "",
             "A Tiny Recursive Model (\"Less is More: Recursive Reasoning with Tiny Networks\", arXiv 2510.04871) "
             "trained as a causal next-token language model with the Generative TRM pipeline's `train_trm_lm.py`, "
             f"exported from `{training['checkpoint']}` by `export.py`.", "",
             "## Model", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]

    lines += ["", "## Training", "", "| | |", "|---|---|"]
    if "step" in training:
        lines.append(f"| steps | {number(training['step'])} |")
    if "tokens_seen" in training:
        lines.append(f"| tokens seen | {number(training['tokens_seen'])} |")
    if "train_seconds" in training:
        lines.append(f"| training time | {training['train_seconds'] / 60:.1f} minutes |")
    if train_args.get("train_paths"):
        lines.append(f"| training data | {files_list(train_args['train_paths'])} |")
    # as the command gave them (0.0003, 1337): number()'s "1,337" and "0.000300" are no values a flag takes
    settings = [f"`--{k} {train_args[k]}`" for k in ("batch_size", "grad_accum", "max_seq_len", "lr",
                "lr_schedule", "warmup_steps", "weight_decay", "dropout", "optimizer", "sup_update", "seed")
                if train_args.get(k) is not None]
    if settings:
        lines.append(f"| settings | {' '.join(settings)} (per GPU batch) |")

    lines += ["", "## Results", ""]
    v = training.get("validation")
    if v:
        on = f" on {files_list(train_args['valid_paths'])}" if train_args.get("valid_paths") else ""
        lines.append(f"Validation{on} at step {number(v.get('step'))} ({v['weights']} weights, "
                     f"{number(v.get('tokens'))} tokens): loss {number(v.get('loss'))} nats/token, perplexity "
                     f"{number(v.get('perplexity'), 2)}, **{number(v.get('bits_per_byte'))} bits per UTF-8 byte** "
                     f"(of the text as its tokenizer normalizes it, NFKC for SentencePiece: comparable between "
                     f"models on one tokenizer, and across tokenizers only roughly)" +
                     (f", scored at {v['eval_depth']['deep_steps']} deep step, the depth its --depth_warmup was "
                      f"training: not the model's own depth (score that with `evaluate.py` below)"
                      if v.get("eval_depth") else "") + ".")
        best = training.get("best") or {}
        if best.get("step") is not None and best.get("step") != v.get("step"):
            lines.append(f"The lowest validation loss of the run was {number(best['loss'])} at step "
                         f"{number(best['step'])}.")
    else:
        lines.append("The checkpoint holds no validation figures (trained without --valid_paths, or before its first "
                     "evaluation). Score it with `evaluate.py` below.")

    lines += ["", "## Use", "", "With the Generative TRM pipeline (the folder stands in for a checkpoint):", "",
              "```bash", f'python generate.py --model_path {name} --prompt "日本語のプロンプト" --max_new_tokens 100',
              f"python evaluate.py --model_path {name} --data validation_0.jsonl.gz", "```", "",
              "In plain Python (`pip install safetensors sentencepiece`): the weights are a dict of tensors named as "
              "in the pipeline's `trm/model.py`; `config.json`'s `config` holds the numbers that build the model.",
              "", "```python", "import json", "", "from safetensors.torch import load_file"]
    sp = tokenizer.kind == "sentencepiece"
    lines += (["import sentencepiece as spm"] if sp else []) + [
        "", f'weights = load_file("{name}/{WEIGHTS}")  # {{name: tensor}}, no code runs',
        f'config = json.load(open("{name}/{CONFIG}", encoding="utf-8"))["config"]']
    # a document starts with BOS in training, so a prompt does too (ids: unk=0 pad=1 bos=2 eos=3)
    lines += ([f'sp = spm.SentencePieceProcessor(model_file="{name}/{TOKENIZER}")',
               'ids = [2] + sp.encode("日本語のプロンプト")  # bos=2 eos=3 pad=1 unk=0'] if sp else
              ['ids = [2] + [b + 4 for b in "日本語のプロンプト".encode()]  # UTF-8 bytes + 4; bos=2 eos=3 pad=1 unk=0'])
    lines += ["```", "", "With the pipeline's code on the path, `from trm.checkpoint import load_model; "
              f"model, tokenizer, info = load_model(\"{name}\")` gives the model ready to run.", ""]
    return "\n".join(lines)


# ---- write -----------------------------------------------------------------------------------------------------
try:
    info = write_folder(args.out, model.state_dict(), c.to_dict(), weights, tokenizer, training, card())
except OSError as e:
    made = os.path.isdir(args.out)  # (a folder that could not even be made holds nothing half-written)
    fail(f"could not write {args.out} ({e.strerror or e}); " +
         (f"the folder is incomplete and will not load (the checksums in {CONFIG}, written last, do not match): "
          f"export again" if made else "nothing was written: choose an --out you can write to"), code=1)
size = info["files"][WEIGHTS]["bytes"]
log(f"exported {path} (step {state.get('step', '?')}, {weights} weights, {model.num_params() / 1e6:.2f}M parameters) "
    f"-> {args.out}/: {WEIGHTS} ({size / 1e6:.1f} MB), {CONFIG}"
    + (f", {TOKENIZER}" if tokenizer.kind == "sentencepiece" else "") + f", {CARD}")
generate = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate.py"))  # from here
log(f'try it: python {generate} --model_path {args.out} --prompt "日本語のプロンプト"')
