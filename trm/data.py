"""Training data: tokenize the corpus (JSONL plain, .gz, .xz or .zst, or Parquet) once into a token cache, then serve
packed windows.

Why a cache: tokenizing 1.8 GB of Japanese takes minutes even on many threads, and doing it inside the training loop
would stall the GPU. The cache is a flat array of token ids (each document as BOS ... EOS) in
`<save_dir>/token_cache/<key>.bin`, keyed by the files (path, size, mtime: a .xz and a .gz of the same text are two
caches), the text field and the exact tokenizer,
so a changed corpus or tokenizer builds a new one and a resumed run reuses the old one. The sidecar `<key>.bin.json`
holds the counts and a checksum of the .bin, verified on every load: a cache damaged on disk (truncated, torn, bytes
changed) is reported and rebuilt, never trained on. One process builds an entry at a time (a lock file); another
one that wants it waits and then uses what the first built. Temporary files of builds killed midway are removed the
next time the cache directory is used.

Packing: the documents are laid end to end and the stream is read as a circle of N tokens. Window i is the L + 1
tokens starting at i * L (inputs = first L, targets = last L), so consecutive windows share one token and every
token is a target exactly once per epoch; the last window wraps around to the start of the stream, reusing fewer
than L tokens. No truncation, no padding. The order of windows is a permutation that depends only on the seed and
the epoch; global batch g takes the next world_size * batch_size windows of that order and rank r takes its own
disjoint batch_size of them, so the whole data position is one integer (`cursor`) and resuming is exact.
"""
import concurrent.futures
import fcntl
import glob
import hashlib
import json
import mmap
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from trm.atomic import AtomicFile, remove_stale_tmp
from trm.corpus import CorpusStats, expand_globs, iter_texts, missing_package, what_it_is
from trm.guard import unigram_entropy


class DataError(RuntimeError):
    pass


class CacheWriteError(DataError):
    """The token cache could not be written (disk full, quota): the work failed, the command was fine (exit code 1)."""


def check_paths(paths, what):
    """The files named, quoted globs expanded (trm.corpus.expand_globs), each checked: the procedure's troubleshooting
    case, a missing train/valid file, is an error naming the file; a path that is there but no file (a directory, a
    FIFO, a dangling symbolic link) says what it is."""
    paths = expand_globs(paths)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        kind = what_it_is(missing[0])
        first = (f"no {what} file matches {missing[0]}" if kind == "missing" and glob.has_magic(missing[0]) else
                 f"{what} file not found: {missing[0]}" if kind == "missing" else
                 f"{what} path {missing[0]} is {kind}, not a file" +
                 (f" (name its files, e.g. {os.path.join(missing[0], 'train_*.jsonl.gz')})" if kind == "a directory"
                  else ""))
        raise DataError(first + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        f" (working directory: {os.getcwd()})")
    if problem := missing_package(paths):
        raise DataError(problem)
    return paths


def check_cache_dir(cache_dir):
    """Whether cache_dir can hold the cache, before any work and without creating anything (a refused run leaves no
    trace): a folder that refuses it should say so in a second, not after the corpus was read. Raises DataError."""
    folder = os.path.abspath(cache_dir)
    while not os.path.exists(folder):  # the nearest part that exists is where the folders would be made
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        what = "is a file" if folder == os.path.abspath(cache_dir) else f"is inside {folder}, which is a file"
        raise DataError(f"--cache_dir {cache_dir} {what}, not a folder; choose another --cache_dir")
    if not os.access(folder, os.W_OK | os.X_OK):  # (also false on a read-only filesystem, even for root)
        raise DataError(f"cannot write in --cache_dir {cache_dir} ({folder} is read-only); choose another "
                        f"--cache_dir (a folder you can write to)")


