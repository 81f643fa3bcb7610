"""extract_texts.py against zcat over the same files, side by side (issue 3's speed target: at least 80% of zcat).

    python bench/extract_speed.py                       # shared corpus + a many-short-documents corpus in /tmp
    python bench/extract_speed.py --runs 9 --workers 1 2

Whole-process timings (start-up included): A = python extract_texts.py ... --output /tmp/..., B = zcat FILES >
/dev/null. Runs alternate A B A B so drift on a shared machine hits both; the A/B ratio is taken pair by pair and its
median printed. cpu = user + system seconds of the finished child, from the OS.
"""
import argparse
import gzip
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trm.corpus import train_shards  # noqa: E402


def make_short_docs(src_files, out_dir, chars=200):
    """The same text cut into ~200-character documents: per-record costs dominate instead of per-byte ones."""
    outs = []
    for src in src_files:
        # kept between runs, in a folder named by the source file's path, size and time: by its name alone, another
        # corpus's train_0.jsonl.gz found the first one's short documents and timed them in its "short docs" row
        st = os.stat(src)
        key = hashlib.sha1(f"{os.path.abspath(src)}|{st.st_size}|{st.st_mtime_ns}|{chars}".encode()).hexdigest()[:16]
        (out_dir / key).mkdir(parents=True, exist_ok=True)
        out = out_dir / key / Path(src).name
        outs.append(str(out))
        if out.exists():
            continue
        with gzip.open(src, "rt", encoding="utf-8") as f, gzip.open(f"{out}.tmp", "wt", encoding="utf-8") as g:
            for line in f:
                record = json.loads(line)
                text = record["text"]
                for i in range(0, len(text), chars):
                    g.write(json.dumps({"text": text[i:i + chars], "meta": record.get("meta")},
                                       ensure_ascii=False) + "\n")
        os.replace(f"{out}.tmp", out)
    return outs


def timed(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare(name, files, workers, runs):
    a = [sys.executable, str(ROOT / "extract_texts.py"), "--inputs", *files, "--output", "/tmp/extract_bench.txt",
         "--workers", str(workers)]
    b = ["sh", "-c", "zcat " + " ".join(files) + " > /dev/null"]
    timed(a), timed(b)  # warm the page cache
    rows = [(timed(a), timed(b)) for _ in range(runs)]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    wall_a, wall_b = med([r[0][0] for r in rows]), med([r[1][0] for r in rows])
    ratio = med([r[0][0] / r[1][0] for r in rows])
    cpu_ratio = med([r[0][1] / r[1][1] for r in rows])
    gz_mb = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"{name:<12} {workers:>7} {gz_mb:>8.1f} {wall_a:>9.3f} {wall_b:>9.3f} {ratio:>7.2f} {cpu_ratio:>7.2f} "
          f"{1 / ratio:>8.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared/corpus/aozora"))
    parser.add_argument("--short_dir", default="/tmp/extract_bench_short_docs")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    if not os.path.isdir(args.corpus):
        sys.exit(f"error: --corpus {args.corpus} is not a folder")
    # the shards as the trainer numbers them (a train_texts.jsonl.gz is not one); .jsonl.gz only: zcat is the yardstick
    files = [f for f in train_shards(args.corpus) if f.endswith(".jsonl.gz")]
    if not files:
        sys.exit(f"error: no train_N.jsonl.gz in --corpus {args.corpus}")
    short = make_short_docs(files, Path(args.short_dir))
    print(f"{os.cpu_count()} cores; medians of {args.runs} alternating runs; whole-process wall seconds")
    print(f"{'corpus':<12} {'workers':>7} {'gz MB':>8} {'extract s':>9} {'zcat s':>9} {'A/B':>7} {'cpu A/B':>7} "
          f"{'vs zcat':>8}")
    for name, corpus_files in [(os.path.basename(os.path.abspath(args.corpus))[:12], files), ("short docs", short)]:
        for workers in args.workers:
            compare(name, corpus_files, workers, args.runs)
