"""Step 2: train the SentencePiece BPE tokenizer (ja_trm.model, ja_trm.vocab) on train_texts.txt from step 1.

    python train_spm.py                                   # the procedure's settings: 16k BPE, coverage 0.9995
    python train_spm.py --vocab_size 32000 --model_prefix ja_trm32k --eval_file validation_0.jsonl.gz

No document is kept from the trainer for its length: SentencePiece silently drops any line longer than
--max_sentence_length bytes (its own default, ~1,400 Japanese characters, which most documents exceed), so each line
is cut into sentences at 。！？ (then at a space or 、, then at a character boundary) before it is fed. Time and
memory stay bounded on a 1.8 GB corpus: the trainer sees a uniform sample of whole lines, about
--input_sentence_size sentences (there about one line in seven; the run prints the share), streamed to it from the
file, never the whole corpus in memory. byte_fallback gives 0 unknown tokens; ids unk=0 pad=1 bos=2 eos=3 are the
ones the users' existing models use. The .model and .vocab files appear only when training has finished.
"\\n" is one piece of its own, so ja_trm.vocab (a listing for people; the .model is what code reads) has one entry
broken across two lines.
"""
import argparse
import codecs
import io
import json
import os
import random
import re
import sys
import threading
import time

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from trm.atomic import AtomicFile, NotAFileError, remove_stale_tmp
from trm.cli import fail, quiet_interrupt, range_error
from trm.corpus import SUFFIXES, CorpusStats, iter_texts, missing_package

HOLDOUT_EVERY = 200  # without --eval_file, every 200th line is held out of training and measures the tokenizer
EVAL_MAX_BYTES = 20 << 20  # enough held-out text for stable figures; encoding it takes seconds
READ_SIZE = 16 << 20
# characters per call of the evaluation's encoder: BPE's memory grows steeply with the input, and one 50 MB one-line
# document aborted it (std::bad_alloc) under a 2 GB limit, after the model was written
EVAL_CHUNK = 1 << 16

# A sentence: text up to and including a run of 。！？ and any closing brackets after it (「はい。」 stays whole),
# or trailing text without an end mark. Leading spaces (step 1's former line breaks) are not part of it.
SENTENCE = re.compile(r" *([^。！？]*[。！？]+[」』）]*|[^。！？]+)")


def split_line(line, max_bytes):
    """Sentences of `line`, each under `max_bytes` UTF-8 bytes, that together hold all of its text."""
    pieces = []
    for s in SENTENCE.findall(line):
        if len(s) * 4 < max_bytes or len(s.encode("utf-8")) < max_bytes:
            pieces.append(s)
        else:
            pieces += hard_split(s, max_bytes)
    return [p for p in pieces if not p.isspace()]


