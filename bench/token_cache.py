"""What the trainer's token cache costs: build time, tokens/s and disk, for the same corpus in each input format.

    python bench/token_cache.py --data_dir ../shared/corpus/aozora --sp_model ja_trm.model --threads 2

The train_N shards of --data_dir are also written as .parquet and .jsonl.zst in --work (when pyarrow and zstandard are
installed), so the formats are compared on the same documents. Each build starts from an empty cache (twice per
format: the first also warms the page cache); the reload is what a resumed run pays, the checksum included.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from trm.corpus import SUFFIXES, iter_texts, train_shards  # noqa: E402
from trm.data import load_tokens  # noqa: E402
from trm.tokenizer import Tokenizer, TokenizerError  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--data_dir", required=True, help="folder with train_N corpus files")
p.add_argument("--sp_model", required=True)
p.add_argument("--threads", type=int, default=os.cpu_count(), help="tokenizer threads (the trainer's --num_workers)")
p.add_argument("--work", default="/tmp/token_cache_bench",
               help="where to make a scratch folder (converted shards, caches), removed at the end")
args = p.parse_args()

if not os.path.isdir(args.data_dir):
    sys.exit(f"error: --data_dir {args.data_dir} is not a folder")
shards = train_shards(args.data_dir)
if not shards:  # (train_texts.txt and the like are not shards: shards[0] below was an IndexError)
    sys.exit(f"error: no train_N corpus files ({', '.join(SUFFIXES)}) in --data_dir {args.data_dir}")
try:
    tokenizer = Tokenizer.from_args("sentencepiece", args.sp_model)
except TokenizerError as e:
    sys.exit(f"error: {e}")
# a fresh folder inside --work, and only it removed: --work itself was emptied with rmtree, whatever it held
os.makedirs(args.work, exist_ok=True)
args.work = tempfile.mkdtemp(prefix="token_cache_bench_", dir=args.work)
formats = {os.path.basename(shards[0]).split(".", 1)[1]: shards}
jsonl = [b"".join(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in iter_texts(s)) for s in shards]
try:
    import pyarrow
    import pyarrow.parquet
    formats["parquet"] = []
    for i, data in enumerate(jsonl):
        path = os.path.join(args.work, f"train_{i}.parquet")
        texts = [json.loads(line)["text"] for line in data.splitlines()]
        pyarrow.parquet.write_table(pyarrow.table({"text": texts}), path)
        formats["parquet"].append(path)
except ImportError:
    print("pyarrow not installed: no .parquet row")
try:
    import zstandard
    formats["jsonl.zst"] = []
    for i, data in enumerate(jsonl):
        path = os.path.join(args.work, f"train_{i}.jsonl.zst")
        open(path, "wb").write(zstandard.ZstdCompressor().compress(data))
        formats["jsonl.zst"].append(path)
except ImportError:
    print("zstandard not installed: no .jsonl.zst row")

text_mb = sum(map(len, jsonl)) / 1e6
print(f"{len(shards)} shards, {text_mb:.1f} MB of JSONL; {args.threads} tokenizer threads\n")
print("| format | input MB | tokens | build s (2 runs) | M tokens/s (faster run) | cache MB | bytes/token | reload s |")
print("|---|---|---|---|---|---|---|---|")
quiet = lambda message: None  # noqa: E731
for name, paths in formats.items():
    times = []
    for attempt in range(2):
        cache = os.path.join(args.work, f"cache_{name}_{attempt}")
        t0 = time.time()
        ids = load_tokens(paths, tokenizer, cache, num_threads=args.threads, log=quiet)
        times.append(time.time() - t0)
    t0 = time.time()
    load_tokens(paths, tokenizer, cache, num_threads=args.threads, log=quiet)
    reload = time.time() - t0
    cache_mb = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache) if f.endswith(".bin")) / 1e6
    print(f"| {name} | {sum(map(os.path.getsize, paths)) / 1e6:.1f} | {len(ids):,} | "
          f"{' / '.join(f'{t:.1f}' for t in times)} | {len(ids) / min(times) / 1e6:.2f} | {cache_mb:.1f} | "
          f"{cache_mb * 1e6 / len(ids):.2f} | {reload:.2f} |")
shutil.rmtree(args.work, ignore_errors=True)
