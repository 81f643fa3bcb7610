"""Token cache and packed loader: every token once per epoch, disjoint ranks, exact resume, clear errors."""
import gzip
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from trm.data import CacheWriteError, DataError, PackedLoader, build_token_cache, check_paths, eval_windows, load_tokens
from trm.tokenizer import BOS_ID, EOS_ID, Tokenizer


def write_jsonl_gz(path, texts, extra_lines=()):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "meta": {"n": 1}}, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def all_targets_of_one_epoch(loader):
    """Run exactly one epoch of windows (all ranks together) and return the target values seen, per rank."""
    seen = []
    while loader.cursor < loader.n_windows:
        _, y = loader.next_batch()
        seen.append(y.reshape(-1))
    return torch.cat(seen).tolist()


def test_a_corpus_file_that_fails_to_read_is_named_not_taken_for_a_full_cache_disk(tmp_path):
    # it used to say "writing the token cache ... failed: Input/output error ... Free some space in the cache dir"
    from conftest import unreadable_file
    good = write_jsonl_gz(tmp_path / "a.jsonl.gz", ["文書です。"])
    bad = unreadable_file(tmp_path / "b.jsonl")
    with pytest.raises(DataError) as e:
        load_tokens([good, bad], Tokenizer("byte"), str(tmp_path / "cache"), desc="train", log=lambda m: None)
    assert not isinstance(e.value, CacheWriteError)
    assert f"reading {bad} failed" in str(e.value) and "--train_paths" in str(e.value)
    assert "Free some space" not in str(e.value) and not list((tmp_path / "cache").glob("*.bin"))


