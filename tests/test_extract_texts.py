"""extract_texts.py (step 1): the procedure's no-argument run, bad input, an interrupted run, the shared corpus."""
import gzip
import json
import os
import runpy
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import trm.corpus

from conftest import assert_one_line_error, help_blocks, unreadable_file, without_packages

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "extract_texts.py")
AOZORA = ROOT.parent / "shared/corpus/aozora"


def write_jsonl(path, lines):
    data = b"".join((json.dumps(x, ensure_ascii=False).encode() if isinstance(x, dict) else x) + b"\n" for x in lines)
    Path(path).write_bytes(gzip.compress(data))


def run(cwd, *args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=env)


def shard_docs(i):
    return [f"シャード{i}の文書{j}です。\n改行の後の段落。" for j in range(3)]


def test_no_arguments_as_the_procedure_says(tmp_path):
    for i in range(11):
        if i != 3:  # a missing shard is skipped with a warning, as the procedure promises
            write_jsonl(tmp_path / f"train_{i}.jsonl.gz", [{"text": t, "meta": {}} for t in shard_docs(i)])
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train_3.jsonl.gz not found" in r.stderr
    lines = (tmp_path / "train_texts.txt").read_text(encoding="utf-8").split("\n")
    assert lines.pop() == ""  # the file ends with a newline
    # shard order 0, 1, 2, 4, ..., 10 (not 0, 1, 10, 2), one document per line, line breaks become spaces
    assert lines == [t.replace("\n", " ") for i in range(11) if i != 3 for t in shard_docs(i)]
    assert "10 files, 30 documents" in r.stdout and "MB/s" in r.stdout
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_workers_give_the_same_bytes(tmp_path):
    (tmp_path / "data/x").mkdir(parents=True)
    for i in range(6):
        write_jsonl(tmp_path / f"data/x/part_{i}.jsonl.gz", [{"text": f"{i}-{j}\r\n行"} for j in range(500)])
    outputs = []
    for workers in ("1", "3"):
        r = run(tmp_path, "--inputs", "data", "--output", f"out{workers}.txt", "--workers", workers)
        assert r.returncode == 0, r.stderr
        outputs.append((tmp_path / f"out{workers}.txt").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("0-0 行\n0-1 行\n".encode())  # \r\n is one space too
    assert outputs[0].count(b"\n") == 3000


def test_bad_records_are_reported_and_the_rest_kept(tmp_path):
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "良い"}, b"{oops", {"text": None}, b'{"text": "\xff"}', {"text": "良い2"}])
    whole = gzip.compress("".join(json.dumps({"text": f"文書{i}" * 100}, ensure_ascii=False) + "\n"
                                  for i in range(300)).encode())
    (tmp_path / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # truncated mid-stream
    r = run(tmp_path, "--inputs", "a.jsonl.gz", "b.jsonl.gz", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "a.jsonl.gz:2: malformed JSON" in r.stdout and "a.jsonl.gz:4: undecodable bytes" in r.stdout
    assert "1 malformed JSON" in r.stdout and "1 no string 'text' field" in r.stdout
    assert "b.jsonl.gz: truncated gzip" in r.stdout and "b.jsonl.gz" in r.stderr
    lines = (tmp_path / "train_texts.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ["良い", "良い2"] and 2 < len(lines) < 302 and lines[2] == "文書0" * 100


def test_nothing_readable_fails_and_says_what_was_looked_for(tmp_path):
    r = run(tmp_path)  # an empty directory: none of train_0 ... train_10
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "train_0.jsonl.gz" in r.stderr and "train_10.jsonl.gz" in r.stderr
    write_jsonl(tmp_path / "x.jsonl.gz", [{"body": "テキストはbodyにある"}])
    r = run(tmp_path, "--inputs", "x.jsonl.gz")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no readable document" in r.stderr and "'text'" in r.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "x.jsonl.gz"]  # no output, no temporary files
    r = run(tmp_path, "--inputs", "x.jsonl.gz", "--text_field", "body")
    assert r.returncode == 0 and (tmp_path / "train_texts.txt").read_text(encoding="utf-8") == "テキストはbodyにある\n"
    # what each input that gave nothing is: a folder without corpus files is there, only empty of them
    (tmp_path / "empty").mkdir()
    r = run(tmp_path, "--inputs", "x.jsonl.gz", "empty", "nothing_*.jsonl.gz", "gone.jsonl.gz", "--text_field", "body")
    assert r.returncode == 0 and "warning: empty holds no *.jsonl.gz" in r.stderr, r.stderr
    assert "nothing_*.jsonl.gz matches no corpus file" in r.stderr and "gone.jsonl.gz not found" in r.stderr


def test_interrupted_run_never_leaves_a_finished_looking_output(tmp_path, monkeypatch, capsys):
    for i in range(3):
        write_jsonl(tmp_path / f"train_{i}.jsonl.gz", [{"text": f"{i}:{j}"} for j in range(1000)])
    (tmp_path / "train_texts.txt").write_text("the previous, complete output\n")
    real_iter_texts = trm.corpus.iter_texts

    def interrupted(path, *args, **kwargs):  # Ctrl-C in the middle of the second file
        for n, text in enumerate(real_iter_texts(path, *args, **kwargs)):
            if path.endswith("train_1.jsonl.gz") and n == 500:
                raise KeyboardInterrupt
            yield text

    monkeypatch.setattr(trm.corpus, "iter_texts", interrupted)
    monkeypatch.setattr(trm.corpus, "READ_SIZE", 1024)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["extract_texts.py", "--workers", "1"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # (the script installs its own)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(SCRIPT, run_name="__main__")
    # one line, the shell's code for Ctrl-C, and the truth about the output
    assert stop.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == \
        "error: interrupted (Ctrl-C); the previous train_texts.txt is unchanged."
    assert (tmp_path / "train_texts.txt").read_text() == "the previous, complete output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"train_{i}.jsonl.gz" for i in range(3)] + ["train_texts.txt"]


@pytest.mark.corpus
@pytest.mark.slow
def test_shared_corpus_every_document_extracted(tmp_path):
    if not AOZORA.is_dir():
        pytest.skip(f"{AOZORA} not present")
    files = [str(AOZORA / f"train_{i}.jsonl.gz") for i in (2, 5)]
    r = run(tmp_path, "--inputs", *files, "--output", "t.txt", "--workers", "2")
    assert r.returncode == 0, r.stderr
    expected = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as src:
            expected += [json.loads(line)["text"].replace("\n", " ") for line in src]
    got = (tmp_path / "t.txt").read_text(encoding="utf-8").split("\n")
    assert got.pop() == "" and got == expected


def test_damaged_gzip_keeps_what_zcat_keeps(tmp_path):
    docs = [f"文書{i}です。" for i in range(40)]
    data = bytearray(gzip.compress("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                           for t in docs).encode()))
    data[-8] ^= 0xFF  # the CRC trailer only: zcat prints all 40 lines, then complains
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(data))
    r = run(tmp_path, "--inputs", "crc.jsonl.gz")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "train_texts.txt").read_text(encoding="utf-8").splitlines() == docs
    assert "crc.jsonl.gz" in r.stderr and "damaged: crc.jsonl.gz: corrupt gzip data" in r.stdout


def test_a_folder_of_every_format_is_read_in_shard_order(tmp_path):
    import lzma
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (requirements-test.txt)")
    import pyarrow.parquet as pq
    zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed (requirements-test.txt)")
    data = {i: "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in shard_docs(i)).encode()
            for i in range(5)}
    (tmp_path / "in").mkdir()
    (tmp_path / "in/train_0.jsonl").write_bytes(data[0])
    (tmp_path / "in/train_1.jsonl.gz").write_bytes(gzip.compress(data[1]))
    (tmp_path / "in/train_2.jsonl.xz").write_bytes(lzma.compress(data[2]))
    (tmp_path / "in/train_3.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data[3]))
    pq.write_table(pa.table({"text": shard_docs(4)}), str(tmp_path / "in/train_4.parquet"))
    for workers in ("1", "2"):
        r = run(tmp_path, "--inputs", "in", "--workers", workers)
        assert r.returncode == 0, r.stderr
        want = [t.replace("\n", " ") for i in range(5) for t in shard_docs(i)]
        assert (tmp_path / "train_texts.txt").read_text(encoding="utf-8").splitlines() == want
        assert "5 files, 15 documents" in r.stdout


def test_a_validation_file_in_a_folder_read_is_warned_of(tmp_path):
    # the procedure's working folder holds validation_0.jsonl.gz beside the shards: `--inputs .` would fit the
    # tokenizer to the held-out text that later scores it. It is read, as asked, and said; the train_* glob is quiet
    (tmp_path / "in").mkdir()
    for name in ("train_0", "train_1", "validation_0"):
        write_jsonl(tmp_path / f"in/{name}.jsonl.gz", [{"text": f"{name}の文書です。"}])
    r = run(tmp_path, "--inputs", "in")
    assert r.returncode == 0, r.stderr
    assert "validation_0.jsonl.gz looks like held-out text" in r.stderr and "--inputs 'DIR/train_*" in r.stderr
    assert "validation_0の文書です。" in (tmp_path / "train_texts.txt").read_text(encoding="utf-8")
    r = run(tmp_path, "--inputs", "in/train_*.jsonl.gz")
    assert r.returncode == 0 and "held-out" not in r.stderr, r.stderr
    assert "validation_0" not in (tmp_path / "train_texts.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("name,package", [("train_0.jsonl.zst", "zstandard"), ("train_0.parquet", "pyarrow")])
def test_a_format_without_its_package_is_a_one_line_error(tmp_path, name, package):
    (tmp_path / name).write_bytes(b"\x28\xb5\x2f\xfd")
    r = run(tmp_path, "--inputs", name, env=without_packages(tmp_path, package))
    assert_one_line_error(r, name, f"pip install {package}")
    assert not (tmp_path / "train_texts.txt").exists()


# ---- flags and outputs checked before any work ---------------------------------------------------------------------

def test_help_shows_each_default_once_and_ends_with_an_example(tmp_path):
    r = run(tmp_path, "--help")
    assert r.returncode == 0
    blocks = help_blocks(r.stdout)
    assert {k: v.count("default") for k, v in blocks.items() if k != "-h"} == dict.fromkeys(
        ["--inputs", "--output", "--text_field", "--workers", "--min_chars"], 1)
    tail = r.stdout.rstrip("\n").splitlines()
    assert tail[-2] == "example:" and tail[-1].startswith("  python extract_texts.py ")


@pytest.mark.parametrize("flag,value", [("--workers", "0"), ("--workers", "-3"), ("--min_chars", "-1")])
def test_numbers_out_of_range_are_refused_with_the_range(tmp_path, flag, value):
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "文書"}])
    r = run(tmp_path, "--inputs", "a.jsonl.gz", flag, value)
    assert_one_line_error(r, flag, "between", value)
    assert not (tmp_path / "train_texts.txt").exists()


def test_output_that_is_an_input_is_refused(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "文書"}\n', encoding="utf-8")
    before = corpus.read_bytes()
    (tmp_path / "sub").mkdir()
    for output in ["c.jsonl", "./sub/../c.jsonl", str(corpus)]:
        r = run(tmp_path, "--inputs", "c.jsonl", "--output", output)
        assert_one_line_error(r, "one of the inputs", "c.jsonl")
        assert corpus.read_bytes() == before
    assert_one_line_error(run(tmp_path, "--inputs", "c.jsonl", "--output", "sub"), "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "sub"]


def test_output_directory_that_cannot_be_written_fails_before_reading(tmp_path):
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "文書"}])
    (tmp_path / "a_file").write_text("")
    cases = ["a_file/out.txt", "missing_dir/out.txt"]  # ENOTDIR, ENOENT: what even root is refused
    if os.geteuid() != 0:  # root writes into a read-only directory anyway
        (tmp_path / "ro").mkdir(mode=0o555)
        cases.append("ro/out.txt")
    for output in cases:
        r = run(tmp_path, "--inputs", "a.jsonl.gz", "--output", output)
        assert_one_line_error(r, "cannot write", output, "nothing was read")
        assert "extract:" not in r.stderr  # no progress bar: the work never started


@pytest.mark.parametrize("workers", ["1", "2"])
def test_disk_full_while_writing_is_one_sentence_and_keeps_the_old_output(tmp_path, workers):
    import resource
    import signal

    for i in range(2):
        write_jsonl(tmp_path / f"train_{i}.jsonl.gz", [{"text": f"{i}-{j}" + "文書" * 200} for j in range(300)])
    (tmp_path / "train_texts.txt").write_text("the previous output\n")

    def small_disk():  # files may not grow past 64 kB: writes then fail with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = subprocess.run([sys.executable, SCRIPT, "--workers", workers], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, preexec_fn=small_disk)
    assert_one_line_error(r, "writing train_texts.txt failed", "File too large",
                          "previous train_texts.txt is unchanged")
    assert (tmp_path / "train_texts.txt").read_text() == "the previous output\n"
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_a_killed_runs_leftovers_are_removed_by_the_next_run(tmp_path):
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "文書"}])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    leftovers = [tmp_path / f"train_texts.txt.tmp.{socket.gethostname()}.{dead}",
                 tmp_path / f"train_texts.txt.part0.tmp.{socket.gethostname()}.{dead}"]
    for p in leftovers:
        p.write_text("partial")
    assert run(tmp_path, "--inputs", "a.jsonl.gz").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl.gz", "train_texts.txt"]


