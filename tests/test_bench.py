"""bench/: the scripts that print BENCHMARKS.md's figures refuse bad arguments with one line, and keep their scratch
apart from the user's files and from another corpus's. (bench/race.py has tests/test_race.py.)"""
import gzip
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]


def bench(script, *argv, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, argv)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_train_speed_refuses_bad_arguments_in_one_line(corpus, tmp_path):
    # each was a traceback (a missing folder, an unknown --configs name, a missing --sp_model after every run had
    # failed), or a table row of "0" tokens/s (--steps under two log windows: the only one is left out)
    data = Path(corpus["train_0"]).parent
    assert_one_line_error(bench("train_speed.py", "--data", tmp_path / "none"), "is not a folder", code=2)
    (tmp_path / "train_texts.txt").write_text("step 1's output, not a shard\n")
    assert_one_line_error(bench("train_speed.py", "--data", tmp_path), "no training shards", code=2)
    assert_one_line_error(bench("train_speed.py", "--data", data, "--sp_model", tmp_path / "none.model"),
                          "SentencePiece model not found", code=2)
    for argv, words in ((["--configs", "seed b8"], "invalid choice: 'seed b8'"), (["--steps", "10"], "at least 20")):
        r = bench("train_speed.py", "--data", data, *argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr.splitlines()[-1], r.stderr


def test_token_cache_refuses_bad_folders_and_keeps_what_work_held(corpus, tiny_sp_model, tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "train_texts.txt").write_text("step 1's output, not a shard\n")
    assert_one_line_error(bench("token_cache.py", "--data_dir", tmp_path / "none", "--sp_model", tiny_sp_model),
                          "is not a folder")
    assert_one_line_error(bench("token_cache.py", "--data_dir", tmp_path / "texts", "--sp_model", tiny_sp_model),
                          "no train_N corpus files")
    # --work named a folder that it then emptied with rmtree, whatever it held
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine\n")
    r = bench("token_cache.py", "--data_dir", Path(corpus["train_0"]).parent, "--sp_model", tiny_sp_model,
              "--threads", 1, "--work", work)
    assert r.returncode == 0, r.stderr
    assert "| jsonl.gz | " in r.stdout
    assert [p.name for p in work.iterdir()] == ["notes.txt"] and (work / "notes.txt").read_text() == "mine\n"


def test_extract_speed_cuts_each_corpus_into_its_own_short_documents(tmp_path):
    # the short documents were kept by file name alone: a second corpus's train_0.jsonl.gz was timed on the first's
    spec = importlib.util.spec_from_file_location("extract_speed", ROOT / "bench" / "extract_speed.py")
    extract_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract_speed)
    texts = {}
    for corpus, word in (("a", "猫"), ("b", "犬")):
        (tmp_path / corpus).mkdir()
        with gzip.open(tmp_path / corpus / "train_0.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(json.dumps({"text": word * 450}, ensure_ascii=False) + "\n")
        [short] = extract_speed.make_short_docs([str(tmp_path / corpus / "train_0.jsonl.gz")], tmp_path / "short")
        with gzip.open(short, "rt", encoding="utf-8") as f:
            texts[corpus] = [json.loads(line)["text"] for line in f]
    assert texts == {"a": ["猫" * 200, "猫" * 200, "猫" * 50], "b": ["犬" * 200, "犬" * 200, "犬" * 50]}
    r = bench("extract_speed.py", "--corpus", tmp_path / "none")
    assert r.returncode == 1 and r.stderr.strip() == f"error: --corpus {tmp_path / 'none'} is not a folder"


def test_depth_and_generate_speed_refuse_bad_arguments_in_one_line(corpus, tiny_checkpoint, tmp_path):
    valid = corpus["validation_0"]
    assert_one_line_error(bench("depth.py", "--data", tmp_path / "none.jsonl.gz", "--checkpoints",
                                f"a={tiny_checkpoint}", "--plot", tmp_path / "d.png"), "--data file not found")
    assert_one_line_error(bench("depth.py", "--data", valid, "--checkpoints", f"a={tmp_path / 'none.pt'}",
                                "--plot", tmp_path / "d.png"), "checkpoint not found")
    # an unknown mode ran uncached under its own name; thresholds on a model without a halting head, a traceback
    r = bench("generate_speed.py", "--modes", "cache,nocache")
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith("got 'nocache'"), r.stderr
    assert_one_line_error(bench("generate_speed.py", "--checkpoint", tiny_checkpoint, "--halt_thresholds", "0.5"),
                          "halting head")


def test_op_count_counts_each_layers_matmuls_and_the_adapters_merges():
    # a GPT block runs 4 matmuls forward (qkv, proj, gate_up, down) and 8 backward (the input's and the weight's
    # gradients): 12 a layer, the head's 3 once. Adapters merged a pass at a time (many rows) add one batched product
    # a matrix for all the calls and its two gradients, however many calls there are (call by call it was 3 a matrix
    # and call that backpropagates and 1 a call that does not: 64 here)
    tiny = "--d_model 32 --n_heads 2 --tie_embeddings"
    trm = f"{tiny} --latent_steps 1 --supervision_steps 1 --grad_deep_steps 1"  # 4 calls: 2 without gradients
    r = bench("op_count.py", "--batch_size", 2, "--max_seq_len", 256, "--vocab_size", 64,
              "--run", f"gpt2=--arch gpt --n_layers 2 {tiny}", "--run", f"gpt4=--arch gpt --n_layers 4 {tiny}",
              "--run", f"trm={trm}", "--run", f"trm_ad2={trm} --adapter_rank 2")
    assert r.returncode == 0, r.stderr
    mm = {line.split(" | ")[0][2:]: int(line.split(" | ")[1]) for line in r.stdout.splitlines()
          if line.startswith("| ") and not line.startswith(("| run", "|---"))}
    assert mm["gpt4"] - mm["gpt2"] == 2 * 12
    assert mm["trm_ad2"] - mm["trm"] == 2 * 4 * 3  # 2 layers x 4 matrices x (the merge and its two gradients)
    assert_one_line_error(bench("op_count.py", "--run", "nameless"), "give NAME=FLAGS", code=1)


def test_step_profile_times_each_phase_on_the_cpu_and_refuses_what_needs_cuda():
    tiny = ["--d_model", 32, "--n_heads", 2, "--vocab_size", 64, "--max_seq_len", 32, "--steps", 2]
    r = bench("step_profile.py", *tiny)
    assert r.returncode == 0, r.stderr
    phases = [line.split()[0] for line in r.stdout.splitlines() if line.split() and line.split()[0] in
              ("forward", "backward", "optimizer", "ema")]
    assert phases == ["forward", "backward", "optimizer", "ema"] and "whole step, no sync inside" in r.stdout
    # the equal-compute pair's flags reach the model and Muon (half the deep steps: fewer FLOPs a token)
    mflop = lambda out: float(re.search(r"([0-9.]+) MFLOP/token", out).group(1))  # noqa: E731
    half = bench("step_profile.py", *tiny, "--deep_steps", 1, "--optimizer", "muon", "--muon_ns_steps", 3)
    assert half.returncode == 0, half.stderr
    assert mflop(half.stdout) < mflop(r.stdout) and "muon (3 Newton-Schulz iterations)" in half.stdout
    for flags, words in ((["--overlap_eval"], "second CUDA stream"), (["--whole_graph"], "needs a CUDA device"),
                         (["--whole_graph", "--optimizer", "muon", "--compile", "on"], "needs a CUDA device"),
                         (["--whole_graph", "--optimizer", "muon"], "takes --compile on"),
                         (["--optimizer", "muon", "--muon_ns_steps", 0], "--muon_ns_steps must be at least 1"),
                         (["--deep_steps", 0], "deep_steps"),
                         (["--background_compile"], "beside the replays of --whole_graph"),
                         (["--background_compile", "--whole_graph"], "needs a CUDA device"),
                         (["--switch_interval", -1], "number of seconds")):
        assert_one_line_error(bench("step_profile.py", *tiny, *flags), words, code=1)


def test_eval_speed_times_the_evaluation_eager_and_compiled_by_regions():
    tiny = ["--d_model", 32, "--n_heads", 2, "--vocab_size", 64, "--max_seq_len", 16, "--windows", 8,
            "--batch_sizes", 4, "--reps", 1]
    for flags, how in (([], "eager"), (["--compiled_blocks"], "eager, its blocks compiled"),
                       (["--compiled_blocks", "--compiled_head"], "eager, its blocks and the head's loss compiled")):
        r = bench("eval_speed.py", *tiny, *flags)
        assert r.returncode == 0, r.stderr
        rows = [line for line in r.stdout.splitlines() if line.startswith("| 4 |")]
        assert f"at a time, {how}" in r.stdout and len(rows) == 1, r.stdout
    assert_one_line_error(bench("eval_speed.py", *tiny, "--compiled", "--compiled_blocks"), "pick one", code=1)
    assert_one_line_error(bench("eval_speed.py", *tiny, "--compiled", "--compiled_head"), "already compiles", code=1)
