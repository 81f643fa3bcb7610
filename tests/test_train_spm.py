"""train_spm.py (step 2): every document reaches the trainer, no <unk>, clear errors, outputs only when finished."""
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import help_blocks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_spm.py")
AOZORA = ROOT.parent / "shared/corpus/aozora"
sys.path.insert(0, str(ROOT))
from train_spm import split_line  # noqa: E402

from trm.tokenizer import Tokenizer  # noqa: E402

WORDS = ["吾輩", "は", "猫", "で", "ある", "名前", "まだ", "無い", "どこ", "生れ", "た", "か", "見当", "が", "つか",
         "ぬ", "何", "でも", "薄暗い", "所", "泣い", "て", "い", "記憶", "し", "ニャー", "１２３", " "]
RARE = "薔薇園"  # appears only in the tail of one long document


def sentence(rng):
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice("。。。！？")


def corpus_lines(n_docs=400, seed=0):
    rng = random.Random(seed)
    docs = ["".join(sentence(rng) for _ in range(rng.randint(1, 8))) for _ in range(n_docs)]
    # a document far over the 4,192-byte line limit whose tail alone holds RARE: the old script dropped it whole
    docs[7] = "".join(sentence(rng) for _ in range(400)) + (RARE + "の花が咲いた。") * 60
    return docs


def run(cwd, *args, timeout=120, preexec_fn=None):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "train_texts.txt").write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    r = run(d, "--vocab_size", "400", "--character_coverage", "1.0", "--num_threads", "2")
    return d, r


def test_split_line_keeps_all_text_under_the_limit():
    rng = random.Random(1)
    line = "".join(sentence(rng) for _ in range(500)) + "句読点のない長い文" * 300 + " 英語 words " * 400
    assert len(line.encode()) > 20_000
    pieces = split_line(line, 4192)
    assert all(0 < len(p.encode()) < 4192 for p in pieces)
    assert "".join(pieces).replace(" ", "") == line.replace(" ", "")  # only the spaces between pieces go
    assert split_line("短い。文書！本当？「はい。」と言った", 4192) == ["短い。", "文書！", "本当？", "「はい。」", "と言った"]


def test_hard_split_at_character_boundaries():
    line = "鸞" * 5000  # 15,000 bytes, not one break anywhere
    pieces = split_line(line, 100)
    assert "".join(pieces) == line and all(len(p.encode()) < 100 for p in pieces)


def test_cli_trains_on_every_document(trained):
    d, r = trained
    assert r.returncode == 0, r.stderr
    assert (d / "ja_trm.model").is_file() and (d / "ja_trm.vocab").is_file()
    assert [p.name for p in d.iterdir() if ".tmp" in p.name] == []
    tok = Tokenizer.from_args("sentencepiece", str(d / "ja_trm.model"))  # special ids 0..3 are checked here
    pieces = {tok.sp.id_to_piece(i) for i in range(tok.vocab_size)}
    assert tok.vocab_size == 400
    assert any(RARE[:2] in p for p in pieces)  # learnt from the tail of a 20 kB line
    assert "\n" in pieces
    for key in ["vocab size", "bytes/token", "characters/token", "unknown rate", "round trip"]:
        assert key in r.stdout
    assert "unknown rate      0.0000%" in r.stdout


