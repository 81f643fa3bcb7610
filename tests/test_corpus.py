"""trm/corpus.py: which files a pattern names, and that every readable record comes out while bad ones are counted."""
import gzip
import json
import lzma
import os
import random
import zlib

import pytest

from trm import corpus
from trm.corpus import CorpusError, CorpusStats, expand_inputs, iter_texts, missing_package, train_shards

DOCS = ["吾輩は猫である。\n名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。", "何でも薄暗いじめじめした所で泣いていた。"]


def write_jsonl(path, lines, compress=True):
    """`lines`: dicts (dumped as JSON) or raw bytes (written as they are), one per line."""
    data = b"".join((json.dumps(x, ensure_ascii=False).encode() if isinstance(x, dict) else x) + b"\n" for x in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


def test_expand_inputs_dirs_globs_files_and_missing(tmp_path):
    for name in ["a/train_10.jsonl.gz", "a/train_2.jsonl.gz", "a/b/c.jsonl", "a/b/d.json.gz", "a/notes.txt"]:
        write_jsonl(tmp_path / name, [{"text": "x"}])
    d = str(tmp_path / "a")
    files, missing = expand_inputs([d])
    rel = [os.path.relpath(f, d) for f in files]
    assert rel == ["b/c.jsonl", "b/d.json.gz", "train_2.jsonl.gz", "train_10.jsonl.gz"]  # natural order, no .txt
    files, missing = expand_inputs([f"{d}/train_*.jsonl.gz", f"{d}/b/c.jsonl", f"{d}/nope.jsonl.gz", f"{d}/zz*"])
    assert [os.path.basename(f) for f in files] == ["train_2.jsonl.gz", "train_10.jsonl.gz", "c.jsonl"]
    assert missing == [f"{d}/nope.jsonl.gz", f"{d}/zz*"]
    files, _ = expand_inputs([f"{d}/b/c.jsonl", f"{d}/train_2.jsonl.gz"])  # plain files keep the given order
    assert [os.path.basename(f) for f in files] == ["c.jsonl", "train_2.jsonl.gz"]


@pytest.mark.parametrize("compress", [True, False])
def test_texts_come_out_raw_and_in_order(tmp_path, compress):
    path = write_jsonl(tmp_path / ("x.jsonl.gz" if compress else "x.jsonl"),
                       [{"text": t, "meta": {"i": i}} for i, t in enumerate(DOCS)], compress)
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == DOCS  # newlines kept: the loader tokenizes raw text
    assert (stats.files, stats.documents, stats.chars) == (1, 3, sum(map(len, DOCS)))
    assert not stats.skipped and not stats.errors


def test_lines_split_across_small_blocks(tmp_path, monkeypatch):
    # 7-byte reads cut lines and multi-byte characters anywhere; nothing may be lost or garbled
    monkeypatch.setattr(corpus, "READ_SIZE", 7)
    docs = DOCS * 20
    path = write_jsonl(tmp_path / "x.jsonl.gz", [{"text": t} for t in docs])
    assert list(iter_texts(path)) == docs
    path = write_jsonl(tmp_path / "y.jsonl", [{"text": t} for t in docs], compress=False)
    assert list(iter_texts(path)) == docs


def test_concatenated_gzip_members_are_one_file(tmp_path):
    path = tmp_path / "cat.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n') + gzip.compress(b'{"text": "b"}\n'))
    assert list(iter_texts(str(path))) == ["a", "b"]


def test_bad_records_are_skipped_counted_and_located(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [
        {"text": "一"},
        b'{"text": "broken',  # line 2: malformed JSON
        {"text": 5},  # 3: not a string
        {"body": "二"},  # 4: no text field
        b"[1, 2]",  # 5: not an object
        b'{"text": "\xff\xfe"}',  # 6: undecodable bytes
        b'{"text": "\\ud800"}',  # 7: a lone surrogate cannot be written as UTF-8
        b"",  # 8: blank lines are not records and not errors
        {"text": ""},  # 9: empty
        {"text": "三"},
    ])
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == ["一", "三"]
    assert stats.skipped == {"malformed JSON": 1, "no string 'text' field": 3, "undecodable bytes": 2,
                             "empty text": 1}
    assert stats.examples == [f"{path}:2: malformed JSON", f"{path}:3: no string 'text' field",
                              f"{path}:4: no string 'text' field", f"{path}:5: no string 'text' field",
                              f"{path}:6: undecodable bytes"]  # the first five
    assert "malformed JSON" in stats.summary() and f"{path}:2" in stats.summary()


def test_a_lone_surrogate_in_raw_bytes_is_skipped_in_either_field_order(tmp_path):
    # ED A0 80 is U+D800 encoded as if it were a character: not UTF-8, and json.loads lets it through as '\ud800'
    # when the text is not the first field; extract_texts and the token cache then failed on it
    path = write_jsonl(tmp_path / "s.jsonl.gz", [{"text": "一"}, b'{"meta": 1, "text": "bad\xed\xa0\x80"}',
                                                  b'{"text": "bad\xed\xa0\x80"}', {"meta": 2, "text": "한국어"},
                                                  {"text": "三"}])
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == ["一", "한국어", "三"]  # Hangul starts with ED too, and is kept
    assert list(iter_texts(path, as_bytes=True)) == [t.encode() for t in ["一", "한국어", "三"]]
    assert stats.skipped == {"undecodable bytes": 2}


def test_raw_control_characters_are_kept_in_either_field_order(tmp_path):
    # a raw tab inside a JSON string is not strict JSON; the text is still unambiguous, and the field order of a
    # record must not decide whether it is kept
    path = write_jsonl(tmp_path / "t.jsonl.gz", [b'{"text": "tab\there"}', b'{"meta": 1, "text": "tab\there"}'])
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == ["tab\there", "tab\there"] and stats.skipped == {}


def test_a_quoted_glob_expands_in_the_shell_order_and_anything_else_stays(tmp_path):
    for name in ("train_10.jsonl.gz", "train_2.jsonl.gz", "validation_0.jsonl.gz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "odd[1].jsonl").write_bytes(b"")  # a file whose name looks like a pattern is that file
    got = corpus.expand_globs([str(tmp_path / "train_*.jsonl.gz"), str(tmp_path / "odd[1].jsonl"),
                               str(tmp_path / "none_*.gz"), "plain.jsonl.gz"])
    assert got == [str(tmp_path / "train_10.jsonl.gz"), str(tmp_path / "train_2.jsonl.gz"),
                   str(tmp_path / "odd[1].jsonl"), str(tmp_path / "none_*.gz"), "plain.jsonl.gz"]


def test_text_field_and_min_chars(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl.gz", [{"content": "短い"}, {"content": "これは長めの文書です。"}])
    stats = CorpusStats()
    assert list(iter_texts(path, text_field="content", stats=stats, min_chars=5)) == ["これは長めの文書です。"]
    assert stats.skipped == {"shorter than 5 chars": 1}


def test_last_line_without_newline(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}'))
    assert list(iter_texts(str(path))) == ["a", "b"]


def test_truncated_gzip_keeps_what_came_before_and_names_the_file(tmp_path, capsys):
    docs = [f"{i}番目の文書です。" * 50 for i in range(400)]
    whole = gzip.compress("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    stats = CorpusStats()
    got = list(iter_texts(str(path), stats=stats))
    assert 0 < len(got) < len(docs) and got == docs[: len(got)]  # a prefix, every kept document whole
    assert len(stats.errors) == 1 and str(path) in stats.errors[0] and "truncated" in stats.errors[0]
    assert str(path) in capsys.readouterr().err


def test_not_gzip_at_all(tmp_path, capsys):
    path = tmp_path / "fake.jsonl.gz"
    path.write_bytes(b'{"text": "plain text, not gzip"}\n')
    stats = CorpusStats()
    assert list(iter_texts(str(path), stats=stats)) == []
    assert stats.errors and str(path) in stats.errors[0] and "not gzip data" in stats.errors[0]
    err = capsys.readouterr().err
    assert str(path) in err and "nothing read from it" in err and "keeping the documents" not in err


def test_stopping_early_is_clean(tmp_path):
    # the training loader may stop mid-file; the read-ahead thread must not hang or leak the file
    path = write_jsonl(tmp_path / "x.jsonl.gz", [{"text": f"{i}"} for i in range(100_000)])
    for _ in range(20):
        it = iter_texts(path)
        assert next(it) == "0"
        it.close()


def test_stats_merge():
    a, b = CorpusStats(files=1, documents=2, chars=3), CorpusStats(files=1, documents=1, chars=1)
    a.skip("f", 1, "malformed JSON")
    b.skip("g", 7, "malformed JSON")
    b.errors.append("g: truncated gzip")
    a.merge(b)
    assert (a.files, a.documents, a.chars, a.skipped["malformed JSON"]) == (2, 3, 4, 2)
    assert a.examples == ["f:1: malformed JSON", "g:7: malformed JSON"] and a.errors == ["g: truncated gzip"]


def test_fast_path_agrees_with_json(tmp_path):
    # {"text": "..."} lines skip json.loads when they can; the result must be exactly json.loads's
    rng = random.Random(0)
    alphabet = ["あ", "漢", "a", " ", "\n", "\r", "\t", '"', "\\", "/", "\\n", "\u2028", "é", "😀", "\x00", "}"]
    lines = []
    for i in range(800):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        record = {"meta": {"note": '"text": "x"'}, "text": t} if i % 4 == 2 else {"text": t, "meta": {"i": i}}
        separators = (",", ":") if i % 4 == 3 else (", ", ": ")
        lines.append(json.dumps(record, ensure_ascii=i % 4 == 1, separators=separators).encode())
    path = write_jsonl(tmp_path / "x.jsonl.gz", lines)
    expected = [json.loads(line)["text"] for line in lines]
    expected = [t for t in expected if t]
    assert list(iter_texts(path)) == expected
    assert list(iter_texts(path, as_bytes=True)) == [t.encode() for t in expected]


def test_fast_path_still_rejects_lines_cut_short(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl.gz", [
        b'{"text": "ok", "meta": {"a": "cut her', b'{"text": "ok"} trailing', b'{"text": "ok"', b'{"text": "o',
        b'{"text": "ok", "meta": 1}', b'{"text":"ok2"}', b'{"text": "first", "text": "last"}',
        b'{"text": "ok", "meta": {"id": 1}', b'{"text": "ok", }', b'{"text": "ok", "meta": {"a": 1},}',  # malformed
        b'{"text": "nested", "meta": {"a": {"b": "}"}, "c": []}}'])  # whole, a brace inside a string: json.loads
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == ["ok", "ok2", "last", "nested"]
    assert stats.skipped == {"malformed JSON": 7}


def test_unreadable_file_is_reported_not_fatal(tmp_path, capsys):
    stats = CorpusStats()
    assert list(iter_texts(str(tmp_path / "vanished.jsonl.gz"), stats=stats)) == []
    assert "vanished.jsonl.gz: cannot open" in stats.errors[0] and "vanished" in capsys.readouterr().err


def damaged_gzip(n_lines=40, damage="crc"):
    """A gzip of n_lines records whose damage zcat survives: 'crc' spoils the CRC trailer (zcat prints every line),
    'block' spoils the block header right after a full flush at the middle (zcat prints the first half)."""
    docs = [f"{i}行目の文書です。" * 3 for i in range(n_lines)]
    lines = [(json.dumps({"text": t}, ensure_ascii=False) + "\n").encode() for t in docs]
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = deflate.compress(b"".join(lines[: n_lines // 2])) + deflate.flush(zlib.Z_FULL_FLUSH)
    data = bytearray(head + deflate.compress(b"".join(lines[n_lines // 2:])) + deflate.flush())
    if damage == "crc":
        data[-8] ^= 0xFF
    else:
        data[len(head)] |= 0b110  # BTYPE 11: "invalid block type", at a byte boundary thanks to the full flush
    return docs, bytes(data)


@pytest.mark.parametrize("damage,kept", [("crc", 40), ("block", 20)])
def test_damaged_gzip_keeps_every_readable_line(tmp_path, capsys, damage, kept):
    docs, data = damaged_gzip(40, damage)
    path = tmp_path / "damaged.jsonl.gz"
    path.write_bytes(data)
    stats = CorpusStats()
    assert list(iter_texts(str(path), stats=stats)) == docs[:kept]  # all in one read: output of that read kept too
    assert len(stats.errors) == 1 and str(path) in stats.errors[0] and "corrupt" in stats.errors[0]
    assert str(path) in capsys.readouterr().err


def test_damage_found_in_a_later_read_keeps_the_lines_of_that_read(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "READ_SIZE", 1000)
    docs, data = damaged_gzip(400, "block")
    path = tmp_path / "damaged.jsonl.gz"
    path.write_bytes(data)
    assert list(iter_texts(str(path))) == docs[:200]


def test_train_shards_are_numbered_files_in_number_order(tmp_path):
    names = ["train_10.jsonl.gz", "train_2.jsonl.gz", "train_0.jsonl", "train_texts.txt", "validation_0.jsonl.gz",
             "train_3.jsonl.gz.tmp.host.123", "train_.jsonl.gz"]  # step 1's output sits beside the shards
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in train_shards(str(tmp_path))] == ["train_0.jsonl", "train_2.jsonl.gz",
                                                                           "train_10.jsonl.gz"]


try:
    import zstandard
except ImportError:
    zstandard = None
needs_zstd = pytest.mark.skipif(zstandard is None, reason="zstandard is not installed (requirements-test.txt)")
PACK = {".jsonl": lambda b: b, ".jsonl.gz": gzip.compress, ".jsonl.xz": lzma.compress,
        ".jsonl.zst": lambda b: zstandard.ZstdCompressor().compress(b)}


def corpus_bytes(docs):
    return "".join(json.dumps({"text": t, "meta": {}}, ensure_ascii=False) + "\n" for t in docs).encode()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.xz", pytest.param(".jsonl.zst", marks=needs_zstd)])
def test_every_format_reads_the_same_documents(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(PACK[suffix](corpus_bytes(DOCS)))
    stats = CorpusStats()
    assert list(iter_texts(str(path), stats=stats)) == DOCS and not stats.errors and stats.documents == 3


@pytest.mark.parametrize("suffix", [".jsonl.xz", pytest.param(".jsonl.zst", marks=needs_zstd)])
def test_concatenated_streams_are_one_file(tmp_path, suffix):
    path = tmp_path / f"cat{suffix}"
    path.write_bytes(PACK[suffix](corpus_bytes(DOCS[:1])) + PACK[suffix](corpus_bytes(DOCS[1:])))
    stats = CorpusStats()
    assert list(iter_texts(str(path), stats=stats)) == DOCS and not stats.errors


@pytest.mark.parametrize("suffix", [".jsonl.xz", pytest.param(".jsonl.zst", marks=needs_zstd)])
def test_truncated_stream_keeps_every_whole_line_before_the_cut(tmp_path, capsys, suffix, monkeypatch):
    monkeypatch.setattr(corpus, "READ_SIZE", 1000)  # the cut lands after several reads
    docs = [f"{i}番目の文書です。" * (1 + i % 30) for i in range(2000)]
    whole = PACK[suffix](corpus_bytes(docs))
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole[: len(whole) // 2])
    stats = CorpusStats()
    got = list(iter_texts(str(path), stats=stats))
    assert 0 < len(got) < len(docs) and got == docs[: len(got)]
    assert len(stats.errors) == 1 and str(path) in stats.errors[0] and "truncated" in stats.errors[0]
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl.xz", pytest.param(".jsonl.zst", marks=needs_zstd)])
def test_corrupt_stream_keeps_the_lines_before_the_damage(tmp_path, capsys, suffix, monkeypatch):
    monkeypatch.setattr(corpus, "READ_SIZE", 1000)  # zstd loses the output of the failing read: keep reads small
    docs = [f"{i}番目の文書です。" * (1 + i % 30) for i in range(2000)]
    data = bytearray(PACK[suffix](corpus_bytes(docs)))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(bytes(data))
    stats = CorpusStats()
    got = list(iter_texts(str(path), stats=stats))
    assert len(got) > len(docs) // 4 and got[: len(got) // 2] == docs[: len(got) // 2]  # bytes just before may be wrong
    name = suffix.split(".")[-1].replace("zst", "zstd")
    assert len(stats.errors) == 1 and str(path) in stats.errors[0] and f"corrupt {name}" in stats.errors[0]
    assert str(path) in capsys.readouterr().err


def test_xz_stream_padding_is_not_damage(tmp_path):
    path = tmp_path / "padded.jsonl.xz"
    path.write_bytes(lzma.compress(corpus_bytes(DOCS)) + b"\0" * 8 + lzma.compress(corpus_bytes(DOCS)))
    stats = CorpusStats()
    assert list(iter_texts(str(path), stats=stats)) == DOCS * 2 and not stats.errors


def test_zst_without_zstandard_is_a_one_line_error_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_zstd", lambda: None)  # as on a Python without zstandard
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd whatever")
    problem = missing_package([str(tmp_path / "a.jsonl.gz"), str(path)])
    assert "\n" not in problem and str(path) in problem and "pip install zstandard" in problem
    assert missing_package([str(tmp_path / "a.jsonl.xz")]) is None
    with pytest.raises(CorpusError, match="pip install zstandard"):  # a reader that skipped the check still stops
        list(iter_texts(str(path)))


def test_folders_globs_and_shards_find_every_format(tmp_path):
    names = ["train_10.jsonl.zst", "train_2.jsonl.xz", "train_1.jsonl.gz", "train_0.jsonl", "train_3.jsonl.xz.tmp",
             "train_11.parquet", "train_12.parquet.tmp", "notes.txt", "train_texts.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    want = ["train_0.jsonl", "train_1.jsonl.gz", "train_2.jsonl.xz", "train_10.jsonl.zst", "train_11.parquet"]
    assert [os.path.basename(p) for p in train_shards(str(tmp_path))] == want
    assert [os.path.basename(p) for p in expand_inputs([str(tmp_path)])[0]] == want
    found, _ = expand_inputs([f"{tmp_path}/*.xz", f"{tmp_path}/*.zst", f"{tmp_path}/*.parquet"])
    assert [os.path.basename(p) for p in found] == want[2:]


def test_a_folder_searched_follows_its_linked_subfolders_once(tmp_path, capsys):
    # shards kept on another disk and linked into the data folder are part of it, as a recursive glob finds them; they
    # were left out without a word. A link back up the tree is walked once, not round and round.
    write_jsonl(tmp_path / "data/train_0.jsonl.gz", [{"text": "一"}])
    write_jsonl(tmp_path / "big_disk/ja/train_1.jsonl.gz", [{"text": "二"}])
    os.symlink(tmp_path / "big_disk/ja", tmp_path / "data/ja")
    os.symlink("..", tmp_path / "big_disk/ja/up")  # reaches data/ja/up/ja/... and big_disk again
    os.symlink(".", tmp_path / "data/self")
    files, missing = expand_inputs([str(tmp_path / "data")])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["data/ja/train_1.jsonl.gz", "data/train_0.jsonl.gz"]
    assert missing == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.xz", pytest.param(".jsonl.zst", marks=needs_zstd)])
def test_an_empty_compressed_file_is_damage_not_an_empty_shard(tmp_path, capsys, suffix):
    # 0 bytes is no gzip, xz or zstd file at all (zcat: "unexpected end of file"), but a copy or download that failed;
    # it counted as a file of no documents, without a word
    path = tmp_path / f"train_3{suffix}"
    path.write_bytes(b"")
    stats = CorpusStats()
    assert list(iter_texts(str(path), stats=stats)) == []
    assert len(stats.errors) == 1 and f"{path}: empty file (0 bytes)" in stats.errors[0]
    assert f"{path}: empty file" in capsys.readouterr().err


def test_a_subfolder_that_cannot_be_searched_is_warned_of(tmp_path, monkeypatch, capsys):
    # os.walk drops a folder it cannot list (no permission; root, which runs these tests, is never refused, hence the
    # stand-in) without a word, and with it every shard inside
    write_jsonl(tmp_path / "data/train_0.jsonl.gz", [{"text": "一"}])
    write_jsonl(tmp_path / "data/locked/train_1.jsonl.gz", [{"text": "二"}])
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    files, _ = expand_inputs([str(tmp_path / "data")])
    assert [os.path.basename(f) for f in files] == ["train_0.jsonl.gz"]
    assert f"warning: cannot search {tmp_path / 'data/locked'} (Permission denied)" in capsys.readouterr().err
