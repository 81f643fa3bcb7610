"""Streaming the users' JSONL corpora (llm-jp style {"text": ..., "meta": ...}), one text at a time: .jsonl, .jsonl.gz,
.jsonl.xz (stdlib lzma) or .jsonl.zst (the optional zstandard package), and .parquet (the optional pyarrow package;
trm/parquet.py); the file's extension decides.

extract_texts.py (step 1) and the training data loader (step 3) both read through here, so they agree on which
documents exist. Bad input never stops a run and never goes unnoticed: a malformed line is skipped and counted
(the first few named as file:line), and a truncated or corrupt gzip keeps every whole line before the damage, as
zcat would print it (a spoilt CRC trailer loses nothing). A truncated .xz or .zst keeps every whole line too; corrupt
data in one keeps the whole lines of what was decompressed before the error, less the last MAX_LOST_OUTPUT bytes.
"""
import collections
import dataclasses
import errno
import glob
import lzma
import os
import queue
import re
import stat
import sys
import threading

try:  # ISA-L inflates the same gzip data about twice as fast as zlib (`pip install isal`); zlib is the fallback
    from isal import isal_zlib as zlib
    zlib.decompressobj().copy  # the damage path replays a read from a saved state
except (ImportError, AttributeError):
    import zlib

from trm.records import texts

SUFFIXES = (".jsonl.gz", ".jsonl", ".jsonl.xz", ".jsonl.zst", ".json.gz", ".parquet")
PATTERNS = ", ".join("*" + s for s in SUFFIXES)  # what a folder is searched for, as messages name it
ZSTD_MISSING = "needs the zstandard package to read .zst files: pip install zstandard"
READ_SIZE = 1 << 20  # compressed bytes per read: big enough that Python's per-call cost vanishes next to inflate
MAX_EXAMPLES = 5
MAX_LOST_OUTPUT = 1 << 16  # .xz/.zst: decompressed bytes per call, so an error loses at most this much


@dataclasses.dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    chars: int = 0
    bytes_in: int = 0  # input bytes consumed (compressed for .gz): what progress bars count
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)  # first few 'file:line: reason'
    errors: list = dataclasses.field(default_factory=list)  # damaged files, one message each
    unopened: list = dataclasses.field(default_factory=list)  # files that could not be opened at all (also in errors)

    def skip(self, path, lineno, reason):
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{path}:{lineno}: {reason}")

    def merge(self, other):
        self.files += other.files
        self.documents += other.documents
        self.chars += other.chars
        self.bytes_in += other.bytes_in
        self.skipped.update(other.skipped)
        self.examples = (self.examples + other.examples)[:MAX_EXAMPLES]
        self.errors += other.errors
        self.unopened += other.unopened
        return self

    def skipped_note(self):
        """'9 records skipped (6 malformed JSON, 3 empty text; e.g. a.jsonl:4: malformed JSON)', or None: for a reader
        that prints no summary of its own, so that a score never rests on fewer documents than a user thinks."""
        if not self.skipped:
            return None
        n = sum(self.skipped.values())
        return (f"{n:,} record{'s' * (n != 1)} skipped (" +
                ", ".join(f"{n:,} {reason}" for reason, n in sorted(self.skipped.items())) +
                (f"; e.g. {self.examples[0]}" if self.examples else "") + ")")

    def summary(self):
        lines = [f"{self.files:,} files, {self.documents:,} documents, {self.chars:,} characters"]
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{n:,} {reason}" for reason, n in sorted(self.skipped.items())))
            lines += [f"  {e}" for e in self.examples]
        lines += [f"damaged: {e}" for e in self.errors]
        return "\n".join(lines)


def _natural_key(path):
    # train_2 before train_10, as the users number their shards
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path)]


def _search_dir(directory):
    found, walked = [], set()
    # into linked subfolders too (shards linked in from another disk), as a recursive glob goes; each folder once,
    # so a link back up the tree is not walked round and round
    for root, dirs, files in os.walk(directory, followlinks=True, onerror=_unsearchable):
        if (real := os.path.realpath(root)) in walked:
            dirs.clear()
            continue
        walked.add(real)
        found += [os.path.join(root, f) for f in files if f.endswith(SUFFIXES)]
    return sorted(found, key=_natural_key)