def test_no_unknowns_on_rare_kanji_and_newlines_are_one_token(trained):
    d, _ = trained
    tok = Tokenizer.from_args("sentencepiece", str(d / "ja_trm.model"))
    text = "鱻龘齉は見たことのない字だ。\n次の段落。"
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # byte fallback instead of <unk>
    assert ids.count(tok.sp.piece_to_id("\n")) == 1
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", ["validation_0.jsonl.gz", "validation_0.parquet"])
def test_eval_file_corpus(trained, tmp_path, name):
    d, _ = trained
    texts = corpus_lines(50, seed=9)
    if name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (requirements-test.txt)")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts}), str(tmp_path / name))
    else:
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    r = run(d, "--vocab_size", "400", "--character_coverage", "1.0", "--model_prefix", str(tmp_path / "m"),
            "--eval_file", str(tmp_path / name))
    assert r.returncode == 0, r.stderr
    assert f"{name}: 50 documents" in r.stdout and "unknown rate      0.0000%" in r.stdout
    assert "skipped" not in r.stderr
    if name.endswith(".gz"):  # records it cannot read are told of, not dropped in silence
        with gzip.open(tmp_path / name, "at", encoding="utf-8") as f:
            f.write('not json\n{"text": 3}\n')
        r = run(d, "--vocab_size", "400", "--character_coverage", "1.0", "--model_prefix", str(tmp_path / "m"),
                "--eval_file", str(tmp_path / name))
        assert r.returncode == 0 and f"{name}: 50 documents" in r.stdout, r.stderr
        assert "2 records skipped (1 malformed JSON, 1 no string 'text' field" in r.stderr, r.stderr


def test_text_that_does_not_come_back_is_warned_of(tmp_path):
    # 300 pieces of this text keep none for its one space a line: it travels as the bytes of '▁' and comes back so
    lines = [f"{i}番目の文書です。今日は{'晴れ' if i % 2 else '雨'}でした。 猫が{i % 7}匹、庭で遊んでいます。"
             for i in range(110)]
    (tmp_path / "train_texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run(tmp_path, "--vocab_size", "300", "--model_prefix", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "round trip        0/110" in r.stdout
    assert "110 of 110 documents do not decode back to their text (the vocabulary has no piece for a space" in r.stderr
    # the same text without its spaces comes back whole: no warning
    (tmp_path / "train_texts.txt").write_text("\n".join(x.replace(" ", "") for x in lines) + "\n", encoding="utf-8")
    r = run(tmp_path, "--vocab_size", "300", "--model_prefix", str(tmp_path / "m"))
    assert r.returncode == 0 and "do not decode back" not in r.stderr, r.stderr


def test_missing_input_points_to_step_1(tmp_path):
    assert_one_line_error(run(tmp_path), "train_texts.txt not found", "python extract_texts.py", code=2)
    (tmp_path / "corpus").mkdir()
    assert_one_line_error(run(tmp_path, "--input", str(tmp_path / "corpus")), "is a folder",
                          f"extract_texts.py --inputs {tmp_path / 'corpus'}", code=2)


def test_empty_input(tmp_path):
    (tmp_path / "train_texts.txt").write_text("\n\n  \n")
    assert_one_line_error(run(tmp_path), "empty", code=2)


def test_vocab_too_large_suggests_a_size_and_keeps_the_old_model(tmp_path):
    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(30)) + "\n", encoding="utf-8")
    (tmp_path / "ja_trm.model").write_bytes(b"old model")
    r = run(tmp_path, "--vocab_size", "16000", "--character_coverage", "1.0")
    conftest.assert_one_line_error(r, "too large for this corpus", code=2)
    suggested = int(r.stderr.split("Use --vocab_size ")[1].split()[0])
    assert 300 < suggested < 16000
    assert (tmp_path / "ja_trm.model").read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ja_trm.model", "train_texts.txt"]


@pytest.mark.corpus
@pytest.mark.slow
def test_shared_corpus_small_model(tmp_path):
    if not AOZORA.is_dir():
        pytest.skip(f"{AOZORA} not present")
    with gzip.open(AOZORA / "train_2.jsonl.gz", "rt", encoding="utf-8") as src:
        lines = [json.loads(line)["text"].replace("\n", " ") for line in src]
    (tmp_path / "train_texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run(tmp_path, "--vocab_size", "3000", "--character_coverage", "0.99", "--input_sentence_size", "30000",
            "--eval_file", str(AOZORA / "validation_0.jsonl.gz"))
    assert r.returncode == 0, r.stderr
    assert "unknown rate      0.0000%" in r.stdout
    bytes_per_token = float(r.stdout.split("bytes/token")[1].split()[0])
    assert bytes_per_token > 2.5