def test_cache_holds_every_document_as_bos_text_eos(tmp_path):
    tok = Tokenizer("byte")
    texts = ["吾輩は猫である。", "名前は\nまだ無い。", "a" * 5000]  # long documents are kept whole
    path = write_jsonl_gz(tmp_path / "a.jsonl.gz", texts, extra_lines=["{not json", '{"text": 5}'])
    tokens = load_tokens([path], tok, str(tmp_path / "cache"), log=lambda m: None)
    expected = []
    for t in texts:
        expected += [BOS_ID, *tok.encode(t), EOS_ID]
    assert tokens.tolist() == expected
    (meta_path,) = (tmp_path / "cache").glob("*.json")
    meta = json.loads(meta_path.read_text())
    assert sum(meta["skipped"].values()) == 2 and meta["documents"] == 3


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    tok = Tokenizer("byte")
    path = write_jsonl_gz(tmp_path / "a.jsonl.gz", ["abc"])
    load_tokens([path], tok, str(tmp_path / "c"), log=lambda m: None)
    (built,) = (tmp_path / "c").glob("*.bin")
    before = built.stat()
    load_tokens([path], tok, str(tmp_path / "c"), log=lambda m: None)
    assert (built.stat().st_ino, built.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # read, not rebuilt
    write_jsonl_gz(tmp_path / "a.jsonl.gz", ["abc", "de"])  # the corpus changed (size, mtime): a new cache
    tokens = load_tokens([path], tok, str(tmp_path / "c"), log=lambda m: None)
    assert len(tokens) == 9 and len(list((tmp_path / "c").glob("*.bin"))) == 2


def test_the_cache_carries_its_unigram_entropy_and_an_older_one_is_counted(tmp_path, monkeypatch):
    # the collapse guard's level is counted once, by the build, and a later start reads it instead of counting again;
    # a sidecar written before it had the figure still loads, and its tokens are counted as before
    import trm.guard
    tok = Tokenizer("byte")
    path = write_jsonl_gz(tmp_path / "a.jsonl.gz", [f"文書{i}は{'あいう' * (i % 7)}です。" for i in range(200)])
    tokens = load_tokens([path], tok, str(tmp_path / "c"), log=lambda m: None)
    counted = trm.guard.unigram_entropy(np.asarray(tokens), tok.vocab_size)  # a plain array: counted here
    (bin_path,) = (tmp_path / "c").glob("*.bin")
    side = bin_path.with_name(bin_path.name + ".json")
    assert json.loads(side.read_text())["unigram_nats"] == pytest.approx(counted, rel=1e-12)

    def no_counting(*args, **kwargs):
        raise AssertionError("counted again")

    with monkeypatch.context() as patch:
        patch.setattr(trm.guard.np, "bincount", no_counting)
        reused = load_tokens([path], tok, str(tmp_path / "c"), log=lambda m: None)
        assert trm.guard.unigram_entropy(reused, tok.vocab_size) == pytest.approx(counted, rel=1e-12)
    meta = json.loads(side.read_text())
    del meta["unigram_nats"]
    side.write_text(json.dumps(meta))
    older = load_tokens([path], tok, str(tmp_path / "c"), log=lambda m: None)
    assert older.unigram_nats is None and older.tolist() == tokens.tolist()  # reused, not rebuilt
    assert trm.guard.unigram_entropy(older, tok.vocab_size) == pytest.approx(counted, rel=1e-12)


def test_a_reused_cache_still_names_what_its_build_skipped(tmp_path):
    # a second run (or a resume) on a damaged corpus trains on what was readable; its log must say so as the first did
    tok = Tokenizer("byte")
    good = write_jsonl_gz(tmp_path / "a.jsonl.gz", ["abc"], extra_lines=["{not json"])
    whole = gzip.compress("".join(json.dumps({"text": f"文書{i}"}) + "\n" for i in range(2000)).encode())
    (tmp_path / "b.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # cut short
    runs = []
    for _ in range(2):
        lines = []
        load_tokens([good, str(tmp_path / "b.jsonl.gz")], tok, str(tmp_path / "c"), log=lines.append)
        runs.append(lines[-1])
    built, reused = runs
    assert reused.startswith("tokenizing: token cache ") and "building" not in reused
    for line in runs:
        assert "1 malformed lines skipped" in line and "damaged files" in line and "b.jsonl.gz" in line, line


def test_a_file_that_could_not_be_opened_is_read_once_it_can_be(tmp_path, monkeypatch):
    # chmod changes neither a file's size nor its mtime, the cache's key: without a check the cache built while the
    # file was unreadable would be reused, leaving it out for good. (Root reads any file, so the refusal is played.)
    import builtins

    import trm.corpus
    import trm.data
    tok = Tokenizer("byte")
    a, b = write_jsonl_gz(tmp_path / "a.jsonl.gz", ["abc"]), write_jsonl_gz(tmp_path / "b.jsonl.gz", ["de"])

    def refuse_b(path, *args, **kw):
        if path == b:
            raise PermissionError(13, "Permission denied", path)
        return builtins.open(path, *args, **kw)
    for module in (trm.corpus, trm.data):
        monkeypatch.setattr(module, "open", refuse_b, raising=False)
    assert len(load_tokens([a, b], tok, str(tmp_path / "c"), log=lambda m: None)) == 5  # a's document alone
    lines = []
    assert len(load_tokens([a, b], tok, str(tmp_path / "c"), log=lines.append)) == 5  # still refused: reused
    assert "building" not in " ".join(lines) and "cannot open" in lines[-1]
    monkeypatch.undo()
    lines = []
    assert len(load_tokens([a, b], tok, str(tmp_path / "c"), log=lines.append)) == 9  # both documents now
    assert any("could not be opened then and can now; rebuilding it" in line for line in lines), lines


def test_empty_corpus_is_a_clear_error(tmp_path):
    path = write_jsonl_gz(tmp_path / "a.jsonl.gz", [], extra_lines=["garbage"])
    with pytest.raises(DataError, match="no readable documents"):
        build_token_cache([path], Tokenizer("byte"), str(tmp_path / "x.bin"))
    assert not list(tmp_path.glob("x.bin*"))  # nothing half-written left behind


def test_missing_file_error_names_the_file(tmp_path):
    with pytest.raises(DataError, match="train_7.jsonl.gz"):
        check_paths([str(tmp_path / "train_7.jsonl.gz")], "train")


def test_an_xz_corpus_gives_the_tokens_of_its_gz_in_a_cache_of_its_own(tmp_path):
    import lzma
    tok = Tokenizer("byte")
    gz = write_jsonl_gz(tmp_path / "a.jsonl.gz", ["吾輩は猫である。", "名前はまだ無い。"])
    xz = tmp_path / "a.jsonl.xz"
    xz.write_bytes(lzma.compress(gzip.decompress(open(gz, "rb").read())))
    cache = str(tmp_path / "c")
    assert load_tokens([str(xz)], tok, cache, log=lambda m: None).tolist() == \
        load_tokens([gz], tok, cache, log=lambda m: None).tolist()
    assert len(list((tmp_path / "c").glob("*.bin"))) == 2  # the key is the file (path, size, mtime), not its text


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".parquet"])
def test_zst_and_parquet_corpora_give_the_tokens_of_their_gz(tmp_path, suffix):
    tok = Tokenizer("byte")
    texts = ["吾輩は猫である。", "名前はまだ無い。\n改行も一つの文書の内。"]
    gz = write_jsonl_gz(tmp_path / "a.jsonl.gz", texts)
    other = tmp_path / f"a{suffix}"
    if suffix == ".jsonl.zst":
        zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed (requirements-test.txt)")
        other.write_bytes(zstandard.ZstdCompressor().compress(gzip.decompress(open(gz, "rb").read())))
    else:
        pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (requirements-test.txt)")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts, "meta": ["m", "m"]}), str(other))
    check_paths([str(other)], "train")
    cache = str(tmp_path / "c")
    assert load_tokens([str(other)], tok, cache, log=lambda m: None).tolist() == \
        load_tokens([gz], tok, cache, log=lambda m: None).tolist()


