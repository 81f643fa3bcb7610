"""generate.py, the script: the seed and the procedure commands, prompts from a file or a terminal, safe loading, and
bad files, flags and prompts refused with one line before any work. The decoding itself: test_sampling.py."""
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import RARE
from trm.checkpoint import load_model
from trm.sampling import generate, prompt_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

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


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, tokenizer, _ = load_model(tiny_checkpoint)
    return model, tokenizer


def test_halting_from_the_command_line(halting_checkpoint, tiny_checkpoint):
    r = run_generate("--model_path", halting_checkpoint, "--prompt", "猫は", "--max_new_tokens", 20,
                     "--temperature", 0, "--halt_threshold", 0.5)
    assert r.returncode == 0, r.stderr
    assert "adaptive: halting at p > 0.5" in r.stderr and "supervision rounds per token" in r.stderr
    assert_refused(run_generate("--model_path", tiny_checkpoint, "--prompt", "猫", "--halt_threshold", 0.5),
                   "halting head")
    assert_refused(run_generate("--model_path", halting_checkpoint, "--prompt", "猫", "--halt_threshold", 1.5),
                   "--halt_threshold")


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
def test_a_prompt_file_with_a_byte_order_mark_gives_the_prompt_without_it(tiny_checkpoint, tmp_path):
    # Notepad and other Windows editors begin UTF-8 files with U+FEFF: three bytes the model must not see
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("猫は\n", encoding="utf-8")
    marked.write_text("猫は\n", encoding="utf-8-sig")
    out = [run_generate("--model_path", tiny_checkpoint, "--prompt_file", f, "--max_new_tokens", 5, "--temperature", 0)
           for f in (plain, marked)]
    assert all(r.returncode == 0 for r in out), out[1].stderr
    assert out[0].stdout == out[1].stdout and "\ufeff" not in out[1].stdout
    assert re.search(r"prompt \d+ tokens", out[0].stderr)[0] == re.search(r"prompt \d+ tokens", out[1].stderr)[0]


def test_a_save_dir_stands_for_its_best_checkpoint(tiny_checkpoint, tmp_path):
    # as export.py takes it: the folder a user trained into, best.pt if there is one, else the newest checkpoint
    save = tmp_path / "checkpoints_new"
    save.mkdir()
    shutil.copy(tiny_checkpoint, save / "step_7.pt")
    shutil.copy(tiny_checkpoint, save / "step_3.pt")
    r = run_generate("--model_path", save, "--prompt", "猫は", "--max_new_tokens", 2)
    assert r.returncode == 0 and f"note: {save} is a save dir: loading {save / 'step_7.pt'}" in r.stderr, r.stderr
    shutil.copy(tiny_checkpoint, save / "best.pt")
    r = run_generate("--model_path", save, "--prompt", "猫は", "--max_new_tokens", 2)
    assert r.returncode == 0 and f"loading {save / 'best.pt'}" in r.stderr, r.stderr


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
    assert r.stdout.startswith("猫は"), r.stdout  # piped prompts: stdout holds the text alone, no "> " prompts
    # a file from Windows piped in (a BOM, CRLF): the same prompt tokens as typed
    r = run_generate("--model_path", tiny_checkpoint, "--max_new_tokens", 2, "--temperature", 0,
                     stdin="\ufeff猫は\r\n猫は\n")
    assert r.returncode == 0, r.stderr
    lengths = re.findall(r"prompt (\d+) tokens", r.stderr)
    assert len(lengths) == 2 and lengths[0] == lengths[1], r.stderr
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
    # a pickle's first opcode with a protocol torch warns about, then noise (seeded: CI must not depend on luck)
    rand.write_bytes(b"\x80\x66" + random.Random(1).randbytes(4094))
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