# ---- flags, inputs and outputs checked before the work --------------------------------------------------------------

def assert_one_line_error(r, *words, code=2):
    conftest.assert_one_line_error(r, *words, code=code)
    assert "sample:" not in r.stderr  # no progress bar: refused before the work


def test_help_is_whole_shows_each_default_once_and_ends_with_an_example(tmp_path):
    r = run(tmp_path, "--help")
    assert r.returncode == 0
    assert '"\\n" is one piece of its own' in r.stdout  # was a line broken by a real newline
    counts = {k: v.count("default") for k, v in help_blocks(r.stdout).items() if k != "-h"}
    assert counts == dict.fromkeys(["--input", "--model_prefix", "--vocab_size", "--model_type", "--character_coverage",
                                    "--input_sentence_size", "--num_threads", "--max_sentence_length", "--eval_file",
                                    "--seed"], 1)
    tail = r.stdout.rstrip("\n").splitlines()
    assert tail[-2] == "example:" and tail[-1].startswith("  python train_spm.py ")


@pytest.mark.parametrize("flag,value", [("--max_sentence_length", "3"), ("--max_sentence_length", "0"),
                                        ("--character_coverage", "nan"), ("--character_coverage", "0.5"),
                                        ("--character_coverage", "inf"), ("--vocab_size", "10"),
                                        ("--num_threads", "0"), ("--seed", "-1"), ("--input_sentence_size", "-5")])
def test_numbers_out_of_range_are_refused_with_the_range(tmp_path, flag, value):
    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(30)) + "\n", encoding="utf-8")
    # --max_sentence_length 3 used to loop forever, memory growing: the timeout says so instead of hanging the suite
    r = run(tmp_path, flag, value, "--vocab_size" if flag != "--vocab_size" else "--seed", "400", timeout=30)
    assert_one_line_error(r, flag, "between")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_texts.txt"]


def test_split_line_ends_for_any_limit():
    import signal

    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("split_line did not return"))
    signal.alarm(5)
    try:
        for limit in (1, 2, 3, 4, 5):
            pieces = split_line("鸞は猫。" * 3 + "a b", limit)
            assert "".join(pieces).replace(" ", "") == ("鸞は猫。" * 3 + "ab")
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("name,content", [("x.jsonl.gz", None), ("x.txt", None), ("x.jsonl", b'{"text": "a"}\n')],
                         ids=["jsonl.gz", "gzip named .txt", "jsonl"])
def test_corpus_files_as_input_are_refused_pointing_at_step_1(tmp_path, name, content):
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus_lines(30)).encode()
    (tmp_path / name).write_bytes(content or gzip.compress(data))  # x.txt: gzip bytes under another name
    r = run(tmp_path, "--input", name, "--vocab_size", "400")
    assert_one_line_error(r, name, "python extract_texts.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_plain_text_whose_first_document_is_in_braces_is_text(tmp_path):
    # a document may open with "{" and end with "}" ({数学の集合}): only a line that parses as a record is JSON lines
    lines = ["{数学の集合}", '{"引用"}', *corpus_lines(300)]
    (tmp_path / "train_texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run(tmp_path, "--vocab_size", "400", "--character_coverage", "1.0")
    assert r.returncode == 0 and (tmp_path / "ja_trm.model").exists(), r.stderr


@pytest.mark.parametrize("name,content", [("valid.jsonl.gz", gzip.compress(b'{"body": "no text field"}\n')),
                                          ("valid.txt", b"\n  \n"), ("valid.gz.txt", gzip.compress(b"text\n"))],
                         ids=["jsonl.gz without text", "blank text", "gzip named .txt"])
def test_eval_file_without_readable_text_is_an_error_before_training(tmp_path, name, content):
    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(30)) + "\n", encoding="utf-8")
    (tmp_path / name).write_bytes(content)
    r = run(tmp_path, "--vocab_size", "400", "--character_coverage", "1.0", "--eval_file", name)
    assert_one_line_error(r, "--eval_file", name)
    assert not (tmp_path / "ja_trm.model").exists()


