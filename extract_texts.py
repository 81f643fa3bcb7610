"""Step 1: gather every document of the JSONL.GZ corpus into one text file for SentencePiece (train_spm.py).

    python extract_texts.py                       # train_0.jsonl.gz ... train_10.jsonl.gz here -> train_texts.txt
    python extract_texts.py --inputs data/train --output train_texts.txt --workers 8

One document per line. A document's own line breaks (\\n, \\r\\n, \\r) each become one space, so a line is always a
whole document; train_spm.py splits long lines back into sentences. Missing files are skipped with a warning, bad
records are skipped and counted, and the output appears only once complete (written to a temporary file in the same
directory, then renamed), so an interrupted run never leaves a train_texts.txt that looks finished.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from trm.corpus import SUFFIXES, CorpusStats, expand_inputs, iter_texts

DEFAULT_INPUTS = [f"train_{i}.jsonl.gz" for i in range(11)]  # the procedure's shards, in the working directory
WRITE_BATCH = 8 << 20  # characters per write: few big writes, bounded memory


def extract_file(path, write, text_field, min_chars, stats, progress=None):
    """Pass `path`'s documents to `write` as UTF-8 bytes, one document per line, in batches of ~WRITE_BATCH."""
    batch, size = [], 0
    seen = stats.bytes_in
    for text in iter_texts(path, text_field, stats, min_chars):
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        batch.append(text.replace("\n", " "))
        size += len(text)
        if size >= WRITE_BATCH:
            write(("\n".join(batch) + "\n").encode("utf-8"))
            batch, size = [], 0
            if progress is not None:
                progress.update(stats.bytes_in - seen)
                seen = stats.bytes_in
    if batch:
        write(("\n".join(batch) + "\n").encode("utf-8"))
    if progress is not None:
        progress.update(stats.bytes_in - seen)


def background_writer(out, executor):
    """write(data) that returns at once: the write syscall releases the GIL, so the next batch is parsed meanwhile.
    One write in flight at a time keeps memory bounded and the order intact; .result() re-raises e.g. disk full."""
    pending = None

    def write(data):
        nonlocal pending
        if pending is not None:
            pending.result()
        pending = executor.submit(out.write, data) if data is not None else None

    return write


def extract_part(job):
    """Worker: one input file -> its own part file next to the output; the parent concatenates parts in input order."""
    path, part, text_field, min_chars = job
    stats = CorpusStats()
    with open(part, "wb") as out, ThreadPoolExecutor(1) as executor:
        write = background_writer(out, executor)
        extract_file(path, write, text_field, min_chars, stats)
        write(None)  # wait for the last write
    return part, stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", default=DEFAULT_INPUTS,
                        help="files, directories (searched recursively for *.jsonl.gz, *.jsonl) or globs "
                             "(default: train_0.jsonl.gz ... train_10.jsonl.gz)")
    parser.add_argument("--output", default="train_texts.txt")
    parser.add_argument("--text_field", default="text", help="JSON field that holds the document")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes, parallel over files (default: all cores); output order is input order")
    parser.add_argument("--min_chars", type=int, default=0, help="skip documents shorter than this")
    args = parser.parse_args()

    files, missing = expand_inputs(args.inputs)
    for pattern in missing:
        print(f"warning: {pattern} not found, skipping", file=sys.stderr)
    if not files:
        sys.exit(f"error: no input files found (looked for {' '.join(args.inputs)}; directories are searched for "
                 f"{', '.join('*' + s for s in SUFFIXES)}). Check the paths and the working directory ({os.getcwd()}).")

    total_bytes = sum(os.path.getsize(f) for f in files)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=os.path.basename(args.output) + ".", suffix=".tmp")
    workers = max(1, min(args.workers, len(files)))
    parts = [f"{tmp}.part{i}" for i in range(len(files))]
    stats, t0 = CorpusStats(), time.time()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="extract", file=sys.stderr)
    pool = None
    try:
        with os.fdopen(fd, "wb") as out, ThreadPoolExecutor(1) as executor:
            if workers == 1:
                write = background_writer(out, executor)
                for path in files:
                    extract_file(path, write, args.text_field, args.min_chars, stats, bar)
                write(None)
            else:
                # each worker writes its file to a part; parts are appended in input order as they finish, so the
                # output is byte-identical to --workers 1
                import multiprocessing  # only here: its import costs a noticeable share of a small run
                pool = multiprocessing.Pool(workers)
                jobs = [(path, part, args.text_field, args.min_chars) for path, part in zip(files, parts)]
                for path, (part, file_stats) in zip(files, pool.imap(extract_part, jobs)):
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
                    os.unlink(part)
                    stats.merge(file_stats)
                    bar.update(os.path.getsize(path))
                pool.close()
        bar.close()
        if stats.documents == 0:
            print(stats.summary(), file=sys.stderr)
            sys.exit(f"error: no readable document in {len(files)} file(s) ({', '.join(files[:3])}"
                     f"{', ...' if len(files) > 3 else ''}); looked for JSON lines with a string {args.text_field!r} "
                     f"field. Check --text_field and the files.")
        os.replace(tmp, args.output)
    finally:
        if pool is not None:
            pool.terminate()
        for leftover in [tmp] + parts:
            if os.path.exists(leftover):
                os.unlink(leftover)

    seconds = time.time() - t0
    out_mb = os.path.getsize(args.output) / 1e6
    print(stats.summary())
    print(f"wrote {args.output}: {out_mb:,.1f} MB in {seconds:.1f} s "
          f"({total_bytes / 1e6 / seconds:,.1f} MB/s of input, {out_mb / seconds:,.1f} MB/s of text)")
