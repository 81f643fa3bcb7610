"""Validation numbers: bits per byte computed from the loss and the bytes the targets stand for; the CLI."""
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conftest import japanese_lines
from trm.data import document_ids, eval_windows
from trm.evaluate import evaluate
from trm.model import TRM, TRMConfig
from trm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_bits_per_byte_is_the_loss_over_the_bytes_the_targets_stand_for(tiny_sp_model):
    tok = Tokenizer.from_args("sentencepiece", tiny_sp_model)
    texts = japanese_lines(40, seed=3)
    ids = [i for doc in document_ids(tok, texts) for i in doc]
    windows = eval_windows(np.array(ids), 32, 10_000)
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, max_seq_len=32, dropout=0.0))
    r = evaluate(model, windows, tok.token_bytes(), batch_size=3)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1), reduction="sum").item()
    target_bytes = int(tok.token_bytes()[windows[:, 1:].numpy()].sum())
    # the bytes of the targets are the UTF-8 bytes of their text (BOS/EOS count none)
    text = tok.decode([i for i in windows[:, 1:].reshape(-1).tolist()])
    assert target_bytes == len(text.encode("utf-8"))
    assert r["tokens"] == windows[:, 1:].numel() and r["bytes"] == target_bytes
    assert math.isclose(r["loss"], nats / r["tokens"], rel_tol=1e-5)
    assert math.isclose(r["bits_per_byte"], nats / math.log(2) / target_bytes, rel_tol=1e-5)
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-6)


def test_evaluate_command_prints_one_json_object(tiny_checkpoint, tmp_path):
    data = tmp_path / "validation_0.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        for t in japanese_lines(50, seed=1):
            f.write(json.dumps({"text": t, "meta": {}}, ensure_ascii=False) + "\n")
    cmd = [sys.executable, "-m", "trm.evaluate", "--model_path", tiny_checkpoint, "--data", str(data),
           "--eval_tokens", "500"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "params"} <= set(result)
    assert 0 < result["tokens"] <= 500 and result["bytes"] > 0
    missing = subprocess.run([*cmd[:-4], "--data", str(tmp_path / "nope.jsonl.gz")], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "nope.jsonl.gz" in missing.stderr and "Traceback" not in missing.stderr