def test_output_directory_that_cannot_be_written_fails_before_training(tmp_path):
    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(30)) + "\n", encoding="utf-8")
    (tmp_path / "a_file").write_text("")
    prefixes = ["a_file/m", "missing_dir/m"]  # ENOTDIR, ENOENT: what even root is refused
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        prefixes.append("ro/m")
    for prefix in prefixes:
        assert_one_line_error(run(tmp_path, "--model_prefix", prefix), "cannot write", prefix, "nothing was trained")


@pytest.mark.parametrize("name", ["ja_trm.model", "ja_trm.vocab"])
def test_an_output_that_is_a_fifo_is_refused_before_training_and_left_alone(tmp_path, name):
    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(30)) + "\n", encoding="utf-8")
    os.mkfifo(tmp_path / name)
    r = run(tmp_path, "--vocab_size", "400", "--character_coverage", "1.0", timeout=30)
    conftest.assert_one_line_error(r, "cannot write", name, "FIFO", "nothing was trained", code=2)
    assert "sampling" not in r.stdout and sorted(p.name for p in tmp_path.iterdir()) == [name, "train_texts.txt"]
    assert (tmp_path / name).is_fifo()


def test_disk_full_while_writing_the_model_keeps_the_old_one(tmp_path):
    import resource
    import signal

    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(60)) + "\n", encoding="utf-8")
    (tmp_path / "ja_trm.model").write_bytes(b"old model")

    def small_disk():  # files may not grow past 64 kB: writes fail with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = run(tmp_path, "--vocab_size", "400", "--character_coverage", "1.0", preexec_fn=small_disk)
    conftest.assert_one_line_error(r, "writing ja_trm.model failed: File too large; the previous model is unchanged",
                                   code=1)
    assert (tmp_path / "ja_trm.model").read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ja_trm.model", "train_texts.txt"]


# Ctrl-C (a KeyboardInterrupt) at the first encode of the held-out evaluation, after the model was written
CTRL_C_IN_EVALUATION = """
import runpy, sys
import sentencepiece as spm
def interrupted(*a, **k):
    raise KeyboardInterrupt
spm.SentencePieceProcessor.encode = interrupted
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])  # as `python train_spm.py` would
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_during_the_evaluation_is_one_line_and_keeps_the_model(tmp_path):
    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(60)) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-c", CTRL_C_IN_EVALUATION, SCRIPT, "--vocab_size", "400",
                        "--character_coverage", "1.0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    conftest.assert_one_line_error(r, "interrupted during the evaluation", "ja_trm.model", code=130)
    assert Tokenizer.from_args("sentencepiece", str(tmp_path / "ja_trm.model")).vocab_size == 400


def test_invalid_utf8_is_counted_and_said(tmp_path):
    lines = [line.encode() for line in corpus_lines(60)]
    lines[3] = b"\xff\xfe" + lines[3]
    lines[10] = b"\x83e\x83X\x83g" + lines[10]  # Shift_JIS テスト: its three 0x83 bytes are not UTF-8
    (tmp_path / "train_texts.txt").write_bytes(b"\n".join(lines) + b"\n")
    r = run(tmp_path, "--vocab_size", "400", "--character_coverage", "1.0", "--input_sentence_size", "0")
    assert r.returncode == 0, r.stderr
    assert "warning: 2 of the lines read held invalid UTF-8 (5 bytes" in r.stderr, r.stderr


# Records the longest text the evaluation's encoder is given (in characters) into argv[1]
LONGEST_ENCODED = """
import atexit, runpy, sys
import sentencepiece as spm
longest, real = [0], spm.SentencePieceProcessor.encode
def encode(self, input, *a, **k):
    longest[0] = max([longest[0]] + [len(t) for t in (input if isinstance(input, list) else [input])])
    return real(self, input, *a, **k)
