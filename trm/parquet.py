"""Parquet corpora (the format datasets are often published in): one column holds the documents, read one row group
at a time, so memory holds one row group's texts however large the file is. Needs the optional pyarrow package.

trm/corpus.py's iter_texts hands .parquet files here, so every reader of documents takes them. The damaged-file rule
is the one for compressed JSONL: keep what is readable, say what was lost. A Parquet file's row groups are
independent, so a damaged one loses its own rows only and the later ones are still read; page checksums (written by
pyarrow, Spark and others) are verified, so flipped bytes are found rather than read as text. A file cut short has
lost its footer, the index of its row groups, and with it every row.
"""
import os
import sys

from trm.corpus import MAX_EXAMPLES, CorpusError

PYARROW_MISSING = "needs the pyarrow package to read .parquet files: pip install pyarrow"
TEXT_TYPES = ("string", "large_string", "string_view")


def pyarrow_parquet():
    try:
        import pyarrow.parquet
        return pyarrow.parquet
    except ImportError:
        return None


def parquet_texts(path, text_field, stats, min_chars=0, as_bytes=False):
    """The texts of column `text_field`, in row order; nulls, bytes that are not UTF-8, empty and short texts are
    skipped and counted in `stats` (a CorpusStats) as iter_texts counts bad JSON lines, with the row number where
    iter_texts gives the line."""
    pq = pyarrow_parquet()
    if pq is None:  # the scripts check up front (missing_package); this is a backstop
        raise CorpusError(f"{path} {PYARROW_MISSING}")
    import pyarrow
    try:
        size = os.path.getsize(path)
        f = pq.ParquetFile(path, page_checksum_verification=True)
    except (pyarrow.ArrowException, OSError) as e:
        _lost(stats, path, f"not a readable Parquet file ({_reason(e)}); nothing read from it (a Parquet file cut "
                           f"short has lost its footer, the index of its row groups)")
        return
    with f:
        meta = f.metadata
        no_text = f"no string {text_field!r} field"
        column = f.schema_arrow.field(text_field) if text_field in f.schema_arrow.names else None
        if column is None or str(column.type) not in TEXT_TYPES:
            # one example for the file, every row counted: extract_texts then says "Check --text_field"
            why = (f"no column {text_field!r} (its columns: {', '.join(f.schema_arrow.names)})" if column is None
                   else f"column {text_field!r} holds {column.type}, not text")
            stats.skipped[no_text] += meta.num_rows
            if len(stats.examples) < MAX_EXAMPLES:
                stats.examples.append(f"{path}: {why}")
            stats.bytes_in += size
            return
        row = 0
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            stats.bytes_in += size * rows // max(meta.num_rows, 1)  # the progress bars' count, in proportion
            try:
                column = f.read_row_group(i, columns=[text_field]).column(0)
            except (pyarrow.ArrowException, OSError) as e:
                _lost(stats, path, f"row group {i + 1} of {meta.num_row_groups} is damaged ({_reason(e)}); its "
                                   f"{rows:,} rows are lost, the other row groups are kept")
                row += rows
                continue
            try:
                texts = column.to_pylist()
            except UnicodeDecodeError:  # a writer need not check its strings: each row on its own, as JSONL lines are
                texts = [_decode(raw) for raw in column.cast(pyarrow.large_binary()).to_pylist()]
            for text in texts:
                row += 1
                if text is None:
                    stats.skip(path, row, no_text)
                elif type(text) is bytes:
                    stats.skip(path, row, "undecodable bytes")
                elif not text or len(text) < min_chars:
                    stats.skip(path, row, "empty text" if not text else f"shorter than {min_chars} chars")
                else:
                    stats.documents += 1
                    stats.chars += len(text)
                    yield text.encode("utf-8") if as_bytes else text


def _decode(raw):
    """A row's text, or its bytes as they are where they are not UTF-8 (the caller skips those)."""
    try:
        return raw if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _reason(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _lost(stats, path, what):
    stats.errors.append(f"{path}: {what}")
    print(f"warning: {path}: {what}", file=sys.stderr)
