"""Behaviour of trm/sampling.py and generate.py: cached = uncached, safe loading, streaming, EOS, the seed command."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import RARE
from trm.checkpoint import load_model
from trm.sampling import StreamDecoder, generate, generate_batch, prompt_ids, sample_next
from trm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "猫は" + RARE + "を見る"  # byte-fallback tokens in the middle: tokens that split characters


def run_generate(*args, stdin=None):
    # one thread: the test machine is small and shared; batch-1 decoding does not use more
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def assert_refused(result, *words):
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny batch-1 models: more threads only add synchronization (and the test machine is small and shared)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="module")
def halting_checkpoint(tmp_path_factory, tiny_sp_model):
    """A tiny TRM with a halting head that says "stop" for about half the tokens after round 1."""
    from conftest import make_checkpoint
    path = tmp_path_factory.mktemp("halt") / "final_step_0.pt"
    model = make_checkpoint(path, Tokenizer.from_args("sentencepiece", tiny_sp_model), halt_head=True,
                            supervision_steps=3)
    with torch.no_grad():
        model.halt.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
        q = model.halt(next(model.rounds(torch.arange(4, 68).view(1, -1)))).flatten()
        model.halt.bias.fill_(-q.median())
    state = torch.load(path, weights_only=True)
    state["model"] = state["ema"]["model"] = model.state_dict()
    from trm.checkpoint import save_checkpoint
    save_checkpoint(state, str(path))
    return str(path)


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


def test_halting_from_the_command_line(halting_checkpoint, tiny_checkpoint):
    r = run_generate("--model_path", halting_checkpoint, "--prompt", "猫は", "--max_new_tokens", 20,
                     "--temperature", 0, "--halt_threshold", 0.5)
    assert r.returncode == 0, r.stderr
    assert "adaptive: halting at p > 0.5" in r.stderr and "supervision rounds per token" in r.stderr
    assert_refused(run_generate("--model_path", tiny_checkpoint, "--prompt", "猫", "--halt_threshold", 0.5),
                   "halting head")
    assert_refused(run_generate("--model_path", halting_checkpoint, "--prompt", "猫", "--halt_threshold", 1.5),
                   "--halt_threshold")


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


# ---- generate.py --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_seed_command_streams_the_greedy_continuation(tiny, tiny_checkpoint, tiny_sp_model):
    model, tok = tiny
    r = run_generate("--model_path", tiny_checkpoint, "--sp_model", tiny_sp_model, "--prompt", PROMPT,
                     "--max_new_tokens", 100, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    ids = prompt_ids(tok, PROMPT)  # generate.py starts from BOS, as training documents do
    out = list(generate(model, ids, 100, temperature=0, repetition_penalty=1.1, eos_id=tok.eos_id))
    expected = PROMPT + tok.decode(ids + out)[len(tok.decode(ids)):] + "\n"
    assert r.stdout == expected
    assert "generated 100 tokens" in r.stderr and "tokens/s" in r.stderr
    # --no_cache recomputes and must print exactly the same
    r2 = run_generate("--model_path", tiny_checkpoint, "--prompt", PROMPT, "--max_new_tokens", 100,
                      "--temperature", 0, "--no_cache", "--supervision_steps", 1)
    r3 = run_generate("--model_path", tiny_checkpoint, "--prompt", PROMPT, "--max_new_tokens", 100,
                      "--temperature", 0, "--supervision_steps", 1)
    assert r2.returncode == r3.returncode == 0
    assert r2.stdout == r3.stdout and r2.stdout.startswith(PROMPT)
    # --compile is for CUDA-graph steps; on a CPU it says so and decodes as before
    r4 = run_generate("--model_path", tiny_checkpoint, "--prompt", PROMPT, "--max_new_tokens", 100,
                      "--temperature", 0, "--supervision_steps", 1, "--compile", "--device", "cpu")
    assert r4.returncode == 0 and r4.stdout == r3.stdout
    assert "--compile applies to the CUDA-graph decoding steps" in r4.stderr


def test_procedure_command_as_written(tiny_checkpoint, tiny_sp_model):
    # sampling defaults (temperature 0.8, top_k 50, top_p 0.95, repetition penalty 1.1)
    r = run_generate("--model_path", tiny_checkpoint, "--sp_model", tiny_sp_model, "--prompt", "日本語のプロンプト",
                     "--max_new_tokens", 100)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("日本語のプロンプト") and len(r.stdout) > len("日本語のプロンプト") + 10
    assert "tokens/s" in r.stderr


@pytest.mark.slow
def test_prompt_file_interactive_and_empty_prompt(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("猫は\n\n東京\n", encoding="utf-8")
    r = run_generate("--model_path", tiny_checkpoint, "--prompt_file", prompts, "--num_samples", 2,
                     "--max_new_tokens", 5, "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("[sample ") == 4  # blank line skipped
    # interactive: an empty line samples from BOS, 'exit' quits
    r = run_generate("--model_path", tiny_checkpoint, "--max_new_tokens", 5, stdin="猫は\n\nexit\n東京\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("[sample ") == 2
    r = run_generate("--model_path", tiny_checkpoint, "--prompt", "", "--max_new_tokens", 5, "--temperature", 0)
    assert r.returncode == 0 and "prompt 1 tokens, generated 5 tokens" in r.stderr, r.stderr


class Payload:
    """Unpickling this calls open(path, 'w'): the file appears only if the loader executes pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_checkpoint_is_refused_without_running_its_payload(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    bad = tmp_path / "evil.pt"
    torch.save({"format": "generative-trm", "version": 1, "config": {}, "model": Payload(str(sentinel))}, bad)
    # the payload is real: full pickle would run it
    torch.load(bad, weights_only=False)
    assert sentinel.exists()
    sentinel.unlink()
    r = run_generate("--model_path", bad, "--prompt", "猫")
    assert_refused(r, "evil.pt", "run code")
    assert not sentinel.exists()


@pytest.mark.slow
def test_bad_files_are_refused_with_one_line(tmp_path):
    rand = tmp_path / "random.pt"
    rand.write_bytes(os.urandom(4096))
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, plain)
    text = tmp_path / "notes.pt"
    text.write_text("hello world\n")
    assert_refused(run_generate("--model_path", tmp_path / "missing.pt", "--prompt", "猫"), "not found")
    assert_refused(run_generate("--model_path", rand, "--prompt", "猫"), "random.pt")
    assert_refused(run_generate("--model_path", plain, "--prompt", "猫"), "not a checkpoint of this project")
    assert_refused(run_generate("--model_path", text, "--prompt", "猫"), "notes.pt")