spm.SentencePieceProcessor.encode = encode
atexit.register(lambda: open(out, "w").write(str(longest[0])))
out, sys.argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_huge_one_line_document_is_evaluated_in_pieces(tmp_path):
    EVAL_CHUNK = 1 << 16  # train_spm.EVAL_CHUNK

    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(60)) + "\n", encoding="utf-8")
    (tmp_path / "huge.txt").write_text("".join(corpus_lines(400)) * 12 + "\n", encoding="utf-8")  # one line
    assert len((tmp_path / "huge.txt").read_text(encoding="utf-8")) > 3 * EVAL_CHUNK
    r = subprocess.run([sys.executable, "-c", LONGEST_ENCODED, str(tmp_path / "longest"), SCRIPT, "--vocab_size",
                        "400", "--character_coverage", "1.0", "--eval_file", "huge.txt"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 documents" in r.stdout and 0 < int((tmp_path / "longest").read_text()) <= EVAL_CHUNK


def test_one_thread_gives_the_same_model_every_run(tmp_path):
    # several threads may not (BENCHMARKS.md: 160 of 16,000 pieces differed between two runs); the help promises this
    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(seed=3)) + "\n", encoding="utf-8")
    models = []
    for prefix in ("a", "b"):
        r = run(tmp_path, "--vocab_size", "400", "--character_coverage", "1.0", "--num_threads", "1",
                "--model_prefix", prefix)
        assert r.returncode == 0, r.stderr
        models.append((tmp_path / f"{prefix}.model").read_bytes())
    assert models[0] == models[1]


@pytest.mark.parametrize("flag", ["--input", "--eval_file"])
def test_a_file_that_cannot_be_read_is_one_line(tmp_path, flag):
    # a link to /proc/self/mem opens and fails on its first read (EIO), as a file on a failing disk does; one that
    # cannot be opened (no permission) fails one step earlier, in the same place: both were a traceback
    from conftest import unreadable_file

    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(30)) + "\n", encoding="utf-8")
    unreadable_file(tmp_path / "bad.txt")
    r = run(tmp_path, flag, "bad.txt", "--vocab_size", "400")
    assert_one_line_error(r, "cannot read", "bad.txt", "Input/output error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "train_texts.txt"]


# SentencePiece's training as it looks from Python: the sample read, then a long C++ call that releases the GIL and
# takes no Ctrl-C (here a lock that is never freed, so the call never ends).
CTRL_C_IN_TRAINING = """
import ctypes, os, runpy, signal, sys, threading
import sentencepiece as spm
def train(sentence_iterator, **kwargs):
    for _ in sentence_iterator:
        pass
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C while the C++ call runs
    libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)  # zeroed: an unlocked pthread mutex
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # waits for good, deaf to signals
spm.SentencePieceTrainer.train = train
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_while_sentencepiece_trains_stops_at_once(tmp_path):
    # it used to wait for SentencePiece to finish (54 s on aozora-xl, longer on 1.8 GB): here that is forever
    (tmp_path / "train_texts.txt").write_text("\n".join(corpus_lines(60)) + "\n", encoding="utf-8")
    (tmp_path / "ja_trm.model").write_bytes(b"old model")
    r = subprocess.run([sys.executable, "-c", CTRL_C_IN_TRAINING, SCRIPT, "--vocab_size", "400"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    conftest.assert_one_line_error(r, "interrupted (Ctrl-C)", "unchanged", code=130)
    assert "SentencePiece is training on" in r.stderr  # said before the silent part
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ja_trm.model", "train_texts.txt"]
    assert (tmp_path / "ja_trm.model").read_bytes() == b"old model"
