"""Step 1: gather every document of the corpus (JSONL, compressed or not, or Parquet) into one text file for
SentencePiece (train_spm.py).

    python extract_texts.py                       # train_0.jsonl.gz ... train_10.jsonl.gz here -> train_texts.txt
    python extract_texts.py --inputs data/train --output train_texts.txt --workers 8

One document per line. A document's own line breaks (\\n, \\r\\n, \\r) each become one space, so a line is always a
whole document; train_spm.py splits long lines back into sentences. Missing files are skipped with a warning, bad
records are skipped and counted, and the output appears only once complete (written to a temporary file in the same
directory, then renamed), so an interrupted run never leaves a train_texts.txt that looks finished.
"""
import argparse
import glob
import os
import queue
import sys
import threading
import time

from tqdm import tqdm

from trm.atomic import AtomicFile, NotAFileError, remove_stale_tmp, tmp_name
from trm.cli import PathList, fail, quiet_interrupt, range_error
from trm.corpus import PATTERNS, CorpusStats, expand_inputs, iter_texts, missing_package

HELD_OUT = ("valid", "val_", "val.", "test", "dev_", "dev.", "eval")  # file names of held-out splits

DEFAULT_INPUTS = [f"train_{i}.jsonl.gz" for i in range(11)]  # the procedure's shards, in the working directory
WRITE_BATCH = 8 << 20  # characters per write: few big writes, bounded memory


def extract_file(path, write, text_field, min_chars, stats, progress=None):
    """Pass `path`'s documents to `write` as UTF-8 bytes, one document per line, in batches of ~WRITE_BATCH bytes."""
    batch, size = [], 0
    seen = stats.bytes_in
    for text in iter_texts(path, text_field, stats, min_chars, as_bytes=True):
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        batch.append(text.replace(b"\n", b" "))
        size += len(text)
        if size >= WRITE_BATCH:
            batch.append(b"")  # so the join ends the last line too
            write(b"\n".join(batch))
            batch, size = [], 0
            if progress is not None:
                progress.update(stats.bytes_in - seen)
                seen = stats.bytes_in
    if batch:
        batch.append(b"")
        write(b"\n".join(batch))
    if progress is not None:
        progress.update(stats.bytes_in - seen)


def background_writer(out):
    """write(data) that returns at once: the write syscall releases the GIL, so the next batch is parsed meanwhile.
    At most one batch waits (bounded memory, order kept); write(None) waits for the rest. A failed write (disk full)
    is raised at the next call."""
    jobs, failed = queue.Queue(1), []

    def drain():
        while (data := jobs.get()) is not None:
            if failed:
                continue  # keep taking batches so the main thread never blocks; it raises the error
            try:
                out.write(data)
            except (OSError, ValueError) as e:  # ValueError: the main thread closed the file after an error
                failed.append(e)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()

    def write(data):
        jobs.put(data)
        if data is None:
            thread.join()
        if failed:
            raise failed[0]

    return write


