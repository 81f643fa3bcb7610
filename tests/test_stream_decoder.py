"""StreamDecoder's text equals decode(all ids) where a tail finds no anchor for long: runs of whitespace, of invalid
bytes, of control ids, and a character split across the point where such a tail is cut back."""
import io
import random

import pytest

from conftest import RARE, WORDS
from trm.sampling import StreamDecoder, prompt_ids
from trm.tokenizer import SPM_SPECIAL_IDS, Tokenizer


def streamed(tok, prefix, ids):
    stream = StreamDecoder(tok, prefix)
    return "".join(stream.push(i) for i in ids) + stream.flush()


@pytest.fixture(scope="module")
def spaced_sp_model(tmp_path_factory):
    """A SentencePiece model trained as train_spm.py trains one (spaces kept as pieces, "\\n" one token), on lines
    with spaces and line breaks: runs of whitespace decode to tokens that no anchor may start on."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + rng.choice(["", " ", "  ", "\n"])
             for _ in range(2000)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, add_dummy_prefix=False,
                                   remove_extra_whitespaces=False, user_defined_symbols=["\n"],
                                   normalization_rule_name="nmt_nfkc", minloglevel=2, **SPM_SPECIAL_IDS)
    path = tmp_path_factory.mktemp("spm") / "spaced.model"
    path.write_bytes(proto.getvalue())
    return str(path)


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_stream_decoder_exact_when_a_split_character_follows_a_long_whitespace_run(kind, spaced_sp_model):
    # 64 ids with no anchor (whitespace) cut the tail back; a character whose bytes straddle that cut must still come
    # out whole, as decode(all ids) has it, not as U+FFFD
    tok = Tokenizer.from_args(kind, spaced_sp_model)
    prefix = prompt_ids(tok, "猫")
    wrong = []
    for space in (" ", "\n"):
        for n in range(50, 140):
            ids = tok.encode(space * n) + tok.encode(RARE)
            if streamed(tok, prefix, ids) != tok.decode(prefix + ids)[len(tok.decode(prefix)):]:
                wrong.append((repr(space), n))
    assert wrong == []
    # and the cut keeps every decode short however long the run
    decoded, real = [], tok.decode
    tok.decode = lambda x: (decoded.append(len(x)), real(x))[1]
    ids = tok.encode(" " * 3000) + tok.encode(RARE)
    assert streamed(tok, prefix, ids) == real(prefix + ids)[len(real(prefix)):]
    assert max(decoded[1:]) <= StreamDecoder.MAX_TAIL + 1  # (the first: the prefix)


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_stream_decoder_exact_when_a_split_character_follows_a_long_run_of_invalid_bytes(kind, spaced_sp_model):
    tok = Tokenizer.from_args(kind, spaced_sp_model)
    lone = tok.encode(RARE)[1]  # a continuation byte: alone, a U+FFFD
    assert tok.decode([lone]) == "\ufffd"
    for n in range(50, 140):
        ids = [lone] * n + tok.encode(RARE + " " + RARE)
        assert streamed(tok, [tok.bos_id], ids) == tok.decode([tok.bos_id] + ids), n


def test_stream_decoder_exact_for_random_ids_with_long_tails(spaced_sp_model):
    # any id sequence: heavy in whitespace, invalid and split bytes, control ids, so that tails outgrow MAX_TAIL
    tok = Tokenizer.from_args("sentencepiece", spaced_sp_model)
    rng = random.Random(0)
    pool = tok.encode(" \n  " + RARE) + [tok.eos_id, tok.unk_id, tok.encode(RARE)[1]]
    for _ in range(300):
        ids = [rng.choice(pool) if rng.random() < 0.9 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(60, 200))]
        prefix = prompt_ids(tok, rng.choice(["", "猫", " 猫 "]))
        assert streamed(tok, prefix, ids) == tok.decode(prefix + ids)[len(tok.decode(prefix)):], ids
