"""Resuming a run's data position and generators: never onto another token stream without a word (said once, not once
per rank), and on a machine with fewer GPUs than the one that saved them."""
import gzip
import json
import os
import random

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error
from trainer_run import train
from trm.checkpoint import load_checkpoint
from trm.data import PackedLoader, load_tokens
from trm.resume import restore
from trm.tokenizer import Tokenizer


def write_jsonl_gz(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    return str(path)


@pytest.mark.slow
def test_a_resume_with_the_training_files_in_another_order_is_refused(corpus, tmp_path):
    # the files' order is the stream's: the same tokens in another order give as many windows, so the loader alone
    # cannot tell, and the rest of the epoch would repeat some text and skip other text
    save, files = tmp_path / "ck", [corpus["train_0"], corpus["train_1"]]
    common = ("--eval_every", "2", "--cache_dir", str(tmp_path / "cache"))
    train(corpus, save, *common, "--max_steps", "2", "--train_paths", *files)
    r = train(corpus, save, *common, "--max_steps", "3", "--resume", "auto", "--train_paths", *files[::-1],
              check=False)
    assert_one_line_error(r, "another order", files[0], code=2)
    assert not (save / "final_step_3.pt").exists()
    train(corpus, save, *common, "--max_steps", "3", "--resume", "auto", "--train_paths", *files)  # its order works
    assert load_checkpoint(save / "final_step_3.pt")["step"] == 3


def test_a_resume_on_other_tokens_of_the_same_length_is_told(tmp_path, capsys):
    tok = Tokenizer("byte")
    a = write_jsonl_gz(tmp_path / "a.jsonl.gz", ["吾輩は猫である。", "名前はまだ無い。"])
    b = write_jsonl_gz(tmp_path / "b.jsonl.gz", ["名前はまだ無い。", "吾輩は猫である。"])  # same length, other stream
    cache = str(tmp_path / "c")
    first = PackedLoader(load_tokens([a], tok, cache, log=lambda m: None), 8, 2, seed=1)
    first.next_batch()
    state = first.state_dict()
    capsys.readouterr()
    other = PackedLoader(load_tokens([b], tok, cache, log=lambda m: None), 8, 2, seed=1)
    assert other.n_windows == first.n_windows
    other.load_state_dict(state)
    assert "training corpus changed" in capsys.readouterr().err
    # the same text in a rebuilt cache (the file touched: a new key) is the same stream: nothing to tell
    os.utime(a, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns + 10**9))
    same = PackedLoader(load_tokens([a], tok, cache, log=lambda m: None), 8, 2, seed=1)
    assert len(list((tmp_path / "c").glob("*.bin"))) == 3
    same.load_state_dict(state)
    assert capsys.readouterr().err == ""
    assert same.cursor == first.cursor


def test_a_changed_corpus_is_told_once_under_torchrun_not_once_per_rank(tmp_path, capsys):
    # every rank loads the same checkpoint: rank 0 says it (two processes printed the warning twice)
    tok = Tokenizer("byte")
    a = write_jsonl_gz(tmp_path / "a.jsonl.gz", ["吾輩は猫である。" * 4])
    b = write_jsonl_gz(tmp_path / "b.jsonl.gz", ["名前はまだ無い。"])  # another length: fewer windows
    cache = str(tmp_path / "c")
    state = PackedLoader(load_tokens([a], tok, cache, log=lambda m: None), 8, 2, seed=1, world_size=2).state_dict()
    capsys.readouterr()
    tokens = load_tokens([b], tok, cache, log=lambda m: None)
    ranks = [PackedLoader(tokens, 8, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    assert capsys.readouterr().err.count("training corpus changed") == 1
    assert [loader.cursor for loader in ranks] == [state["cursor"]] * 2


def test_a_checkpoint_resumes_where_fewer_gpus_are_visible(monkeypatch):
    # a checkpoint keeps the generator of every GPU its machine had (each rank of a two-GPU run: two); resumed on one
    # GPU (another machine, or CUDA_VISIBLE_DEVICES=0 to continue on one process), it ended in torch's IndexError
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = PackedLoader(np.arange(100), 8, 2)
    gpu_states = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": gpu_states},
            "step": 4, "tokens_seen": 64}
    restored = {}

    def set_rng_state(state, device="cuda"):  # torch's, on a machine with one GPU
        if device >= 1:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[device]
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what torch.cuda.set_rng_state_all calls
    assert restore(ckpt, model, optimizer, None, loader, torch.device("cuda", 0))[0] == 4
    assert list(restored) == [0] and torch.equal(restored[0], gpu_states[0])  # GPU 0's own stream goes on
