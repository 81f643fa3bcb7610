"""Running train_trm_lm.py in the tests: a tiny corpus, the tiny flags, the command, and reading back what it wrote."""
import gzip
import json
import runpy
import subprocess
import sys
from pathlib import Path

from trm.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tokenizer", "byte", "--d_model", "32", "--n_heads", "2", "--max_seq_len", "32", "--batch_size", "4",
        "--eval_tokens", "256", "--warmup_steps", "5", "--lr", "3e-3", "--seed", "7"]


def make_corpus(d):
    lines = [f"{i}番目の文書です。今日は{'晴れ' if i % 2 else '雨'}でした。\n猫が{i % 7}匹、庭で遊んでいます。" * (1 + i % 5)
             for i in range(120)]
    paths = {}
    for name, part in (("train_0", lines[:60]), ("train_1", lines[60:110]), ("validation_0", lines[110:])):
        p = d / f"{name}.jsonl.gz"
        with gzip.open(p, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t, "meta": {}}, ensure_ascii=False) + "\n" for t in part)
        paths[name] = str(p)
    return paths


def endless_trainer(corpus, save_dir):
    """The command of a trainer that runs until it is stopped, logging every step (for signal and lock tests)."""
    return [sys.executable, str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"],
            "--valid_paths", corpus["validation_0"], "--save_dir", str(save_dir), "--max_steps", "100000",
            "--eval_every", "100000", "--log_every", "1"]


def train(corpus, save_dir, *extra, check=True, env=None):
    """The trainer on the tiny corpus; `extra` flags after it (a --train_paths or --valid_paths of its own replaces the
    corpus's)."""
    paths = [] if "--train_paths" in extra else ["--train_paths", corpus["train_0"], corpus["train_1"]]
    paths += [] if "--valid_paths" in extra else ["--valid_paths", corpus["validation_0"]]
    cmd = [sys.executable, str(ROOT / "train_trm_lm.py"), *TINY, *paths, "--save_dir", str(save_dir), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def params(path, key="model"):
    state = load_checkpoint(path)
    return state[key] if key == "model" else state[key]["model"]


def logged(save_dir, kind=None):
    """metrics.jsonl's entries (those of one kind: "train" or "eval")."""
    with open(Path(save_dir) / "metrics.jsonl") as f:
        return [h for h in map(json.loads, f) if kind in (None, h["kind"])]


def logged_losses(save_dir):
    return [(h["step"], h["kind"], h["loss"]) for h in logged(save_dir)]


def copy_run_until(src, dst, step):
    """dst as src's save dir was at `step`: its checkpoint and the metrics logged up to it (a resume test's start)."""
    dst.mkdir()
    (dst / f"step_{step}.pt").write_bytes((src / f"step_{step}.pt").read_bytes())
    (dst / "metrics.jsonl").write_text("".join(line for line in (src / "metrics.jsonl").read_text().splitlines(True)
                                               if json.loads(line)["step"] <= step))


def run_in_process(capsys, *argv):
    """The trainer in this process, for checks that end before any work (no torch import per case): (code, out, err)."""
    saved_argv, sys.argv = sys.argv, ["train_trm_lm.py", *TINY, *argv]
    try:
        runpy.run_path(str(ROOT / "train_trm_lm.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved_argv
    out = capsys.readouterr()
    return code, out.out, out.err