def extract_part(job):
    """Worker: one input file -> its own part file next to the output; the parent concatenates parts in input order."""
    path, part, text_field, min_chars = job
    stats = CorpusStats()
    with open(part, "wb") as out:
        write = background_writer(out)
        extract_file(path, write, text_field, min_chars, stats)
        write(None)  # wait for the last write
    return part, stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python extract_texts.py --inputs data/train "
                                            "--output train_texts.txt --workers 8")
    parser.add_argument("--inputs", nargs="+", action=PathList, default=DEFAULT_INPUTS,
                        help=f"files, directories (searched recursively for {PATTERNS}) or globs (default: "
                             f"train_0.jsonl.gz ... train_10.jsonl.gz)")
    parser.add_argument("--output", default="train_texts.txt",
                        help="the text file to write, one document per line (default: %(default)s)")
    parser.add_argument("--text_field", default="text",
                        help="JSON field (Parquet: column) that holds the document (default: %(default)s)")
    # each worker keeps about two cores busy (inflate thread + parse thread), hence half the cores
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="processes, parallel over files; output order is input order "
                             "(default: %(default)s, half the cores)")
    parser.add_argument("--min_chars", type=int, default=0,
                        help="skip documents shorter than this (default: %(default)s)")
    args = parser.parse_args()
    quiet_interrupt()
    # the summary names files: one named in another encoding, or a terminal that is not UTF-8, must not end the run
    # with a traceback after the output was written
    sys.stdout.reconfigure(errors="backslashreplace")

    if problem := range_error(args, {"workers": "[1, 1024]", "min_chars": "[0, 1000000000]"}):
        fail(problem)
    if os.path.isdir(args.output):
        fail(f"--output {args.output} is a directory; name the file to write, e.g. "
             f"{os.path.join(args.output, 'train_texts.txt')}")

    files, missing = expand_inputs(args.inputs)
    for pattern in missing:
        what = (f"holds no {PATTERNS} files" if os.path.isdir(pattern) else
                "matches no corpus file" if glob.has_magic(pattern) else "not found")
        print(f"warning: {pattern} {what}, skipping", file=sys.stderr)
    if not files:
        fail(f"no input files found (looked for {' '.join(args.inputs)}; directories are searched for "
             f"{PATTERNS}). Check the paths and the working directory ({os.getcwd()}).")
    # a folder of llm-jp shards often holds validation_0.jsonl.gz beside train_*: step 2 would then learn the held-out
    # text that scores it (and step 3's validation would score text the tokenizer was fitted on). Read, as asked: said
    held_out = [f for f in files if os.path.basename(f).lower().startswith(HELD_OUT)]
    if held_out:
        print(f"warning: {', '.join(held_out)} {'looks' if len(held_out) == 1 else 'look'} like held-out text "
              f"(validation/test) and {'is' if len(held_out) == 1 else 'are'} read into {args.output} with the rest; "
              f"to keep it out, name the training files (e.g. --inputs 'DIR/train_*.jsonl.gz')", file=sys.stderr)
    if problem := missing_package(files):
        fail(problem)
    if os.path.exists(args.output):
        for f in files:
            if os.path.samefile(f, args.output):  # the rename at the end would replace the corpus by its own text
                fail(f"--output {args.output} is one of the inputs ({f}); writing it would destroy that "
                     f"input. Choose another --output, e.g. train_texts.txt.")

    total_bytes = sum(os.path.getsize(f) for f in files)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    remove_stale_tmp(out_dir, os.path.basename(args.output))  # what killed runs of this command left
    workers = max(1, min(args.workers, len(files)))
    parts = [tmp_name(f"{args.output}.part{i}") for i in range(len(files))]
    stats, t0 = CorpusStats(), time.time()
    pool = bar = None
    try:
        try:  # before any reading: a directory that refuses the file should say so in a second, not after the work
            # renamed into place only when complete; not fsynced: waiting for 1.8 GB to reach the disk costs seconds
            out = AtomicFile(args.output, durable=False)
        except NotAFileError as e:  # a FIFO, device or folder: never replaced by a file of text
            fail(f"cannot write {args.output}: {e.strerror}; nothing was read. Choose another --output.")
        except OSError as e:
            fail(f"cannot write {args.output}: {e.strerror} (in {out_dir}); nothing was read. "
                 f"Choose an --output in a directory you can write to.")
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="extract", file=sys.stderr)
        with out as dest:
            if workers == 1:
                write = background_writer(dest)
                for path in files:
                    extract_file(path, write, args.text_field, args.min_chars, stats, bar)
                write(None)
            else:
                # each worker writes its file to a part; parts are appended in input order as they finish, so the
                # output is byte-identical to --workers 1
                import multiprocessing, shutil, signal  # only here: importing them is a noticeable share of a small run
                # Ctrl-C is the main process's to handle (below): a worker that took it too would print a traceback
                pool = multiprocessing.Pool(workers, initializer=signal.signal,
                                            initargs=(signal.SIGINT, signal.SIG_IGN))
                jobs = [(path, part, args.text_field, args.min_chars) for path, part in zip(files, parts)]
                for path, (part, file_stats) in zip(files, pool.imap(extract_part, jobs)):
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dest, 16 << 20)
                    os.unlink(part)
                    stats.merge(file_stats)
                    bar.update(os.path.getsize(path))
                pool.close()
            bar.close()
            if stats.documents == 0:
                print(stats.summary(), file=sys.stderr)
                fail(f"no readable document in {len(files)} file(s) ({', '.join(files[:3])}"
                     f"{', ...' if len(files) > 3 else ''}); looked for JSON lines with a string "
                     f"{args.text_field!r} field. Check --text_field and the files.", 1)
            dest.flush()  # the last write that can fail (disk full) comes before the old output goes
            if os.path.exists(args.output):
                # ext4 writes out a file that is renamed over another (auto_da_alloc) before the rename returns:
                # seconds for a 1.8 GB output. The new file still appears only when complete.
                os.unlink(args.output)
    except (OSError, KeyboardInterrupt) as e:  # disk full, quota, a file-size limit, Ctrl-C: the old output stays
        if bar is not None:
            bar.close()
        kept = f"the previous {args.output} is unchanged" if os.path.exists(args.output) else "nothing was written"
        if isinstance(e, KeyboardInterrupt):
            fail(f"interrupted (Ctrl-C); {kept}.", 130)
        if e.filename in files:  # an input failed mid-read (trm/corpus.py names it): not a full disk
            fail(f"reading {e.filename} failed: {e.strerror or e}; {kept}. Check that file's disk, or leave the file "
                 f"out of --inputs.", 1)
        fail(f"writing {args.output} failed: {e.strerror or e}; {kept}. Free some space or choose another --output.", 1)
    finally:
        if pool is not None:
            pool.terminate()
        for leftover in parts:
            if os.path.exists(leftover):
                os.unlink(leftover)

    seconds = time.time() - t0
    out_mb = os.path.getsize(args.output) / 1e6
    print(stats.summary())
    print(f"wrote {args.output}: {out_mb:,.1f} MB in {seconds:.1f} s "
          f"({total_bytes / 1e6 / seconds:,.1f} MB/s of input, {out_mb / seconds:,.1f} MB/s of text)")