def _unsearchable(e):
    # os.walk would leave out a folder it cannot list (no permission), and every shard in it, without a word
    print(f"warning: cannot search {e.filename} ({e.strerror}); its files are left out", file=sys.stderr)


def expand_inputs(patterns):
    """Files named by `patterns` (files, directories searched recursively, globs), and the patterns that matched
    nothing.

    Plain files keep the order given; each glob or directory contributes its matches in natural sort order. A path
    that is no file to read (a dangling or looping symbolic link, a FIFO) is skipped with a warning saying what it is,
    and a file reached twice (named twice, or again through a symbolic link: a recursive glob through a link loop
    reaches one file dozens of times) is read once, with one warning.
    """
    found, missing = [], []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = []
            for m in sorted(glob.glob(pattern, recursive=True), key=_natural_key):
                matches += _search_dir(m) if os.path.isdir(m) else [m]
        elif os.path.isdir(pattern):
            matches = _search_dir(pattern)
        else:
            matches = [pattern] if os.path.lexists(pattern) else []
        found += matches
        if not matches:
            missing.append(pattern)
    found, repeated = unique_files(found)
    if repeated:
        again, first = repeated[0]
        print(f"warning: {len(repeated)} path(s) lead to a file already listed (the same file named twice, or reached "
              f"again through a symbolic link), e.g. " + (f"{again} is {first}" if again != first else
                                                          f"{again} named twice") + "; each file is read once",
              file=sys.stderr)
    files = []
    for path in found:
        if os.path.isfile(path):
            files.append(path)
        else:
            print(f"warning: {path} is {what_it_is(path)}, not a file to read; skipping", file=sys.stderr)
    return files, missing


def expand_globs(paths):
    """Patterns the shell passed on unexpanded (quoted, or a shell that does not expand them) expanded here, in the
    shell's sorted order, so that a token cache keyed by the file list is the same either way. A pattern that
    matches nothing, and any other path, stays as given, for the caller to check."""
    expanded = []
    for path in paths:
        matches = sorted(glob.glob(path)) if glob.has_magic(path) and not os.path.lexists(path) else []
        expanded += matches or [path]
    return expanded


def unique_files(paths):
    """(paths without the ones that lead to a file already listed, [(repeated path, the path it repeats)]): the same
    file read twice would count its documents twice. Files are compared by their resolved path; of the names that
    reach one file, the shortest stands for it (not train.jsonl.gz's twentieth trip through a link loop)."""
    where, unique, repeated = {}, [], []
    for path in paths:
        real = os.path.realpath(path)
        if real not in where:
            where[real] = len(unique)
            unique.append(path)
            continue
        kept = unique[where[real]]
        if len(path) < len(kept):
            unique[where[real]], path, kept = path, kept, path
        repeated.append((path, kept))
    return unique, repeated


def unique_paths(paths, flag, log):
    """A flag's paths (or None) without the repeats unique_files finds, each repeat told in one warning."""
    unique, repeated = unique_files(paths or [])
    if repeated:
        log(f"warning: --{flag}: {', '.join(p for p, _ in repeated)} named again (the same file as "
            f"{', '.join(p for _, p in repeated)}); each file is read once")
    return unique if paths is not None else None


def validation_in_training(train_paths, valid_paths):
    """A warning when a validation file is also a training file (by its resolved path, as unique_files compares them),
    or None: its loss would then score text the model trains on."""
    valid = valid_paths or []
    # each list is free of repeats already, so each repeat pairs a training file with a validation file
    seen = [a if a in valid else b for a, b in unique_files(list(train_paths) + list(valid))[1]]
    if not seen:
        return None
    return (f"{', '.join(seen)} {'is also a training file' if len(seen) == 1 else 'are also training files'}: the "
            f"validation loss then scores text the model trains on, not how it does on new text")


