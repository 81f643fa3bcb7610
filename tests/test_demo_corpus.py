"""demo/make_corpus.py: the synthetic corpus `make demo` trains on has the real shards' layout and is reproducible."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "demo", "make_corpus.py")
FILES = [f"train_{k}.jsonl.gz" for k in range(11)] + ["validation_0.jsonl.gz"]


def generate(out_dir, seed=0):
    # 30 docs a shard: ~0.2 M chars, still enough for the ~8% long documents to show up
    subprocess.run([sys.executable, SCRIPT, "--out_dir", str(out_dir), "--docs_per_shard", "30", "--valid_docs", "20",
                    "--seed", str(seed)], check=True, capture_output=True)
    return out_dir


def read_docs(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_corpus")
    return generate(root / "a"), generate(root / "b"), generate(root / "c", seed=1)


def test_files_and_format(runs):
    a = runs[0]
    assert sorted(os.listdir(a)) == sorted(FILES)  # and no .tmp left behind
    n_long = n_short = 0
    for name in FILES:
        docs = read_docs(a / name)
        assert docs, name
        for d in docs:
            text = d["text"]
            assert isinstance(text, str) and text.strip()
            assert d["meta"]["source"] == "demo" and "doc_id" in d["meta"]
            # paragraphs are "\n"-separated, each a run of complete Japanese sentences
            for para in text.split("\n"):
                assert para and para.endswith("。"), para
            n_long += len(text) >= 3000
            n_short += len(text) <= 200
    assert n_long > 0 and n_short > 0
    multi = sum("\n" in d["text"] for name in FILES for d in read_docs(a / name))
    assert multi > 0


def test_same_seed_same_bytes_other_seed_other_text(runs):
    a, b, c = runs
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    texts = lambda run: [d["text"] for d in read_docs(run / "train_0.jsonl.gz")]
    assert texts(a) != texts(c)


def test_validation_is_not_train(runs):
    a = runs[0]
    train = {d["text"] for k in range(11) for d in read_docs(a / f"train_{k}.jsonl.gz")}
    valid = {d["text"] for d in read_docs(a / "validation_0.jsonl.gz")}
    assert valid and not (valid & train)


def test_conjugation():
    spec = importlib.util.spec_from_file_location("make_corpus", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    # the cases templates most easily get wrong: 行く's て-form, godan る vs ichidan る, する/来る
    assert m.conj("行く", "te", False) == "行って"
    assert m.conj("読む", "past", False) == "読んだ"
    assert m.conj("泳ぐ", "past", False) == "泳いだ"
    assert m.conj("帰る", "past", True) == "帰りました"
    assert m.conj("食べる", "prog", True) == "食べています"
    assert m.conj("勉強する", "tai", True) == "勉強したいです"
    assert m.conj("来る", "neg_past", False) == "来なかった"
    assert m.adj_pred("静かな", 1, True) == "静かでした"
    assert m.adj_pred("青い", 1, False) == "青かった"
    assert m.kanji(12) == "十二" and m.kanji(35) == "三十五"