def test_an_output_that_is_a_fifo_is_refused_and_left_in_place(tmp_path):
    write_jsonl(tmp_path / "train_0.jsonl.gz", [{"text": t, "meta": {}} for t in shard_docs(0)])
    os.mkfifo(tmp_path / "out.txt")
    r = run(tmp_path, "--inputs", "train_0.jsonl.gz", "--output", "out.txt")
    assert_one_line_error(r, "FIFO", "Choose another --output", code=2)
    assert stat.S_ISFIFO(os.stat(tmp_path / "out.txt").st_mode)


# ---- links, FIFOs and files named twice among the inputs (issue 24) ------------------------------------------------

def test_broken_links_are_skipped_and_a_file_reached_twice_is_read_once(tmp_path):
    data = tmp_path / "data"
    (data / "d").mkdir(parents=True)
    write_jsonl(data / "d/train_0.jsonl.gz", [{"text": t} for t in shard_docs(0)])
    os.symlink("nowhere.jsonl.gz", data / "d/dangling.jsonl.gz")
    os.symlink("self.jsonl.gz", data / "d/self.jsonl.gz")  # a link to itself: a loop
    os.symlink("..", data / "d/loop")  # a folder loop: a recursive glob goes round it until the path is too long
    os.mkfifo(tmp_path / "pipe.jsonl")
    for inputs in (["data"], ["data/**/*.jsonl.gz"], ["data/d/train_0.jsonl.gz", "data", "pipe.jsonl"]):
        r = run(tmp_path, "--inputs", *inputs, "--output", "out.txt")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "1 files, 3 documents" in r.stdout, (inputs, r.stdout)
        assert "dangling.jsonl.gz is a symbolic link that points to nothing" in r.stderr
        assert "self.jsonl.gz is a symbolic link loop" in r.stderr
        if inputs != ["data"]:  # (a folder walks each folder once, links and all, so it meets no file twice)
            assert "is read once" in r.stderr
    assert "pipe.jsonl is a FIFO (named pipe)" in r.stderr and "not found" not in r.stderr


def test_a_terminal_that_cannot_print_a_file_name_does_not_fail_after_the_work(tmp_path):
    write_jsonl(tmp_path / "日本語.jsonl.gz", [{"text": "猫"}, b"{broken"])  # the summary names the bad line's file
    r = subprocess.run([sys.executable, SCRIPT, "--inputs", "日本語.jsonl.gz", "--output", "out.txt"], cwd=tmp_path,
                       capture_output=True, timeout=60, env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "猫\n" and b"1 malformed JSON" in r.stdout


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_input_that_fails_to_read_is_named_not_taken_for_a_full_disk(tmp_path, workers):
    # it used to say "writing train_texts.txt failed: Input/output error ... Free some space": the wrong file, and
    # the wrong advice
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "文書"}])
    unreadable_file(tmp_path / "bad.jsonl")
    r = run(tmp_path, "--inputs", "a.jsonl.gz", "bad.jsonl", "--workers", workers)
    line = assert_one_line_error(r, "reading bad.jsonl failed", "Input/output error", "nothing was written", code=1)
    assert "writing" not in line and "Free some space" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl.gz", "bad.jsonl"]