@pytest.mark.slow
def test_sp_model_mismatch_is_refused(tiny_checkpoint, tmp_path):
    import io

    import sentencepiece as spm

    from conftest import japanese_lines
    from trm.tokenizer import SPM_SPECIAL_IDS

    other = tmp_path / "other.model"
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(japanese_lines(seed=1)), model_writer=proto, vocab_size=350,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   add_dummy_prefix=False, minloglevel=2, **SPM_SPECIAL_IDS)
    other.write_bytes(proto.getvalue())
    assert_refused(run_generate("--model_path", tiny_checkpoint, "--sp_model", other, "--prompt", "猫"),
                   "other.model", "vocabulary")
    assert_refused(run_generate("--model_path", tiny_checkpoint, "--sp_model", tmp_path / "nope.model",
                                "--prompt", "猫"), "nope.model")


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


# ---- generate.py: flags and prompts checked before any work --------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "1e-45"), ("--temperature", "-1"),
                                        ("--repetition_penalty", "nan"), ("--repetition_penalty", "0"),
                                        ("--top_p", "nan"), ("--top_p", "1.5"), ("--max_new_tokens", "-1"),
                                        ("--num_samples", "0"), ("--halt_threshold", "nan"), ("--seed", "-1"),
                                        ("--batch_size", "0")])
def test_numbers_out_of_range_are_refused_with_the_range(tiny_checkpoint, flag, value):
    r = run_generate("--model_path", tiny_checkpoint, "--prompt", "猫", flag, value)
    assert_refused(r, flag, "between", value)


def test_prompt_with_bytes_that_are_not_utf8_is_one_sentence(tiny_checkpoint):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the terminal sent Latin-1 or a cut UTF-8 sequence: Python hands the byte over as the lone surrogate \udce3
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_path", tiny_checkpoint,
                        "--prompt", "猫\udce3", "--max_new_tokens", "3"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert_refused(r, "--prompt", "UTF-8", "0xe3", "character 2")
    # typed interactively: that line is refused, the session goes on
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_path", tiny_checkpoint,
                        "--max_new_tokens", "3", "--temperature", "0"], input=b"\xe3\x81\n" + "猫は\nexit\n".encode(),
                       capture_output=True, env=env, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "error: that line is not valid UTF-8" in err and err.count("[sample ") == 1