def hard_split(sentence, max_bytes):
    """A sentence with no end mark for thousands of bytes: cut at a space or 、 if one is near, else between chars."""
    b, pieces = sentence.encode("utf-8"), []
    while len(b) >= max_bytes:
        cut = max_bytes - 1
        while cut > 0 and b[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: step back to the start of its character
            cut -= 1
        if cut == 0:  # a limit under one character (not reachable from the command line): one character per piece
            cut = 1
            while cut < len(b) and b[cut] & 0xC0 == 0x80:
                cut += 1
        soft = max(b.rfind(b" ", cut // 2, cut) + 1, b.rfind("、".encode(), cut // 2, cut) + 3)
        cut = soft if soft > 3 else cut  # rfind's -1 gives 0 or 2: no soft break in the second half
        pieces.append(b[:cut].decode("utf-8"))
        b = b[cut:]
    return pieces + [b.decode("utf-8")]


def count_input(path):
    """Pass 1, at the speed of bytes.count: lines, bytes, and sentence ends, to set the sampling rate."""
    lines = ends = size = 0
    has_text, last = False, b"\n"
    marks = [m.encode("utf-8") for m in "。！？"]
    with open(path, "rb") as f:
        while block := f.read(READ_SIZE):
            size += len(block)
            lines += block.count(b"\n")
            ends += sum(block.count(m) for m in marks)
            has_text = has_text or not block.isspace()
            last = block[-1:]
    lines += last != b"\n"  # a final line without its newline
    return lines, size, ends, has_text


def read_lines(path, bar):
    """The file's lines as bytes, read in big blocks (a 1.8 GB file never sits in memory)."""
    pending = b""
    with open(path, "rb") as f:
        while block := f.read(READ_SIZE):
            bar.update(len(block))
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            yield from lines
    if pending:
        yield pending


REPLACED = {"lines": 0, "bytes": 0}  # invalid UTF-8 met in the lines read (sampled or held out), replaced by U+FFFD


def _count_and_replace(e):
    REPLACED["bytes"] += e.end - e.start
    return "\ufffd", e.end


codecs.register_error("trm_count_replace", _count_and_replace)


def decode(raw):
    """A line as text; invalid UTF-8 becomes U+FFFD, counted in REPLACED (said once training is done)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        REPLACED["lines"] += 1
        return raw.decode("utf-8", "trm_count_replace")


def sentences_for_training(path, keep, max_bytes, holdout, heldout, fed, bar, seed):
    """Pass 2, streamed into the trainer: each line is kept with probability `keep` and cut into sentences.

    Lines are the sampling unit (whole documents, so no sentence is favoured by its position), and the rate comes
    from pass 1's count so that about --input_sentence_size sentences come out. Every `HOLDOUT_EVERY`th line goes to
    `heldout` instead when `holdout` is on."""
    rng = random.Random(seed)
    heldout_bytes = 0
    for i, raw in enumerate(read_lines(path, bar), 1):
        if holdout and i % HOLDOUT_EVERY == 0:
            if heldout_bytes < EVAL_MAX_BYTES and raw.strip():
                heldout.append(decode(raw))
                heldout_bytes += len(raw)
            continue
        if keep < 1 and rng.random() >= keep:
            continue
        for piece in split_line(decode(raw), max_bytes):
            fed["sentences"] += 1
            fed["chars"] += len(piece)
            yield piece
    bar.close()  # the trainer has everything; what follows is SentencePiece's own work
    print(f"SentencePiece is training on {fed['sentences']:,} sentences (no progress shown; about a minute for 2M "
          f"sentences on 2 cores)", file=sys.stderr, flush=True)


def in_thread(work):
    """work() in a thread while this one waits, its exception raised here. SentencePiece trains in C++ for a minute
    or more after the sample is read, and Python takes Ctrl-C only between its own instructions: called here, Ctrl-C
    waited for training to end. A wait on a thread (SentencePiece releases the GIL) takes it at once."""
    failed = []

    def run():
        try:
            work()
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=run, daemon=True)  # daemon: Ctrl-C ends the process with the trainer mid-way
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if failed:
        raise failed[0]


def read_eval_file(path):
    """Held-out text from --eval_file: a corpus file (raw documents) or a text file, one document per line."""
    texts, size, stats = [], 0, CorpusStats()
    if path.endswith(SUFFIXES):
        stream = iter_texts(path, stats=stats)
    else:
        stream = (line.rstrip("\n") for line in open(path, encoding="utf-8", errors="replace"))
    for text in stream:
        if text.strip():
            texts.append(text)
            size += len(text)
            if size * 3 >= EVAL_MAX_BYTES:
                break
    if skipped := stats.skipped_note():
        print(f"warning: {path}: {skipped}; the figures are on the {len(texts):,} documents read", file=sys.stderr)
    return texts


def not_text(path):
    """Why `path` is not step 1's text (one document per line), or None. Training on gzip bytes or on JSON syntax
    "works" and gives a useless tokenizer, so these are refused up front."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:2] == b"\x1f\x8b" or path.endswith(".gz"):
        return "is gzip-compressed"
    if head[:6] == b"\xfd7zXZ\x00" or head[:4] == b"\x28\xb5\x2f\xfd" or path.endswith((".xz", ".zst")):
        return "is xz- or zstd-compressed"
    first = head.split(b"\n", 1)[0].strip()
    if b"\n" in head or len(head) < 1 << 16:  # the whole first line: JSON if it parses to a record (not "{数学}")
        try:
            record = json.loads(first)
        except (ValueError, RecursionError):  # ("[[[[..." nests deeper than the parser goes)
            record = None
        if isinstance(record, dict):
            return "is JSON lines (a corpus file)"
    elif re.match(rb'\{\s*"', first):  # a first line longer than 64 KB: it opens as a record does
        return "is JSON lines (a corpus file)"
    return None


def vocab_error(message, args):
    """SentencePiece's own complaints about --vocab_size, as one actionable line."""
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
        most = int(m.group(2))
        fail(f"--vocab_size {args.vocab_size:,} is too large for this corpus: it supports at most {most:,} pieces. "
             f"Use --vocab_size {most} (or less), or train on more text.")
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        need = int(m.group(2))
        fail(f"--vocab_size {args.vocab_size:,} cannot hold the {need:,} characters that --character_coverage "
             f"{args.character_coverage} requires: use --vocab_size {need + 256} or more, or lower "
             f"--character_coverage.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python train_spm.py --input train_texts.txt "
                                            "--model_prefix ja_trm --vocab_size 16000")
    parser.add_argument("--input", default="train_texts.txt",
                        help="one document per line, step 1's output (default: %(default)s)")
    parser.add_argument("--model_prefix", default="ja_trm",
                        help="writes PREFIX.model and PREFIX.vocab (default: %(default)s)")
    parser.add_argument("--vocab_size", type=int, default=16000, help="pieces in the vocabulary (default: %(default)s)")
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"],
                        help="SentencePiece's algorithm (default: %(default)s)")
    parser.add_argument("--character_coverage", type=float, default=0.9995,
                        help="share of characters that get pieces; the rest fall back to bytes (default: %(default)s)")
    parser.add_argument("--input_sentence_size", type=int, default=2_000_000,
                        help="sentences sampled for training; bounds time and memory; 0 = all (default: %(default)s)")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1,
                        help="SentencePiece's threads (default: %(default)s, the cores). With more than one, two "
                             "runs on the same input can differ in a few pieces (BENCHMARKS.md: 160 of 16,000); "
                             "1 gives the same model every run")
    parser.add_argument("--max_sentence_length", type=int, default=4192,
                        help="bytes; longer sentences are cut, never dropped (default: %(default)s)")
    parser.add_argument("--eval_file", default=None,
                        help="held-out text (.txt one document per line, or .jsonl[.gz|.xz|.zst]) "
                             f"(default: every {HOLDOUT_EVERY}th line of --input, kept out of training)")
    parser.add_argument("--seed", type=int, default=1234,
                        help="for the line sample and SentencePiece's shuffling (default: %(default)s; the same "
                             "model every run needs --num_threads 1 too)")
    args = parser.parse_args()
    quiet_interrupt()

    # every number against the range SentencePiece accepts (or a sane one), before minutes of work
    if problem := range_error(args, {"vocab_size": "[300, 1000000]", "character_coverage": "[0.98, 1.0]",
                                     "input_sentence_size": "[0, 1000000000000]", "num_threads": "[1, 1024]",
                                     "max_sentence_length": f"[64, {1 << 30}]", "seed": f"[0, {2**32 - 1}]"}):
        fail(problem)
    if os.path.isdir(args.input):
        fail(f"--input {args.input} is a folder; name step 1's text file (train_texts.txt), or run step 1 on the "
             f"folder first: python extract_texts.py --inputs {args.input} --output train_texts.txt")
    if not os.path.isfile(args.input):
        fail(f"{args.input} not found (working directory {os.getcwd()}). Run step 1 first: python extract_texts.py "
             f"(it writes train_texts.txt from train_0.jsonl.gz ... train_10.jsonl.gz), or pass --input PATH.")
    try:  # no permission, a failing disk: one line, not a traceback
        why = not_text(args.input)
    except OSError as e:
        fail(f"cannot read --input {args.input} ({e.strerror}).")
    if why:
        fail(f"--input {args.input} {why}, not one document per line. Run step 1 first: python extract_texts.py "
             f"--inputs {args.input} --output train_texts.txt, then train on train_texts.txt.")
    eval_texts = None
    if args.eval_file:
        if not os.path.isfile(args.eval_file):
            fail(f"--eval_file {args.eval_file} not found.")
        try:
            why = not args.eval_file.endswith(SUFFIXES) and not_text(args.eval_file)
        except OSError as e:
            fail(f"cannot read --eval_file {args.eval_file} ({e.strerror}).")
        if why:
            fail(f"--eval_file {args.eval_file} {why}: name a corpus file *.jsonl(.gz/.xz/.zst) or *.parquet, "
                 f"or give a text file.")
        if problem := missing_package([args.eval_file]):
            fail(problem)
        try:
            eval_texts = read_eval_file(args.eval_file)
        except OSError as e:
            fail(f"cannot read --eval_file {args.eval_file} ({e.strerror}).")
        if not eval_texts:
            fail(f"--eval_file {args.eval_file} has no readable text to evaluate on (for a corpus file, documents in "
                 f"the 'text' field). Fix the file or leave --eval_file out to hold lines of --input back.")

    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    remove_stale_tmp(out_dir, os.path.basename(args.model_prefix))  # what killed runs of this command left
    for out in (args.model_prefix + ".model", args.model_prefix + ".vocab"):
        try:  # now, not after minutes of training: a directory that refuses the files, an output that is a FIFO
            AtomicFile(out).discard()
        except NotAFileError as e:
            fail(f"cannot write {out}: {e.strerror}; nothing was trained. Remove it or choose another --model_prefix.")
        except OSError as e:
            fail(f"cannot write {out}: {e.strerror} (in {out_dir}); nothing was trained. "
                 f"Choose a --model_prefix in a directory you can write to.")
    t0 = time.time()
    try:
        n_lines, n_bytes, n_ends, has_text = count_input(args.input)
    except OSError as e:  # (a disk that fails after the first 64 kB read above)
        fail(f"cannot read --input {args.input} ({e.strerror}).")
    if not has_text:
        fail(f"{args.input} is empty: no text to train on. Check that step 1 (python extract_texts.py) "
             f"reported documents.")
    est_sentences = n_ends + n_lines  # every line ends in at least one sentence
    keep = 1.0 if args.input_sentence_size <= 0 else min(1.0, args.input_sentence_size / est_sentences)
    print(f"{args.input}: {n_bytes / 1e6:,.1f} MB, {n_lines:,} lines, ~{est_sentences:,} sentences; "
          f"sampling {keep:.1%} of the lines")

    heldout, fed = [], {"sentences": 0, "chars": 0}
    bar = tqdm(total=n_bytes, unit="B", unit_scale=True, desc="sample", file=sys.stderr)
    sentences = sentences_for_training(args.input, keep, args.max_sentence_length, args.eval_file is None,
                                       heldout, fed, bar, args.seed)
    # imported only here: trm.tokenizer brings in torch, seconds of start-up that a bad --input should not wait for
    from trm.tokenizer import SPM_SPECIAL_IDS, UNK_ID

    spm.set_random_generator_seed(args.seed)
    proto = io.BytesIO()  # SentencePiece's own file writer ignores a failed write: a full disk gave a truncated .model
    try:
        in_thread(lambda: spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=proto,
            vocab_size=args.vocab_size, model_type=args.model_type, character_coverage=args.character_coverage,
            # our sample is already the size asked for; the trainer's own reservoir only trims the estimate's excess
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=args.max_sentence_length, num_threads=args.num_threads,
            byte_fallback=True,  # a character outside the vocabulary becomes its UTF-8 bytes, never <unk>
            split_digits=True,  # numbers as digit sequences: a small model learns them instead of memorising
            add_dummy_prefix=False, remove_extra_whitespaces=False,  # keep text as written; Japanese has no words
            user_defined_symbols=["\n"],  # a paragraph break in raw training text (step 3) is exactly one token
            normalization_rule_name="nmt_nfkc", minloglevel=2, **SPM_SPECIAL_IDS))
    except (RuntimeError, KeyboardInterrupt) as e:
        bar.close()
        if isinstance(e, KeyboardInterrupt):
            print(file=sys.stderr)
            fail("interrupted (Ctrl-C); existing model files (if any) are unchanged.", 130)
        vocab_error(str(e), args)
        fail(f"SentencePiece training failed: {str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)}", 1)
    bar.close()
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    try:  # both written whole before either is renamed: a full disk leaves the previous model as it was
        with AtomicFile(args.model_prefix + ".model") as model_file, \
                AtomicFile(args.model_prefix + ".vocab", "w", encoding="utf-8") as vocab_file:
            model_file.write(proto.getvalue())
            # SentencePiece's layout: piece, tab, score
            vocab_file.writelines(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
            model_file.flush()
            vocab_file.flush()
    except OSError as e:  # disk full, quota: one sentence
        kept = "the previous model is unchanged" if os.path.exists(args.model_prefix + ".model") else "nothing written"
        fail(f"writing {args.model_prefix}.model failed: {e.strerror or e}; {kept}. Free some space or choose "
             f"another --model_prefix.", 1)
    train_seconds = time.time() - t0
    if REPLACED["lines"]:
        print(f"warning: {REPLACED['lines']:,} of the lines read held invalid UTF-8 ({REPLACED['bytes']:,} bytes, each "
              f"replaced by U+FFFD); step 1 writes UTF-8, so {args.input} came from elsewhere or was damaged",
              file=sys.stderr)
    print(f"trained on {fed['sentences']:,} sentences ({fed['chars']:,} characters) in {train_seconds:.0f} s "
          f"-> {args.model_prefix}.model, {args.model_prefix}.vocab")

    # what a user needs to judge the tokenizer, on text it has not seen
    where = args.eval_file or f"every {HOLDOUT_EVERY}th line of {args.input}"
    texts = eval_texts if args.eval_file else heldout
    if not texts:  # a corpus under HOLDOUT_EVERY lines holds nothing back: measure on (seen) training lines
        where = f"the first lines of {args.input} (too short to hold lines back: these were trained on)"
        texts = read_eval_file(args.input)[:1000]
    if not texts:
        fail(f"no text to evaluate in {where}; the model itself is written.", 1)
    try:  # the model is written: Ctrl-C now loses only the figures
        pieces = [t[i:i + EVAL_CHUNK] for t in texts for i in range(0, len(t), EVAL_CHUNK)]
        ids = sp.encode(pieces, num_threads=args.num_threads)
        flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
        is_byte = np.array([sp.is_byte(i) for i in range(sp.get_piece_size())])
        n_bytes_eval = sum(len(t.encode("utf-8")) for t in texts)
        n_chars_eval = sum(len(t) for t in texts)
        sample = pieces[:: max(1, len(pieces) // 200)]
        # decode(encode(x)) gives back x as the normalizer rewrote it (NFKC; spaces are '▁' inside the model)
        same = sum(sp.decode(sp.encode(x)) == sp.normalize(x).replace("\u2581", " ") for x in sample)
        print(f"vocab size        {sp.get_piece_size():,}")
        print(f"evaluated on      {where}: {len(texts):,} documents, {n_chars_eval:,} characters")
        print(f"bytes/token       {n_bytes_eval / len(flat):.3f}")
        print(f"characters/token  {n_chars_eval / len(flat):.3f}")
        unknown = int(np.sum(flat == UNK_ID))
        print(f"unknown rate      {unknown / len(flat):.4%} ({unknown:,} of {len(flat):,} tokens)")
        print(f"byte fallback     {np.mean(is_byte[flat]):.4%} of tokens")
        print(f"round trip        {same}/{len(sample)} documents (or {EVAL_CHUNK:,}-character pieces of long ones) "
              f"decode(encode(x)) == normalized x")
        if same < len(sample):  # text that does not come back is text the model trains and generates wrongly
            # with no piece for '▁', a space travels as the bytes of '▁' and decodes as '▁', not as a space
            no_space = sp.piece_to_id("\u2581") == sp.unk_id()
            print(f"warning: {len(sample) - same} of {len(sample)} documents do not decode back to their text"
                  + (" (the vocabulary has no piece for a space, so spaces come back as '▁': a larger --vocab_size "
                     "or more text gives it one)" if no_space else ""), file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        fail(f"interrupted during the evaluation; {args.model_prefix}.model and {args.model_prefix}.vocab were "
             f"already written and are complete.", 130)
