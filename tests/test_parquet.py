"""trm/parquet.py through iter_texts: a .parquet corpus reads like its JSONL twin, one row group at a time, and damage
loses only what it must, with the loss named."""
import pytest

from trm import parquet
from trm.corpus import CorpusError, CorpusStats, iter_texts, missing_package

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (requirements-test.txt)")
pq = pytest.importorskip("pyarrow.parquet")

DOCS = [f"{i}番目の文書です。\n改行も{'そのまま' * (1 + i % 7)}。" for i in range(200)]


def write_parquet(path, columns, row_group_size=50, **options):
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size, **options)
    return str(path)


def test_texts_come_out_in_row_order_with_their_newlines(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"text": DOCS, "meta": [str(i) for i in range(len(DOCS))]})
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == DOCS
    assert (stats.files, stats.documents, stats.chars) == (1, len(DOCS), sum(map(len, DOCS)))
    assert not stats.skipped and not stats.errors
    assert list(iter_texts(path, as_bytes=True)) == [t.encode() for t in DOCS]  # what extract_texts.py writes


def test_text_field_picks_the_column_and_bad_rows_are_counted_by_row(tmp_path):
    body = ["一番目の長い文書です。", None, "", "短い", "五番目の長い文書です。"]
    path = write_parquet(tmp_path / "x.parquet", {"text": ["x"] * 5, "body": body}, row_group_size=2)
    stats = CorpusStats()
    assert list(iter_texts(path, text_field="body", stats=stats, min_chars=5)) == [body[0], body[4]]
    assert stats.skipped == {"no string 'body' field": 1, "empty text": 1, "shorter than 5 chars": 1}
    assert stats.examples == [f"{path}:2: no string 'body' field", f"{path}:3: empty text",
                              f"{path}:4: shorter than 5 chars"]  # rows numbered from 1, across row groups


@pytest.mark.parametrize("columns,why", [({"body": ["a", "b"]}, "no column 'text' (its columns: body)"),
                                         ({"text": [1, 2]}, "column 'text' holds int64, not text")])
def test_a_file_without_the_text_column_counts_every_row_and_says_why(tmp_path, columns, why):
    path = write_parquet(tmp_path / "x.parquet", columns)
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == []
    assert stats.skipped == {"no string 'text' field": 2} and stats.examples == [f"{path}: {why}"]


def test_row_groups_are_read_one_at_a_time(tmp_path, monkeypatch):
    # memory holds one row group's texts: the first document comes out before the second group is read
    path = write_parquet(tmp_path / "x.parquet", {"text": DOCS})  # 4 row groups of 50
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or real(self, i, **kw))
    texts = iter_texts(path)
    assert next(texts) == DOCS[0] and reads == [0]
    assert list(texts) == DOCS[1:] and reads == [0, 1, 2, 3]


def test_a_damaged_row_group_loses_its_rows_only_and_says_so(tmp_path, capsys):
    path = write_parquet(tmp_path / "x.parquet", {"text": DOCS}, write_page_checksum=True)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)  # the second row group's text column
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start + chunk.total_compressed_size // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == DOCS[:50] + DOCS[100:]  # row groups 1, 3 and 4
    assert len(stats.errors) == 1 and path in stats.errors[0]
    assert "row group 2 of 4" in stats.errors[0] and "50 rows are lost" in stats.errors[0]
    assert "row group 2 of 4" in capsys.readouterr().err


def test_a_truncated_file_is_reported_and_not_fatal(tmp_path, capsys):
    path = write_parquet(tmp_path / "x.parquet", {"text": DOCS})
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == []
    assert len(stats.errors) == 1 and path in stats.errors[0] and "not a readable Parquet file" in stats.errors[0]
    assert path in capsys.readouterr().err
    good = write_parquet(tmp_path / "y.parquet", {"text": DOCS[:3]})
    assert list(iter_texts(good, stats=stats)) == DOCS[:3]  # the next file reads as usual


def test_without_pyarrow_a_one_line_error_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet, "pyarrow_parquet", lambda: None)  # as on a Python without pyarrow
    path = write_parquet(tmp_path / "x.parquet", {"text": DOCS[:2]})
    problem = missing_package([str(tmp_path / "a.jsonl.gz"), path])
    assert "\n" not in problem and path in problem and "pip install pyarrow" in problem
    assert missing_package([str(tmp_path / "a.jsonl.gz")]) is None
    with pytest.raises(CorpusError, match="pip install pyarrow"):  # a reader that skipped the check still stops
        list(iter_texts(path))


def test_text_that_is_not_utf8_is_skipped_and_counted_as_in_jsonl(tmp_path):
    # Parquet writers need not check that a string column holds UTF-8; pyarrow's to_pylist raised UnicodeDecodeError,
    # a traceback in every step, where a JSONL line with such bytes is skipped and counted. (The 4th row is U+D800
    # encoded as if it were a character.)
    raw = ["一番目".encode(), b"bad\xff", None, b"\xed\xa0\x80lone", "四番目".encode()]
    column = pa.array(raw, type=pa.binary()).view(pa.string())
    path = write_parquet(tmp_path / "x.parquet", {"text": column}, row_group_size=3)
    stats = CorpusStats()
    assert list(iter_texts(path, stats=stats)) == ["一番目", "四番目"]
    assert stats.skipped == {"undecodable bytes": 2, "no string 'text' field": 1}
    assert stats.examples[0] == f"{path}:2: undecodable bytes" and not stats.errors
    assert list(iter_texts(path, as_bytes=True)) == ["一番目".encode(), "四番目".encode()]