def test_help_shows_each_default_once_and_ends_with_an_example():
    r = run_generate("--help")
    assert r.returncode == 0
    blocks, name = {}, None
    for line in r.stdout.split("options:")[1].split("\n\n")[0].splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif name:
            blocks[name] += " " + line.strip()
    assert all(text.count("default") <= 1 for text in blocks.values())
    for flag in ["--max_new_tokens", "--temperature", "--top_k", "--top_p", "--repetition_penalty", "--num_samples",
                 "--weights", "--device", "--seed"]:
        assert blocks[flag].count("default") == 1, blocks[flag]
    tail = r.stdout.rstrip("\n").splitlines()
    assert tail[-2] == "example:" and tail[-1].startswith("  python generate.py --model_path ")


def test_prompt_file_batches_equal_lengths_and_keeps_the_input_order(tiny, tiny_checkpoint, tmp_path):
    model, tok = tiny
    prompts = ["猫は", "東京の天気", "犬が", "東京", "山へ行く", "先生が話す", "大阪"]
    lengths = [len(prompt_ids(tok, p)) for p in prompts]
    # batches of 2 rows at most: 猫は+東京 and 東京の天気+先生が話す (each printed after rows decoded later), the rest
    # alone and streamed, 大阪 after the rows that come before it, though its length was batched first
    assert lengths == [2, 4, 5, 2, 9, 4, 2]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    r = run_generate("--model_path", tiny_checkpoint, "--prompt_file", path, "--max_new_tokens", 30,
                     "--temperature", 0, "--repetition_penalty", 2.0, "--batch_size", 2)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("[batch of 2]") == 2 and r.stderr.count("[sample ") == len(prompts)
    expected = ""
    for p in prompts:  # one by one, as generate.py decoded them before batching
        ids = prompt_ids(tok, p)
        out = list(generate(model, ids, 30, temperature=0, repetition_penalty=2.0, eos_id=tok.eos_id))
        expected += p + tok.decode(ids + out)[len(tok.decode(ids)):] + "\n"
    assert r.stdout == expected


def test_a_prompt_file_of_blank_lines_is_one_line(tiny_checkpoint, tmp_path):
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n  \n\r\n", encoding="utf-8")
    r = run_generate("--model_path", tiny_checkpoint, "--prompt_file", blank)
    assert_refused(r)
    assert "--prompt_file" in r.stderr and "no prompt" in r.stderr


def test_a_missing_sp_model_names_no_flag_this_script_lacks(tiny_checkpoint, tmp_path):
    r = run_generate("--model_path", tiny_checkpoint, "--sp_model", tmp_path / "nope.model", "--prompt", "猫")
    assert_refused(r, "nope.model", "leave --sp_model out")
    assert "--tokenizer" not in r.stderr  # generate.py has no such flag


def test_a_terminal_without_some_character_gets_a_replacement_not_a_traceback(tiny_checkpoint):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_path", tiny_checkpoint,
                        "--prompt", "😀猫", "--max_new_tokens", "5", "--seed", "1"], capture_output=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="cp932"), timeout=120)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode("cp932", "replace")
    assert r.stdout.decode("cp932").startswith("?猫")  # cp932 has no emoji


# The CPU allocator's failure (a RuntimeError, not MemoryError) as the first batched decoding step meets it
NO_MEMORY = """
import runpy, sys
import trm.sampling
def generate_batch(*a, **k):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)")
    yield
trm.sampling.generate_batch = generate_batch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_out_of_memory_names_the_flag_to_lower(tiny_checkpoint):
    r = subprocess.run([sys.executable, "-c", NO_MEMORY, os.path.join(ROOT, "generate.py"), "--model_path",
                        tiny_checkpoint, "--prompt", "猫", "--num_samples", "10000", "--batch_size", "10000"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    from conftest import assert_one_line_error
    line = assert_one_line_error(r, code=2)
    assert "out of memory" in line and "21.5 GB" in line and "--batch_size (now 10,000" in line, line
