"""Fixtures shared by the tests: a tiny SentencePiece model, a tiny checkpoint that uses it and a tiny JSONL.GZ corpus,
built in tmp dirs."""
import io
import os
import random

import pytest

WORDS = ("私 は 猫 が 好き です 。 今日 の 天気 晴れ 雨 明日 学校 に 行き ます 本 を 読む 東京 大阪 日本 語 先生 友達 "
         "と 話す 山 川 海 見る 食べる ご飯 美味しい 春 夏 秋 冬 、").split()

# Kanji that never occur in the training lines: the tiny model encodes them as three byte-fallback tokens each,
# so a prompt made of them has tokens that split characters.
RARE = "鬱蒼とした薔薇"


def japanese_lines(n=2000, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(n)]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): tiny
    matmuls gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits made such modules 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small train shards and a validation file in the users' format (trainer_run.make_corpus), per module."""
    from trainer_run import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_sp_model(tmp_path_factory):
    """Path to a 400-piece BPE SentencePiece model, byte fallback, the project's special ids (trains in ~0.1 s)."""
    import sentencepiece as spm

    from trm.tokenizer import SPM_SPECIAL_IDS

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(japanese_lines()), model_writer=proto, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   add_dummy_prefix=False, minloglevel=2, **SPM_SPECIAL_IDS)
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    path.write_bytes(proto.getvalue())
    return str(path)


def make_checkpoint(path, tokenizer, seed=0, **config):
    """A checkpoint as train_trm_lm.py writes it, with random weights (EMA = raw). Returns the model."""
    import torch

    from trm.checkpoint import save_checkpoint
    from trm.model import TRM, TRMConfig

    kw = dict(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, max_seq_len=64, dropout=0.0)
    kw.update(config)
    cfg = TRMConfig(**kw)
    torch.manual_seed(seed)
    model = TRM(cfg).eval()
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(),
                     "ema": {"model": model.state_dict(), "updates": 0, "decay": 0.995},
                     "tokenizer": tokenizer.to_state(), "step": 0, "args": {}}, str(path))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_sp_model):
    """Path to a checkpoint of a d_model=32, max_seq_len=64 TRM (random weights) with the tiny SentencePiece model."""
    from trm.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("ckpt") / "final_step_0.pt"
    make_checkpoint(path, Tokenizer.from_args("sentencepiece", tiny_sp_model))
    return str(path)


@pytest.fixture(scope="session")
def halting_checkpoint(tmp_path_factory, tiny_sp_model):
    """A tiny_checkpoint with a halting head that says "stop" for about half the tokens after round 1."""
    import torch

    from trm.checkpoint import save_checkpoint
    from trm.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("halt") / "final_step_0.pt"
    model = make_checkpoint(path, Tokenizer.from_args("sentencepiece", tiny_sp_model), halt_head=True,
                            supervision_steps=3)
    with torch.no_grad():
        model.halt.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
        q = model.halt(next(model.rounds(torch.arange(4, 68).view(1, -1)))).flatten()
        model.halt.bias.fill_(-q.median())
    state = torch.load(path, weights_only=True)
    state["model"] = state["ema"]["model"] = model.state_dict()
    save_checkpoint(state, str(path))
    return str(path)


def help_blocks(text):
    """--help's options section as {'--flag': its help text}."""
    blocks, name = {}, None
    for line in text.split("options:")[1].split("\n\n")[0].splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif name:
            blocks[name] += " " + line.strip()
    return blocks


def assert_one_line_error(r, *words, code=None):
    """A script refused with exactly one `error: ...` line holding every word, no traceback and a non-zero exit status
    (`code` when given); returns the line."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


# Runs a script (argv[2:]) in this interpreter after hooking every module's forward pass, and writes to argv[1] the
# dtypes that nn.Linear layers produced while in training mode: the precision the training forward really ran in.
TRAINING_DTYPES = """
import json, os, runpy, sys, torch
seen = set()

def note(module, args, out):
    if module.training and isinstance(module, torch.nn.Linear):
        seen.add(str(out.dtype).removeprefix("torch."))

torch.nn.modules.module.register_module_forward_hook(note)
out_file, sys.argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python script.py` would
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(out_file, "w") as f:
        json.dump(sorted(seen), f)
"""


def training_dtypes(script, args, tmp_path, timeout=300):
    """(the dtypes the Linear layers of `script args` output while training, the finished process)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "dtypes.json"
    r = subprocess.run([sys.executable, "-c", TRAINING_DTYPES, str(out), str(script), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return set(json.loads(out.read_text())), r


def without_packages(tmp_path, *names):
    """An environment for a subprocess in which `import name` fails as if the package were not installed: a module of
    that name that raises ModuleNotFoundError, first on PYTHONPATH. The optional packages' refusals stay tested where
    they are installed."""
    import os
    hide = tmp_path / "hidden_packages"
    hide.mkdir(exist_ok=True)
    for name in names:
        (hide / f"{name}.py").write_text(f"raise ModuleNotFoundError('{name} hidden by the test', name='{name}')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]))


def unreadable_file(path):
    """A path that opens but fails on its first read (EIO), as a file on a failing disk does: a link to /proc/self/mem
    (Linux; the reading process's own memory, whose offset 0 is never mapped). Skips where there is none."""
    os.symlink("/proc/self/mem", path)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError:
        return str(path)
    pytest.skip("no /proc/self/mem that fails to read here")