def what_it_is(path):
    """What `path` is when it is not a regular file: 'a directory', 'a FIFO (named pipe)', 'a symbolic link that
    points to nothing (nowhere.jsonl.gz)', 'a symbolic link loop'... or 'missing'."""
    from trm.atomic import KINDS
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if os.path.islink(path):
            if e.errno == errno.ELOOP:
                return "a symbolic link loop"
            return f"a symbolic link that points to nothing ({os.readlink(path)})"
        return "missing" if e.errno == errno.ENOENT else f"unreadable ({e.strerror})"
    return next((name for test, name in KINDS if test(mode)), "not a regular file" if not stat.S_ISREG(mode)
                else "a file")


def train_shards(folder):
    """The training shards in `folder` as the users number them: train_N with a corpus suffix, train_2 before train_10.
    Other train_ files are not shards: step 1 writes its train_texts.txt beside them."""
    shard = re.compile(r"train_\d+(" + "|".join(re.escape(s) for s in SUFFIXES) + ")$")
    return sorted((os.path.join(folder, f) for f in os.listdir(folder) if shard.fullmatch(f)), key=_natural_key)


def missing_package(paths):
    """The one-line error for corpus files this Python cannot read (.zst without zstandard, .parquet without pyarrow),
    or None."""
    from trm.parquet import PYARROW_MISSING, pyarrow_parquet
    for suffix, present, missing in ((".zst", _zstd, ZSTD_MISSING), (".parquet", pyarrow_parquet, PYARROW_MISSING)):
        named = [p for p in paths if p.endswith(suffix)]
        if named and present() is None:
            return f"{named[0]} {missing}"
    return None


def _zstd():
    try:
        import zstandard
        return zstandard
    except ImportError:
        return None


class CorpusError(RuntimeError):
    pass


def _read_blocks(path, stats):
    """Decompressed bytes of `path` in big blocks; at damage, record it and stop (what came before stands).
    The one place that opens corpus files: the extension picks the format."""
    if path.endswith(".zst") and _zstd() is None:  # the scripts check up front (missing_package); this is a backstop
        raise CorpusError(f"{path} {ZSTD_MISSING}")
    try:
        f = open(path, "rb")
    except OSError as e:  # vanished since expand_inputs, or unreadable: one file must not end the run
        stats.unopened.append(path)
        yield _damaged(path, stats, f"cannot open ({e.strerror})")
        return
    with f:
        try:
            if path.endswith(".gz"):
                yield from _gunzip(f, path, stats)
            elif path.endswith(".xz"):
                yield from _unpack(f, path, stats, "xz", lzma.LZMADecompressor, lzma.LZMAError)
            elif path.endswith(".zst"):
                zstd = _zstd()
                yield from _unpack(f, path, stats, "zstd", lambda: zstd.ZstdDecompressor().decompressobj(),
                                   zstd.ZstdError)
            else:
                while block := f.read(READ_SIZE * 4):
                    stats.bytes_in += len(block)
                    yield block
        except OSError as e:  # a read that fails (EIO on a failing or network disk) names no file: name this one, so
            e.filename = e.filename or path  # that a caller does not take it for a failure of what it writes
            raise


def _unpack(f, path, stats, name, new_decoder, error):
    """.xz or .zst: one decoder per stream (`cat a.xz b.xz` is one valid file, as for gzip members). Output comes in
    calls of at most MAX_LOST_OUTPUT bytes where the decoder allows it (lzma does), because a call that raises
    drops its whole output and neither decoder can be copied to replay it the way _inflate_until_damage does."""
    bounded = name == "xz"
    decoder, in_stream, empty = new_decoder(), False, True
    while raw := f.read(READ_SIZE):
        stats.bytes_in += len(raw)
        empty = False
        while raw or bounded and in_stream and not decoder.needs_input and not decoder.eof:
            if bounded and not in_stream:  # xz allows null-byte padding between streams
                raw = raw.lstrip(b"\0")
                if not raw:
                    break
            try:
                block = decoder.decompress(raw, MAX_LOST_OUTPUT) if bounded else decoder.decompress(raw)
            except error as e:
                yield _damaged(path, stats, f"corrupt {name} data ({e})")
                return
            in_stream, raw = True, b""
            yield block
            if getattr(decoder, "eof", False):  # zstandard before 0.15 has no eof: truncation then goes unnoticed
                raw, decoder, in_stream = decoder.unused_data, new_decoder(), False
    if in_stream:
        yield _damaged(path, stats, f"truncated {name} (unexpected end of file)")
    elif empty:  # not even a header: a copy or download that failed, not a shard without documents
        yield _damaged(path, stats, f"empty file (0 bytes), not {name} data", kept=False)


