"""Behaviour of trm/sampling.py: decoding through the cache equals recomputing (past the window, sampled, adaptive
depth), each row of a batch decodes as if alone, the next-token rule, EOS and BOS, streaming. The script itself:
test_generate.py."""
import pytest
import torch

from conftest import RARE
from trm.checkpoint import load_model
from trm.sampling import StreamDecoder, generate, generate_batch, prompt_ids, sample_next
from trm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

PROMPT = "猫は" + RARE + "を見る"  # byte-fallback tokens in the middle: tokens that split characters


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, tokenizer, _ = load_model(tiny_checkpoint)
    return model, tokenizer


def scripted(model, script, monkeypatch):
    """Make the model's k-th forward pass put all its mass on script[k] (whatever the window), counting passes."""
    forward, calls = model.forward, []

    def fake(idx, **kw):
        logits, loss = forward(idx, **kw)
        logits = torch.zeros_like(logits)
        logits[:, -1, script[min(len(calls), len(script) - 1)]] = 100.0
        calls.append(idx.shape[1])
        return logits, loss

    monkeypatch.setattr(model, "forward", fake)
    return calls


# ---- cached decoding equals recomputation ------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [{}, dict(supervision_steps=3, latent_steps=1), dict(deep_steps=3)])
def test_greedy_with_and_without_cache_identical_past_max_seq_len(tiny, depth):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    n = 120  # the window is 64 tokens: the cache is rebuilt several times
    # the penalty keeps a random model from repeating one token, so the comparison covers many different contexts
    kw = dict(temperature=0, repetition_penalty=2.0, **depth)
    cached = list(generate(model, ids, n, **kw))
    uncached = list(generate(model, ids, n, use_cache=False, **kw))
    assert len(cached) == n and len(set(cached)) > 20
    assert cached == uncached


def test_halting_at_threshold_one_never_changes_greedy_output(halting_checkpoint):
    model, tok, _ = load_model(halting_checkpoint)
    ids = tok.encode(PROMPT)
    kw = dict(temperature=0, repetition_penalty=2.0)
    fixed = list(generate(model, ids, 100, **kw))  # 100 tokens past the 64-token window: refills included
    stats = {}
    assert list(generate(model, ids, 100, halt_threshold=1.0, stats=stats, **kw)) == fixed
    assert stats["rounds"] == 3 * stats["tokens"] and stats["tokens"] > 90
    # and at 0.5 the head does stop some tokens early
    stats = {}
    list(generate(model, ids, 100, halt_threshold=0.5, stats=stats, **kw))
    assert stats["tokens"] < stats["rounds"] < 3 * stats["tokens"]


def test_seeded_sampling_with_and_without_cache_identical(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    kw = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)
    cached = list(generate(model, ids, 100, generator=torch.Generator().manual_seed(3), **kw))
    uncached = list(generate(model, ids, 100, use_cache=False, generator=torch.Generator().manual_seed(3), **kw))
    assert cached == uncached


def test_prompt_longer_than_window(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT * 10)
    assert len(ids) > model.config.max_seq_len
    kw = dict(temperature=0, repetition_penalty=2.0)
    cached = list(generate(model, ids, 40, **kw))
    assert cached == list(generate(model, ids, 40, use_cache=False, **kw))
    assert len(cached) == 40


def test_generation_leaves_grad_mode_alone(tiny):
    model, tok = tiny
    steps = generate(model, tok.encode(PROMPT), 3, temperature=0)
    next(steps)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # not held across the yield


# ---- batches: each row decodes as if alone -------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_greedy_equals_batch_one_past_max_seq_len(tiny, use_cache):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    kw = dict(temperature=0, repetition_penalty=2.0, use_cache=use_cache)
    alone = list(generate(model, ids, 120, **kw))  # the window is 64 tokens: refills included
    steps = list(generate_batch(model, [ids] * 4, 120, **kw))
    assert len(steps) == 120 and all(len(tokens) == 4 for tokens in steps)
    assert [list(row) for row in zip(*steps)] == [alone] * 4


def three_prompts(tok):
    """Three different prompts of one token length."""
    ids = tok.encode(PROMPT)
    return [ids, ids[::-1], ids[1:] + ids[:1]]


def test_eos_ends_its_row_only_and_rows_keep_their_own_repetition_history(tiny):
    model, tok = tiny
    rows = three_prompts(tok)
    # a strong penalty: were the rows' histories shared, every row's greedy choices would change
    kw = dict(temperature=0, repetition_penalty=2.0)
    alone = [list(generate(model, row, 100, **kw)) for row in rows]
    assert len({tuple(a) for a in alone}) == 3
    # EOS = a token that row 1 alone emits at step k (past the window's first refill) and no other row ever does
    k = next(k for k in range(50, 100) if alone[1][k] not in alone[1][:k] + alone[0] + alone[2])
    eos = alone[1][k]
    assert list(generate(model, rows[1], 100, eos_id=eos, **kw)) == alone[1][:k]
    steps = list(generate_batch(model, rows, 100, eos_id=eos, **kw))
    got = [list(row) for row in zip(*steps)]
    assert got[0] == alone[0] and got[2] == alone[2]
    assert got[1] == alone[1][:k] + [None] * (100 - k)  # the EOS step and everything after: nothing from that row
    # when every row has emitted EOS the loop stops: no step of Nones only
    assert len(list(generate_batch(model, [rows[1]] * 2, 100, eos_id=eos, **kw))) == k