@pytest.mark.parametrize("suffix,package", [(".jsonl.zst", "zstandard"), (".parquet", "pyarrow")])
def test_a_format_without_its_package_is_a_data_error(tmp_path, monkeypatch, suffix, package):
    from trm import corpus, parquet
    monkeypatch.setattr(corpus, "_zstd", lambda: None)  # as on a Python without either package
    monkeypatch.setattr(parquet, "pyarrow_parquet", lambda: None)
    (tmp_path / f"a{suffix}").write_bytes(b"")
    with pytest.raises(DataError, match=f"a{suffix} needs the {package} package.*pip install {package}"):
        check_paths([str(tmp_path / f"a{suffix}")], "train")


@pytest.mark.parametrize("N,L,B", [(1000, 16, 4), (1001, 7, 3), (64, 8, 1), (50, 64, 2)])
def test_every_token_is_a_target_once_per_epoch(N, L, B):
    tokens = np.arange(N)  # token value = its position in the stream
    loader = PackedLoader(tokens, L, B, seed=3)
    counts = Counter(all_targets_of_one_epoch(loader))
    assert set(counts) == set(range(N))  # every position is a target (position 0 via the wrap-around)
    extra = sum(c - 1 for c in counts.values())
    overshoot = loader.cursor - loader.n_windows  # a batch may run into the next epoch
    assert extra <= (L - 1) + overshoot * L


def test_windows_are_contiguous_and_inputs_shift_targets():
    tokens = np.arange(500)
    loader = PackedLoader(tokens, 10, 4, seed=0)
    x, y = loader.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert ((y - x) % 500 == 1).all()  # consecutive stream positions, wrap-around included


def test_order_depends_only_on_seed_and_epoch():
    tokens = np.arange(4096)
    a = PackedLoader(tokens, 16, 8, seed=1)
    b = PackedLoader(tokens, 16, 8, seed=1)
    c = PackedLoader(tokens, 16, 8, seed=2)
    assert a.window_ids(0, 256) == b.window_ids(0, 256) != c.window_ids(0, 256)
    assert sorted(a.window_ids(0, 256)) == list(range(256))
    assert a.window_ids(0, 256) != a.window_ids(256, 256)  # the next epoch is shuffled differently


def test_ranks_read_disjoint_shares_of_the_same_global_batches():
    tokens = np.arange(3000)
    single = PackedLoader(tokens, 10, 4, seed=5)
    ranks = [PackedLoader(tokens, 10, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(100):  # past an epoch boundary (300 windows)
        _, y = single.next_batch()
        parts = [loader.next_batch()[1] for loader in ranks]
        assert torch.equal(torch.cat(parts), y)
        assert not set(parts[0][:, 0].tolist()) & set(parts[1][:, 0].tolist())


def test_loader_state_round_trip_gives_the_same_next_batches():
    tokens = np.arange(10_000)
    a = PackedLoader(tokens, 32, 4, seed=9)
    for _ in range(17):
        a.next_batch()
    b = PackedLoader(tokens, 32, 4, seed=9)
    b.load_state_dict(a.state_dict())
    for _ in range(200):  # crosses epoch boundaries
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_windows_are_fixed_and_bounded():
    tokens = np.arange(1000)
    w = eval_windows(tokens, 32, 200)
    assert w.shape == (6, 33)  # 200 // 32 windows
    assert torch.equal(w, eval_windows(tokens, 32, 200))
    assert torch.equal(w[1, :1], w[0, -1:])  # stride L
    short = eval_windows(np.arange(10), 32, 200)
    assert short.shape == (1, 10)


# ---- the token cache under concurrency and damage -----------------------------------------------------------------

class SlowTokenizer(Tokenizer):
    """The byte tokenizer, slow enough that two builders surely overlap."""

    def __init__(self):
        super().__init__("byte")

    def encode_batch(self, texts, num_threads=None):
        import time
        time.sleep(0.3)
        return super().encode_batch(texts, num_threads)


def _build_in_child(path, cache_dir, start, results):
    import os
    msgs = []
    start.wait()
    try:
        tokens = load_tokens([path], SlowTokenizer(), cache_dir, log=msgs.append)
        results.put((os.getpid(), tokens.tolist(), msgs, None))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put((os.getpid(), None, msgs, repr(e)))


def test_concurrent_builds_one_builds_the_other_waits_and_reuses(tmp_path):
    import multiprocessing

    texts = [f"文書{i}" for i in range(5000)]
    path = write_jsonl_gz(tmp_path / "a.jsonl.gz", texts)
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(path, str(tmp_path / "c"), start, results)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    assert [g[3] for g in got] == [None] * 3, got
    expected = load_tokens([path], Tokenizer("byte"), str(tmp_path / "c"), log=lambda m: None).tolist()
    assert all(g[1] == expected for g in got)
    assert sum("building" in " ".join(g[2]) for g in got) == 1  # the others waited, then used its result
    assert not [p.name for p in (tmp_path / "c").iterdir() if ".tmp" in p.name]


def corrupt_truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def corrupt_same_size(p):
    p.write_bytes(b"\xff" * p.stat().st_size)  # out-of-range ids, size intact


def corrupt_one_byte(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))


def corrupt_sidecar_torn(p):
    side = p.with_name(p.name + ".json")
    side.write_text(side.read_text()[:20])


def corrupt_sidecar_old(p):  # written before caches had a checksum
    side = p.with_name(p.name + ".json")
    meta = json.loads(side.read_text())
    del meta["checksum"]
    side.write_text(json.dumps(meta))


def corrupt_bin_missing(p):
    p.unlink()


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_same_size, corrupt_one_byte, corrupt_sidecar_torn,
                                     corrupt_sidecar_old, corrupt_bin_missing])