def cache_key(paths, tokenizer, text_field):
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        # fsencode: a name in another encoding (a Shift_JIS file name reaches Python as lone surrogates) keeps its bytes
        h.update(os.fsencode(os.path.abspath(p)) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{text_field}|{tokenizer.fingerprint()}".encode())
    return h.hexdigest()[:20]


def build_token_cache(paths, tokenizer, out_path, text_field="text", num_threads=None, desc="tokenizing",
                      docs_per_batch=2048):
    """Tokenize every document of `paths` into out_path (uint16/uint32 ids) + out_path.json (counts).

    Written under temporary names and renamed, so an interrupted build is simply rebuilt next time.
    """
    from tqdm import tqdm

    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    stats = CorpusStats()
    n_tokens, t0 = 0, time.time()
    total_bytes = sum(os.path.getsize(p) for p in paths)
    bar = tqdm(total=len(paths), desc=desc, unit="file", disable=None, leave=False,
               postfix=f"{total_bytes / 1e6:.0f} MB")
    # not fsynced: a cache lost to a power cut fails its checksum and is rebuilt
    with AtomicFile(out_path, durable=False) as f:
        for path in paths:
            batch = []
            for text in iter_texts(path, text_field, stats):
                batch.append(text)
                if len(batch) == docs_per_batch:
                    n_tokens += _write_batch(f, tokenizer, batch, dtype, num_threads)
                    batch = []
            n_tokens += _write_batch(f, tokenizer, batch, dtype, num_threads)
            bar.update(1)
            bar.set_postfix(tokens=f"{n_tokens / 1e6:.1f}M")
        bar.close()
        if n_tokens == 0:
            raise DataError(f"no readable documents in {', '.join(paths)} (text field {text_field!r})")
    # the .bin first: a crash before the sidecar is renamed leaves a new .bin beside an old checksum, i.e. a rebuild
    meta = {"tokens": n_tokens, "dtype": np.dtype(dtype).name, "documents": stats.documents,
            "skipped": dict(stats.skipped), "errors": stats.errors, "files": [os.path.abspath(p) for p in paths],
            "unopened": stats.unopened, "seconds": round(time.time() - t0, 2), "checksum": file_checksum(out_path),
            # the collapse guard's level, counted once here rather than at every start (a sidecar written before
            # it has none, and the trainer counts)
            "unigram_nats": unigram_entropy(np.memmap(out_path, dtype=dtype, mode="r", shape=(n_tokens,)),
                                            tokenizer.vocab_size)}
    with AtomicFile(out_path + ".json", "w", durable=False, encoding="utf-8") as f:
        json.dump(meta, f, indent=1)  # ASCII escapes: a file name that is not UTF-8 reads back as it was
    return meta


CHECKSUM_BLOCK = 64 << 20


def file_checksum(path):
    """blake2b over every byte of the file: the digests of its 64 MiB blocks, hashed on up to 8 threads (hashlib
    releases the GIL), then hashed together with the size. Sampling blocks would miss one flipped byte; the full hash
    costs little: a 1.2 GB cache (a 1.8 GB corpus) in 1.3 s on this 2-core CPU (0.9 GB/s, one core free), 0.55 s on
    the 16-core H200 host (2.2 GB/s with 8 threads, 0.47 GB/s with one)."""
    size = os.path.getsize(path)
    top = hashlib.blake2b(str(size).encode(), digest_size=16)
    if size == 0:
        return top.hexdigest()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        blocks = [view[i:i + CHECKSUM_BLOCK] for i in range(0, size, CHECKSUM_BLOCK)]
        with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for digest in pool.map(lambda b: hashlib.blake2b(b, digest_size=16).digest(), blocks):
                top.update(digest)
        del blocks, view  # the mmap cannot close while slices of it are alive
    return top.hexdigest()


def verify_cache(path):
    """(meta, None) for an intact cache entry; (None, what is wrong) for a damaged one; (None, None) for none."""
    if not os.path.exists(path) and not os.path.exists(path + ".json"):
        return None, None
    try:
        with open(path + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        expected = meta["tokens"] * np.dtype(meta["dtype"]).itemsize
        checksum = meta["checksum"]
        size = os.path.getsize(path)
    except FileNotFoundError as e:
        return None, f"{os.path.basename(e.filename)} is missing"
    except KeyError as e:
        return None, f"its sidecar has no {e.args[0]!r} (written by older code, or torn)"
    except (ValueError, TypeError) as e:  # torn or garbled JSON, a nonsense dtype
        return None, f"its sidecar is unreadable ({type(e).__name__}: {str(e)[:80]})"
    if size != expected:
        return None, f"{size:,} bytes where {expected:,} were written (truncated or overwritten)"
    if file_checksum(path) != checksum:
        return None, "its bytes changed since it was written (checksum mismatch)"
    return meta, None


def document_ids(tokenizer, texts, num_threads=None):
    """Each text as BOS ... EOS: the form training sees, evaluation scores and a generation prompt starts from."""
    for ids in tokenizer.encode_batch(texts, num_threads=num_threads):
        yield [tokenizer.bos_id, *ids, tokenizer.eos_id]


def _write_batch(f, tokenizer, texts, dtype, num_threads):
    n = 0
    docs = [np.asarray(doc, dtype=dtype) for doc in document_ids(tokenizer, texts, num_threads)] if texts else []
    if docs:
        # f.write, not ndarray.tofile: a full disk then says ENOSPC instead of "OSError: 4096 requested and 0 written"
        f.write(np.concatenate(docs).tobytes())
        n = sum(len(doc) for doc in docs)
    return n


def load_corpora(train_paths, valid_paths, tokenizer, cache_dir, text_field, num_threads, log, ddp=False, master=True):
    """(train, validation or None) token memmaps of a run. Under DDP rank 0 tokenizes into the cache while the others
    wait, then they map the same files."""
    for turn in (0, 1) if ddp else (0,):
        if (turn == 0) == master:
            # validation first: a validation file without documents is told in seconds, not after the training corpus
            valid = load_tokens(valid_paths, tokenizer, cache_dir, text_field, num_threads, "valid", log) \
                if valid_paths else None
            train = load_tokens(train_paths, tokenizer, cache_dir, text_field, num_threads, "train", log)
        if ddp:
            dist.barrier()
    return train, valid


def load_tokens(paths, tokenizer, cache_dir, text_field="text", num_threads=None, desc="tokenizing", log=print):
    """Token ids of the corpus as a read-only memmap, building the cache on first use or when it is damaged."""
    path = os.path.join(cache_dir, cache_key(paths, tokenizer, text_field) + ".bin")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as e:  # (check_cache_dir said so up front; this is the backstop)
        raise DataError(f"cannot write in --cache_dir {cache_dir} ({e.strerror or e}); choose another --cache_dir") \
            from None
    remove_stale_tmp(cache_dir)
    # one builder per entry: a second process (another run on the same corpus) waits here, then finds it built
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta, damage = verify_cache(path)
        if meta is not None and (opened := [p for p in meta.get("unopened", []) if opens(p)]):
            # a file that could not be opened (its permissions) is not the corpus's content: once it opens, the cache
            # that left it out is stale, though the files' sizes and times, its key, have not changed
            log(f"{desc}: token cache {path} was built without {', '.join(opened)}, which could not be opened then "
                f"and can now; rebuilding it")
            meta = None
        if meta is not None:  # what the build skipped and which files were damaged, said again on every reuse
            log(f"{desc}: token cache {path} ({meta['tokens']:,} tokens, {documents(meta)}"
                + damage_note(meta) + ")")
        else:
            if damage:
                log(f"{desc}: warning: token cache {path} is damaged: {damage}; rebuilding it")
            log(f"{desc}: building token cache {path} from {len(paths)} file(s)")
            try:
                meta = build_token_cache(paths, tokenizer, path, text_field, num_threads, desc)
            except OSError as e:  # disk full, quota, a file-size limit: the partial file is gone (AtomicFile)
                if e.filename in paths:  # a corpus file that failed mid-read (trm.corpus names it): no disk to free
                    flag = f"--{desc}_paths" if desc in ("train", "valid") else "the inputs"
                    raise DataError(f"reading {e.filename} failed: {e.strerror or e}; no token cache was written. "
                                    f"Check that file's disk, or leave it out of {flag}.") from None
                raise CacheWriteError(f"writing the token cache {path} failed: {e.strerror or e}; nothing else was "
                                      f"changed. Free some space in {cache_dir} or choose another --cache_dir, then "
                                      f"run the same command again.") from None
            log(f"{desc}: {meta['tokens']:,} tokens from {documents(meta)} in {meta['seconds']:.1f}s"
                + damage_note(meta))
    # the mapping outlives the lock: a later rebuild replaces the file by rename, so this inode stays as it is
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["tokens"],))
    # what the stream is, for a resumed loader: the key names the inputs, this the tokens (a rebuild keeps it)
    tokens.checksum = meta["checksum"]
    tokens.unigram_nats = meta.get("unigram_nats")
    return tokens


