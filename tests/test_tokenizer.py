"""The bytes each token stands for: the denominator of every bits/byte in this project."""
import io

import numpy as np

from conftest import RARE, japanese_lines
from trm.tokenizer import SPM_SPECIAL_IDS, Tokenizer


def spaced_tokenizer():
    """train_spm.py's settings (NFKC, byte fallback, text kept as written) on lines with spaces, so '▁' is a piece."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(line.replace("、", " ") for line in japanese_lines()),
                                   model_writer=proto, vocab_size=400, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
                                   minloglevel=2, **SPM_SPECIAL_IDS)
    return Tokenizer("sentencepiece", proto.getvalue())


def test_token_bytes_are_the_utf8_bytes_of_the_normalized_text():
    tok = spaced_tokenizer()
    n, sp = tok.token_bytes(), tok.sp
    # the specials stand for no text (BOS/EOS targets are scored with no bytes)
    assert n[[tok.unk_id, tok.pad_id, tok.bos_id, tok.eos_id]].tolist() == [0, 0, 0, 0]
    # the word boundary is one space; a byte-fallback token is one byte, so a kanji outside the vocabulary is 3
    assert n[sp.piece_to_id("\u2581")] == 1 and not sp.is_unknown(sp.piece_to_id("\u2581"))
    rare = tok.encode(RARE[0])
    assert len(rare) == 3 and all(sp.is_byte(i) for i in rare) and n[rare].tolist() == [1, 1, 1]
    # hand-counted: 猫 (3) + space (1) + 鬱 (3) + ﾊﾟ, which NFKC makes one パ (3, not the 6 of the raw text)
    text = "猫 " + RARE[0] + "\uff8a\uff9f"
    ids = tok.encode(text)
    assert int(n[ids].sum()) == 3 + 1 + 3 + 3 == len(tok.decode(ids).encode("utf-8"))
    assert len(text.encode("utf-8")) == 13  # the raw bytes, which bits/byte does not use for SentencePiece
    # over many documents: the bytes of exactly the text the ids decode to
    docs = [line.replace("、", " ") + RARE for line in japanese_lines(50, seed=9)]
    for doc in docs:
        assert int(n[tok.encode(doc)].sum()) == len(tok.decode(tok.encode(doc)).encode("utf-8"))


def test_the_byte_tokenizer_counts_the_raw_bytes():
    tok = Tokenizer("byte")
    n = tok.token_bytes()
    text = "猫 \uff8a\uff9f"  # no normalization: ﾊﾟ is its own 6 bytes
    assert int(n[tok.encode(text)].sum()) == len(text.encode("utf-8")) == 10
    assert n[[tok.unk_id, tok.pad_id, tok.bos_id, tok.eos_id]].tolist() == [0, 0, 0, 0]
    assert len(n) == tok.vocab_size and np.all(n[4:] == 1)