def test_damaged_cache_is_reported_and_rebuilt(tmp_path, corrupt):
    tok = Tokenizer("byte")
    path = write_jsonl_gz(tmp_path / "a.jsonl.gz", [f"文書{i}です。" for i in range(300)])
    expected = load_tokens([path], tok, str(tmp_path / "c"), log=lambda m: None).tolist()
    (bin_path,) = (tmp_path / "c").glob("*.bin")
    corrupt(bin_path)
    msgs = []
    tokens = load_tokens([path], tok, str(tmp_path / "c"), log=msgs.append)
    assert tokens.tolist() == expected
    assert f"token cache {bin_path} is damaged" in msgs[0] and "rebuilding" in msgs[0]  # the user is told
    rebuilt = bin_path.stat()
    load_tokens([path], tok, str(tmp_path / "c"), log=lambda m: None)  # and the rebuilt one is used as it is
    assert (bin_path.stat().st_ino, bin_path.stat().st_mtime_ns) == (rebuilt.st_ino, rebuilt.st_mtime_ns)


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    cache = tmp_path / "c"
    cache.mkdir()
    host = socket.gethostname()
    stale = [cache / f"0123.bin.tmp.{host}.{dead}", cache / f"0123.bin.json.tmp.{host}.{dead}",
             cache / f"89ab.bin.tmp.{dead}"]
    alive = [cache / f"4567.bin.tmp.{host}.{os.getpid()}", cache / f"4567.bin.tmp.otherhost.{dead}"]
    for p in stale + alive:
        p.write_bytes(b"partial")
    path = write_jsonl_gz(tmp_path / "a.jsonl.gz", ["abc"])
    load_tokens([path], Tokenizer("byte"), str(cache), log=lambda m: None)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in alive)  # a live builder's, and one of another host (its pid means nothing here)


def test_a_path_that_is_no_file_says_what_it_is(tmp_path):
    (tmp_path / "shards").mkdir()
    os.mkfifo(tmp_path / "pipe.jsonl.gz")
    os.symlink("gone.jsonl.gz", tmp_path / "dangling.jsonl.gz")
    for name, kind in (("shards", "is a directory"), ("pipe.jsonl.gz", "is a FIFO"),
                       ("dangling.jsonl.gz", "points to nothing"), ("absent.jsonl.gz", "train file not found"),
                       ("data/train_*.jsonl.gz", "no train file matches")):  # a pattern: it matched nothing
        with pytest.raises(DataError, match=kind):
            check_paths([str(tmp_path / name)], "train")


def test_a_file_named_in_another_encoding_builds_and_reuses_its_cache(tmp_path):
    name = os.fsdecode("テスト.jsonl".encode("shift_jis"))  # not UTF-8: Python holds it with lone surrogates
    path = tmp_path / name
    path.write_text('{"text": "猫が好きです。"}\n', encoding="utf-8")
    lines = []
    for _ in range(2):
        tokens = load_tokens([str(path)], Tokenizer.from_args("byte"), str(tmp_path / "cache"), log=lines.append)
        assert len(tokens) == len("猫が好きです。".encode()) + 2
    assert "building" in lines[0] and "building" not in lines[-1]  # the second run reads the cache it built