def opens(path):
    try:
        open(path, "rb").close()
        return True
    except OSError:
        return False


def documents(meta):
    return f"{meta['documents']:,} document{'s' * (meta['documents'] != 1)}"


def damage_note(meta):
    """What a cache's build skipped and which files were damaged (", 2 malformed lines skipped {...}, damaged files:
    [...]"), from its sidecar; "" when neither."""
    skipped = sum(meta.get("skipped", {}).values())
    return ((f", {skipped:,} malformed lines skipped {meta['skipped']}" if skipped else "")
            + (f", damaged files: {meta['errors']}" if meta.get("errors") else ""))


class PackedLoader:
    """Shuffled, packed windows of seq_len + 1 tokens; rank r of world_size reads a disjoint share of each batch."""

    def __init__(self, tokens, seq_len, batch_size, seed=0, rank=0, world_size=1):
        if len(tokens) < 2:
            raise DataError("the training corpus has fewer than 2 tokens")
        self.tokens, self.L, self.B = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = -(-len(tokens) // seq_len)  # ceil(N / L): every token is a target once per epoch
        self.corpus = getattr(tokens, "checksum", None)  # load_tokens' memmap has it; a bare array has none
        self.cursor = 0  # windows consumed by all ranks together
        self._order_epoch, self._order = -1, None

    def describe(self, tokens_per_step):
        """The trainer's data line, and a warning when the corpus is shorter than a window (else None)."""
        N, epoch_steps = len(self.tokens), self.n_windows * self.L / tokens_per_step  # (<1 step: not "0 steps")
        per_epoch = f"{epoch_steps:,.{0 if epoch_steps >= 10 else 2}f}"
        line = (f"{N:,} train tokens = {self.n_windows:,} windows of {self.L} ({per_epoch} steps per epoch at "
                f"{tokens_per_step:,} tokens/step)")
        if N >= self.L + 1:
            return line, None
        # a window then wraps round the circle: the same text several times in one window
        return line, (f"the training corpus is {N:,} tokens, less than one window of {self.L + 1:,}: each window "
                      f"repeats it about {(self.L + 1) / N:.0f} times. Add text, or train a new run with --max_seq_len "
                      f"{max(1, N - 1)} or less")

    def order(self, epoch):
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def window(self, i):
        N, start = len(self.tokens), i * self.L
        if start + self.L + 1 <= N:
            return np.asarray(self.tokens[start:start + self.L + 1])
        return np.asarray(self.tokens[(start + np.arange(self.L + 1)) % N])  # wraps around the circle

    def window_ids(self, cursor, count):
        ids = []
        for g in range(cursor, cursor + count):
            epoch, j = divmod(g, self.n_windows)
            ids.append(int(self.order(epoch)[j]))
        return ids

    def next_batch(self):
        """(x, y) int64 tensors [B, L] for this rank; advances the shared cursor by the global batch."""
        mine = self.cursor + self.rank * self.B
        rows = np.stack([self.window(i) for i in self.window_ids(mine, self.B)]).astype(np.int64)
        self.cursor += self.B * self.world_size
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    @property
    def epoch(self):
        return self.cursor / self.n_windows

    def state_dict(self):
        return {"cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows, "corpus": self.corpus}

    def load_state_dict(self, state):
        warning = None
        if state["n_windows"] != self.n_windows:
            warning = (f"warning: the training corpus changed since the checkpoint ({state['n_windows']} -> "
                       f"{self.n_windows} windows); continuing from the same position in the new order")
        elif None not in (state.get("corpus"), self.corpus) and state["corpus"] != self.corpus:
            # as many windows of other tokens (files in another order, a file rewritten): the position would go on
            # silently in another stream, training some text of this epoch twice and some not at all
            warning = (f"warning: the training corpus changed since the checkpoint (as many windows, {self.n_windows}, "
                       f"of other tokens); continuing from the same position in the new stream")
        if warning and self.rank == 0:  # every rank loads the same state: one warning, not one per process
            print(warning, file=sys.stderr)
        self.cursor = state["cursor"]


def eval_windows(tokens, seq_len, max_tokens):
    """A fixed, deterministic validation set: the first windows of the stream, stride L, no wrap-around.

    Returns an int64 tensor [n, L + 1]; at most max_tokens targets (at least one window).
    """
    N, L = len(tokens), seq_len
    if N < 2:
        raise DataError("the validation corpus has fewer than 2 tokens")
    if N < L + 1:
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64)[None])  # one short window
    n = min((N - 1) // L, max(1, max_tokens // L))
    idx = np.arange(n)[:, None] * L + np.arange(L + 1)[None]
    return torch.from_numpy(np.asarray(tokens)[idx].astype(np.int64))
