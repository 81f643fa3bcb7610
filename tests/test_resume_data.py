"""A resume must not carry a data position over to another token stream of the same length without a word."""
import gzip
import json
import os

import pytest

from conftest import assert_one_line_error
from trainer_run import train
from trm.checkpoint import load_checkpoint
from trm.data import PackedLoader, load_tokens
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