def test_batched_adaptive_depth_halts_each_row_on_its_own(halting_checkpoint):
    model, tok, _ = load_model(halting_checkpoint)
    rows = three_prompts(tok)
    kw = dict(temperature=0, repetition_penalty=2.0, halt_threshold=0.95)
    alone, rounds = [], []
    for row in rows:
        stats = {}
        alone.append(list(generate(model, row, 100, stats=stats, **kw)))
        rounds.append(stats["rounds"])
    assert len(set(rounds)) == 3  # the rows run different numbers of rounds (118, 108, 97 when written)
    stats = {}
    got = [list(row) for row in zip(*generate_batch(model, rows, 100, stats=stats, **kw))]
    assert got == alone and stats["rounds"] == sum(rounds)


def test_sampled_rows_draw_independently(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    g = torch.Generator().manual_seed(0)
    steps = list(generate_batch(model, [ids] * 4, 30, temperature=1.0, top_k=0, top_p=1.0, generator=g))
    assert len({tuple(row) for row in zip(*steps)}) == 4  # one draw per row, not one draw shared by all


def test_batch_of_prompts_with_different_lengths_is_refused(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    with pytest.raises(ValueError, match="one token length"):
        next(generate_batch(model, [ids, ids[:-1]], 5))
    with pytest.raises(ValueError, match="bos"):
        next(generate_batch(model, [ids, []], 5))
    with pytest.raises(ValueError, match="no prompts"):
        next(generate_batch(model, [], 5))


# ---- the next-token rule ------------------------------------------------------------------------------------------

def test_sample_next_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5]])
    assert sample_next(logits, temperature=0).tolist() == [1]
    assert all(sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    assert {sample_next(logits, 5.0, top_k=2, generator=g).item() for _ in range(200)} == {1, 2}
    # top_p 0.8 keeps the smallest set covering 80%: here the two best tokens (0.63 + 0.23)
    assert {sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)} == {1, 2}
    # CTRL penalty: the best token, once seen, loses to the runner-up; a negative logit gets more negative
    assert sample_next(logits, 0, repetition_penalty=2.0, prev_ids=torch.tensor([[1, 1]])).tolist() == [2]
    neg = torch.tensor([[-1.0, -1.5]])
    assert sample_next(neg, 0, repetition_penalty=2.0, prev_ids=torch.tensor([[0]])).tolist() == [1]
    batch = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert sample_next(batch, 0).tolist() == [1, 0]