def _gunzip(f, path, stats):
    inflate, in_member, first = zlib.decompressobj(wbits=31), False, True
    while raw := f.read(READ_SIZE):
        if first and not raw.startswith(b"\x1f\x8b"):  # (zlib would say "incorrect header check")
            yield _damaged(path, stats, "not gzip data (no gzip header: a plain .jsonl named .gz?)", kept=False)
            return
        first = False
        stats.bytes_in += len(raw)
        while raw:
            saved = inflate.copy()  # ~40 kB per 1 MB read; at damage the read is replayed from here
            try:
                block = inflate.decompress(raw)
            except zlib.error as e:
                yield _inflate_until_damage(saved, raw)
                yield _damaged(path, stats, f"corrupt gzip data ({e})")
                return
            in_member = True
            yield block
            raw = b""
            if inflate.eof:  # concatenated gzip members (e.g. `cat a.gz b.gz`) are one valid file
                raw, inflate, in_member = inflate.unused_data, zlib.decompressobj(wbits=31), False
    if in_member:
        yield _damaged(path, stats, "truncated gzip (unexpected end of file)")
    elif first:  # not even a header (zcat: "unexpected end of file"): a copy or download that failed
        yield _damaged(path, stats, "empty file (0 bytes), not gzip data", kept=False)


def _inflate_until_damage(inflate, raw, piece=4096):
    """What `inflate` makes of `raw` before the damage in it. zlib drops the whole output of a call that raises (a bad
    CRC trailer raises after the member's last byte was inflated), so feed `raw` again in small pieces, then the
    piece that fails byte by byte: every byte zcat would have printed comes out."""
    out = []
    for i in range(0, len(raw), piece):
        saved = inflate.copy() if piece > 1 else None
        try:
            out.append(inflate.decompress(raw[i:i + piece]))
        except zlib.error:
            if saved is not None:
                out.append(_inflate_until_damage(saved, raw[i:i + piece], 1))
            break
    return b"".join(out)


def _read_ahead(blocks, depth=4):
    """Run the `blocks` generator in a thread. zlib and file reads release the GIL, so inflating the next blocks
    overlaps parsing this one on a second core."""
    q, done, stop = queue.Queue(depth), object(), threading.Event()

    def produce():
        try:
            for block in blocks:
                q.put(block)
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # re-raised in the consumer's thread
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped early or finished: let a producer blocked on a full queue see `stop`
        stop.set()
        while not q.empty():
            q.get_nowait()


def _damaged(path, stats, what, kept=True):
    stats.errors.append(f"{path}: {what}")
    print(f"warning: {path}: {what}; " + ("keeping the documents read before the damage" if kept else
                                         "nothing read from it"), file=sys.stderr)
    return None  # the caller's signal that the file ends here


def iter_texts(path, text_field="text", stats=None, min_chars=0, as_bytes=False):
    """Each record's text (raw, newlines kept), in file order. Malformed records are skipped and counted in `stats`.

    as_bytes=True yields the text as UTF-8 bytes: a writer (extract_texts.py) then skips a decode/encode round trip."""
    stats = stats if stats is not None else CorpusStats()
    stats.files += 1
    if path.endswith(".parquet"):  # records are rows of a column there, not lines
        from trm.parquet import parquet_texts
        yield from parquet_texts(path, text_field, stats, min_chars, as_bytes)
        return
    pending, lineno = b"", 0
    for block in _read_ahead(_read_blocks(path, stats)):
        if block is None:  # damage: a partial line pending at that point is not a whole record
            pending = b""
            break
        lines = (pending + block).split(b"\n")
        pending = lines.pop()  # the unfinished last line waits for the next block
        yield from texts(lines, path, lineno, text_field, stats, min_chars, as_bytes)
        lineno += len(lines)
    if pending.strip():  # a last line without its newline is still a record
        yield from texts([pending], path, lineno, text_field, stats, min_chars, as_bytes)
