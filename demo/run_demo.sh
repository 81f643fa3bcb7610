#!/usr/bin/env bash
# The whole pipeline, steps 1-4, on CPU in a few minutes: `make demo` (or `make demo DATA_DIR=../shared/corpus/aozora`).
#
# Without DATA_DIR it first writes a small synthetic Japanese corpus (demo/make_corpus.py) in the users' format.
# Every command is printed before it runs: they are the procedure's commands with a smaller tokenizer and model.
# Settings can be overridden from the environment, e.g. STEPS=2000 D_MODEL=256 make demo.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DATA_DIR="${DATA_DIR:-}"
WORK="${WORK:-$ROOT/demo_run}"
# the generated corpus is small and regular; a real corpus needs room for its thousands of kanji
if [ -z "$DATA_DIR" ]; then VOCAB="${VOCAB:-2000}"; else VOCAB="${VOCAB:-8000}"; fi
D_MODEL="${D_MODEL:-128}"
N_LAYERS="${N_LAYERS:-1}"
SEQ="${SEQ:-64}"
BATCH="${BATCH:-16}"
STEPS="${STEPS:-600}"
LR="${LR:-3e-3}"
PROMPT="${PROMPT:-昨日、田中さんは}"

run() { printf '\n$ %s\n' "$*"; "$@"; }
t0=$(date +%s)
if [ -n "$DATA_DIR" ]; then  # made absolute before the cd below: a relative DATA_DIR is one from where make ran
  [ -d "$DATA_DIR" ] || { echo "error: DATA_DIR=$DATA_DIR is not a folder (from $(pwd))" >&2; exit 2; }
  DATA_DIR="$(cd "$DATA_DIR" && pwd)"
fi
mkdir -p "$WORK"
cd "$WORK"

if [ -z "$DATA_DIR" ]; then
  DATA_DIR="$WORK/data"
  run "$PY" "$ROOT/demo/make_corpus.py" --out_dir "$DATA_DIR"
fi
mapfile -t TRAIN < <(ls "$DATA_DIR"/train_*.jsonl.gz 2>/dev/null | sort -V)  # train_0 ... train_10, in the users' order
[ ${#TRAIN[@]} -gt 0 ] || { echo "error: no train_*.jsonl.gz in $DATA_DIR" >&2; exit 2; }

# Step 1: every document, one per line
run "$PY" "$ROOT/extract_texts.py" --inputs "${TRAIN[@]}" --output train_texts.txt

# Step 2: the tokenizer (the procedure uses 16000; a few MB of text supports far fewer)
run "$PY" "$ROOT/train_spm.py" --input train_texts.txt --model_prefix ja_trm --vocab_size "$VOCAB" \
  --eval_file "$DATA_DIR/validation_0.jsonl.gz"

# Step 3: a small TRM with the procedure's recursion (latent 2, deep 2, supervision 2) around a 1-block net,
# so that a 2-core CPU gets through a few epochs of the demo corpus in about two minutes. --sup_update each: an
# optimizer step after every supervision round, as in the paper (on CPU it learns faster per step; BENCHMARKS.md)
rm -rf checkpoints_new
run "$PY" "$ROOT/train_trm_lm.py" --tokenizer sentencepiece --sp_model ja_trm.model \
  --train_paths "${TRAIN[@]}" --valid_paths "$DATA_DIR/validation_0.jsonl.gz" \
  --save_dir checkpoints_new --batch_size "$BATCH" --max_seq_len "$SEQ" --max_steps "$STEPS" \
  --eval_every $((STEPS / 3)) --log_every 50 --eval_tokens 16384 \
  --d_model "$D_MODEL" --n_heads 4 --n_layers "$N_LAYERS" --latent_steps 2 --deep_steps 2 --supervision_steps 2 --dropout 0.0 \
  --lr "$LR" --warmup_steps 50 --weight_decay 0.01 --grad_clip 1.0 --ema_decay 0.99 --sup_update each

# Step 4: generation from the final checkpoint (EMA weights, KV cache, streamed)
run "$PY" "$ROOT/generate.py" --model_path "checkpoints_new/final_step_$STEPS.pt" --sp_model ja_trm.model \
  --prompt "$PROMPT" --max_new_tokens 80 --temperature 0.7 --seed 0

"$PY" - "checkpoints_new/final_step_$STEPS.pt" <<'PYEOF'
import sys
from trm.checkpoint import load_checkpoint
m = load_checkpoint(sys.argv[1]).get("metrics") or {}
if m:
    print(f"\nvalidation (EMA weights): loss {m['loss']:.3f} nats/token, perplexity {m['perplexity']:.1f}, "
          f"{m['bits_per_byte']:.3f} bits/byte")
PYEOF
echo "checkpoints: $WORK/checkpoints_new/   curves: $WORK/checkpoints_new/training_curves.png"
echo "demo finished in $(( $(date +%s) - t0 )) s"