def test_top_k_and_top_p_combine_and_out_of_range_values_switch_them_off():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5]])

    def drawn(n=400, **kw):
        return {sample_next(logits, 1.0, generator=g, **kw).item() for _ in range(n)}

    # top-p reads the top-k survivors' renormalized probabilities: 0.73 and 0.27 of the two best, so 0.7 keeps one
    # (over the whole vocabulary the best token's 0.63 would not cover 0.7, and two would stay)
    assert drawn(top_k=2, top_p=0.7) == {1}
    assert drawn(top_k=0, top_p=0.7) == {1, 2}
    assert drawn(2000, top_k=5) == drawn(2000, top_k=99) == drawn(2000, top_k=-1) == set(range(5))  # k >= V, k < 0: off
    assert drawn(2000, top_p=1.5) == set(range(5))
    # a seeded generator gives the same draws again, another seed other draws
    batch = logits.repeat(64, 1)
    draws = [sample_next(batch, 1.0, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


# ---- EOS, BOS -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_and_is_not_yielded(tiny, monkeypatch, use_cache):
    model, tok = tiny
    calls = scripted(model, [10, 11, 12, tok.eos_id, 13], monkeypatch)
    out = list(generate(model, tok.encode(PROMPT), 50, temperature=0.7, eos_id=tok.eos_id, use_cache=use_cache))
    assert out == [10, 11, 12]
    assert len(calls) == 4
    if use_cache:
        assert calls[1:] == [1, 1, 1]  # one prefill, then one token per forward pass


def test_max_new_tokens_and_no_forward_for_unread_token(tiny, monkeypatch):
    model, tok = tiny
    calls = scripted(model, [10], monkeypatch)
    assert list(generate(model, tok.encode(PROMPT), 5, temperature=0)) == [10] * 5
    assert len(calls) == 5
    assert list(generate(model, tok.encode(PROMPT), 0)) == [] and len(calls) == 5


def test_empty_prompt_starts_from_bos(tiny, monkeypatch):
    model, tok = tiny
    assert prompt_ids(tok, "") == [tok.bos_id]
    assert prompt_ids(tok, "猫") == [tok.bos_id, *tok.encode("猫")]  # a prompt starts a document, as in training
    calls = scripted(model, [10], monkeypatch)
    assert list(generate(model, [tok.bos_id], 2, temperature=0)) == [10, 10]
    assert calls[0] == 1
    with pytest.raises(ValueError, match="bos"):
        next(generate(model, [], 2))


# ---- streaming ----------------------------------------------------------------------------------------------------

def test_stream_decoder_holds_back_split_characters(tiny_sp_model):
    tok = Tokenizer.from_args("sentencepiece", tiny_sp_model)
    prefix, rest = tok.encode("猫は"), tok.encode(RARE + "を見る")
    assert sum(tok.sp.is_byte(i) for i in rest) >= 9  # the fixture really splits characters into byte tokens
    stream = StreamDecoder(tok, prefix)
    pieces = [stream.push(i) for i in rest]
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 6  # held back while a character was incomplete
    assert "".join(pieces) + stream.flush() == RARE + "を見る"
    # generation that ends inside a character: the remainder comes out of flush(), as decode() has it
    stream = StreamDecoder(tok)
    half = tok.encode(RARE)[:2]
    assert [stream.push(i) for i in half] == ["", ""]
    assert stream.flush() == tok.decode(half)


def test_streamed_generation_equals_final_decode(tiny, monkeypatch):
    model, tok = tiny
    target = tok.encode(RARE + "を見る" + RARE)
    scripted(model, target + [tok.eos_id], monkeypatch)
    prompt = tok.encode(PROMPT)
    stream, pieces = StreamDecoder(tok, prompt), []
    for token in generate(model, prompt, 100, temperature=0, eos_id=tok.eos_id):
        pieces.append(stream.push(token))
    pieces.append(stream.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(prompt + target)[len(tok.decode(prompt)):] == RARE + "を見る" + RARE


# ---- streaming: exact, and a constant cost per token ---------------------------------------------------------------

def streamed(tok, prefix, ids):
    stream = StreamDecoder(tok, prefix)
    return "".join(stream.push(i) for i in ids) + stream.flush()


STREAM_TEXTS = ["猫は" + RARE + "を見る。" * 3, "  東京  の 天気 、" + RARE + " 晴れ\n\n雨" + RARE[-1],
                RARE * 5 + "😀 x  y", " 先頭の空白と末尾の空白 "]


@pytest.mark.parametrize("kind", ["sentencepiece", "byte"])
def test_stream_decoder_output_equals_decoding_all_at_once(tiny_sp_model, kind):
    tok = Tokenizer.from_args(kind, tiny_sp_model)
    for prompt in ["", "猫は", "薔", " 空白 "]:
        for text in STREAM_TEXTS:
            prefix, ids = prompt_ids(tok, prompt), tok.encode(text)
            if kind == "sentencepiece":
                assert any(tok.sp.is_byte(i) for i in ids)
            assert streamed(tok, prefix, ids) == tok.decode(prefix + ids)[len(tok.decode(prefix)):]
            # with EOS-like control ids and a cut in the middle of a character
            cut = ids[: len(ids) // 2] + [tok.eos_id] + ids[len(ids) // 2:]
            assert streamed(tok, prefix, cut) == tok.decode(prefix + cut)[len(tok.decode(prefix)):]


def test_stream_decoder_cost_per_token_does_not_grow(tiny_sp_model):
    tok = Tokenizer.from_args("sentencepiece", tiny_sp_model)
    ids = tok.encode("".join(f"{RARE}の {i} 番目、 東京 は 晴れ。\n" for i in range(800)))
    assert len(ids) > 20_000
    decoded = []
    real = tok.decode
    tok.decode = lambda x: (decoded.append(len(x)), real(x))[1]  # what each decode call is given
    stream = StreamDecoder(tok, [tok.bos_id])
    out = "".join(stream.push(i) for i in ids) + stream.flush()
    assert out == real([tok.bos_id] + ids)
    assert max(decoded) <= 16  # at token 20,000 as at token 10: a short tail, never the whole list
    assert len(decoded) <= 3 * len(ids)


def test_stream_decoder_cost_stays_bounded_on_invalid_bytes():
    tok = Tokenizer("byte")
    ids = [4 + 0x80] * 5000  # continuation bytes with no lead byte: every one a U+FFFD
    decoded = []
    real = tok.decode
    tok.decode = lambda x: (decoded.append(len(x)), real(x))[1]
    stream = StreamDecoder(tok)
    out = "".join(stream.push(i) for i in ids) + stream.flush()
    assert out == real(ids) and max(decoded) <= StreamDecoder.MAX_TAIL + 1


def test_top_p_drops_a_token_once_those_above_it_cover_top_p_exactly():
    # four equal tokens (0.25 each, exactly): the two best already cover 0.5, so the smallest set is two tokens
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(1, 4)
    drawn = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(400)}
    assert len(drawn) == 2
    drawn = {sample_next(logits, 1.0, top_p=0.75, generator=g).item() for _ in range(400)}
    assert len(drawn) == 3
    # the best token always stays, even at top_p 0
    assert {sample_next(torch.tensor([[0.0, 2.0, 1.0]]), 1.0, top_p=0.0, generator=g).item() for _ in range(50)} == {1}
    assert len({sample_next(logits, 1.0, top_p=0.0, generator=g).item() for _ in range(50)}) == 1
