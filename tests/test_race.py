"""bench/race.py: race.png drawn from fake results (one line per run, bits/byte against minutes and against tokens),
and one whole race of two tiny models on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def fake_run(out, name, evals, train_lines=2, tokens_per_eval=None):
    """A save dir as the trainer leaves it: metrics.jsonl with train entries and (seconds, bits/byte) evaluations,
    the i-th after i x tokens_per_eval training tokens (none counted: the metrics of an older trainer)."""
    (out / name).mkdir(parents=True)
    entries = [{"step": i, "kind": "train", "loss": 3.0, "train_seconds": 10.0 * i, "tok_s": 1e6 * i}
               for i in range(1, train_lines + 1)]
    entries += [{"step": 100 * i, "kind": "eval", "loss": 2.0, "bits_per_byte": bpb, "train_seconds": seconds,
                 **({"tokens_seen": i * tokens_per_eval} if tokens_per_eval else {})}
                for i, (seconds, bpb) in enumerate(evals, 1)]
    (out / name / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_plot_only_draws_one_line_per_run_from_their_metrics(tmp_path):
    out = tmp_path / "race_out"
    fake_run(out, "trm", [(30, 1.60), (60, 1.45), (120, 1.38)], train_lines=5)
    fake_run(out, "gpt12", [(45, 1.55), (118.8, 1.35)])
    fake_run(out, "crashed", [])  # died before its first evaluation
    fake_run(out, "_prep", [(1, 9.0)])  # the token-cache run, not a contestant
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--plot_only", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == ["race.png: crashed: no evaluation with train_seconds in " + str(out / "crashed/metrics.jsonl"),
                     # tokens/s: the median and range of the log windows after the first (which compiles); then
                     # the latest evaluation at or before each whole minute, for comparisons at equal wall-clock
                     "race.png: gpt12: 2 evaluations, 1.3500 bits/byte at 1.98 min (best 1.3500 at 1.98 min), "
                     "2.00M tokens/s (2.00-2.00M); "
                     "at 1 / 2 min: 1.5500 / 1.3500",
                     "race.png: trm: 3 evaluations, 1.3800 bits/byte at 2.00 min (best 1.3800 at 2.00 min), "
                     "3.50M tokens/s (2.00-5.00M); "
                     "at 1 / 2 min: 1.4500 / 1.3800"]
    assert (out / "race.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_cut_short_is_compared_only_at_the_minutes_it_reached(tmp_path):
    # the device budget ended a 5-minute run at 4.85 training minutes: minutes 1-4 are comparable, minute 5 is not
    out = tmp_path / "race_out"
    fake_run(out, "cut", [(50, 1.30), (110, 1.20), (170, 1.16), (235, 1.149), (291, 1.141)])
    fake_run(out, "late", [(70, 1.40), (130, 1.25)])  # no evaluation in its first minute
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--plot_only", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cut, late = r.stdout.splitlines()
    assert cut.endswith("at 1 / 2 / 3 / 4 min: 1.3000 / 1.2000 / 1.1600 / 1.1490") and "1.1410 bits/byte at 4.85" in cut
    assert late.endswith("at 1 / 2 min: - / 1.4000")


def test_only_the_last_minute_gets_the_margin(tmp_path):
    # an evaluation 2 s past minute 1 is not minute 1's: only the budget's own end, a moment early, gets 3 s
    out = tmp_path / "race_out"
    fake_run(out, "run", [(58, 1.50), (62, 1.40), (121.5, 1.30)])
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--plot_only", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].endswith("at 1 / 2 min: 1.5000 / 1.3000")


def test_the_best_along_a_run_is_at_its_full_depth(tmp_path):
    # --depth_warmup scores its shallow start as it trains it; those scores are another model's, never the best
    out = tmp_path / "race_out"
    fake_run(out, "dw", [(30, 1.20), (60, 1.10), (120, 1.30), (180, 1.25)])
    entries = [json.loads(line) for line in (out / "dw" / "metrics.jsonl").read_text().splitlines()]
    for e in entries[2:4]:  # the first two evaluations
        e["eval_depth"] = {"deep_steps": 1}
    (out / "dw" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--plot_only", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line, note = r.stdout.splitlines()[:2]
    assert "1.2500 bits/byte at 3.00 min (best 1.2500 at 3.00 min)" in line
    assert note == ("race.png: dw: 2 of its evaluations score the depth warm-up's shallow model "
                    "({'deep_steps': 1}), not the full one")
    # shallow scores after a full-depth one (a resume that moved the run back into its warm-up), and a run with no
    # full-depth score at all, are drawn and named without a crash
    for e in entries[2:]:
        e.pop("eval_depth", None)
    entries[4]["eval_depth"] = {"deep_steps": 1}
    (out / "dw" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    fake_run(out, "all_shallow", [(30, 1.5)])
    path = out / "all_shallow" / "metrics.jsonl"
    path.write_text(path.read_text().replace('"kind": "eval"', '"kind": "eval", "eval_depth": {"deep_steps": 1}'))
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--plot_only", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("race.png: all_shallow: 1 evaluations, 1.5000 bits/byte at 0.50 min, ")
    assert "1 of its evaluations score" in lines[1] and "1 of its evaluations score" in lines[3]


def test_plot_only_without_results_says_so(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--plot_only", "--out", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not a folder of race runs" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--run, --data_dir and --sp_model are required" in r.stderr


def test_bad_arguments_are_one_line_before_any_work(corpus, tmp_path):
    # a missing --data_dir ended in a FileNotFoundError traceback; a --run without "=" in a ValueError; a name with a
    # "/" killed its worker thread at its log file, so that run and every run queued after it never raced
    data = str(Path(corpus["train_0"]).parent)
    for run, data_dir, words in (("a=--lr 1e-3", str(tmp_path / "none"), "is not a folder"),
                                 ("trm", data, "give NAME=FLAGS"),
                                 ("a/b=--lr 1e-3", data, "give NAME=FLAGS"),
                                 ('a=--lr "1e-3', data, "do not parse")):
        r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--run", run, "--data_dir", data_dir,
                            "--sp_model", "unused.model", "--out", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: ") and words in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        assert not (tmp_path / "out" / "token_cache").exists()  # refused before the token cache


def test_runs_are_also_compared_at_equal_tokens_up_to_the_shortest_run(tmp_path):
    # a slow model that is better per token, against a fast one: level at 2 minutes, apart at equal tokens
    out = tmp_path / "race_out"
    fake_run(out, "slow", [(30, 1.50), (60, 1.40), (90, 1.30), (120, 1.25)], tokens_per_eval=10_000_000)
    fake_run(out, "fast", [(15 * i, 1.65 - 0.05 * i) for i in range(1, 9)], tokens_per_eval=10_000_000)  # 2x tok/s
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--plot_only", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fast_time, fast_tokens, slow_time, slow_tokens = r.stdout.splitlines()
    assert slow_time.endswith("at 1 / 2 min: 1.4000 / 1.2500") and fast_time.endswith("at 1 / 2 min: 1.4500 / 1.2500")
    # the marks are 1/8, 1/4, 1/2 and all of the 40M tokens the slow run saw; each run's latest evaluation at or
    # before a mark, "-" before its first
    assert slow_tokens == "race.png: slow: at 5M / 10M / 20M / 40M tokens: - / 1.5000 / 1.4000 / 1.2500"
    assert fast_tokens == "race.png: fast: at 5M / 10M / 20M / 40M tokens: - / 1.6000 / 1.5500 / 1.4500"


@pytest.mark.slow
def test_a_race_on_cpu_scores_every_run_and_names_the_tokenizer(corpus, tiny_sp_model, tmp_path):
    # the whole race, as on the GPU but tiny: token cache, two timed runs, their scoring, the table and race.png
    # "GPU 0" here is a stand-in nvidia-smi that reports 70, 80, 90% in turn: each row's GPU busy is their median
    out, bin_dir = tmp_path / "race", tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "smi_args"}\n'
                   'while :; do for u in 70 80 90; do echo $u; sleep 0.05; done; done\n')
    smi.chmod(0o755)
    (out / "lost.log").mkdir(parents=True)  # race.py itself fails on this run: its row says so, the next runs race
    tiny = "--d_model 32 --n_heads 2 --max_seq_len 32 --device cpu --compile off --dropout 0"
    r = subprocess.run([sys.executable, str(ROOT / "bench/race.py"), "--data_dir", str(Path(corpus["train_0"]).parent),
                        "--sp_model", tiny_sp_model, "--minutes", "0.03", "--out", str(out), "--no_warm",
                        "--no_depth", "--eval_tokens", "2000", "--gpus", "0",
                        "--common", "--batch_size 4 --eval_every 20 --log_every 5 --eval_tokens 256 --warmup_steps 5",
                        "--run", f"lost={tiny}", "--run", f"trm={tiny}",
                        "--run", f"gpt=--arch gpt --n_layers 2 {tiny}", "--run", f"bad={tiny} --depth_warmup 1.5"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads((out / "race.json").read_text())}
    assert set(rows) == {"trm", "gpt", "bad", "lost"}
    assert rows.pop("lost")["error"].startswith("race.py: IsADirectoryError")
    # a run that fails says why in its row: the trainer's error line, from its start
    bad = rows.pop("bad")
    assert bad["rc"] == 2 and bad["error"].startswith("error: ") and "--depth_warmup" in bad["error"], bad
    assert any(line.startswith("| bad | failed: 'error: ") for line in r.stdout.splitlines()), r.stdout
    fingerprint = Tokenizer.from_args("sentencepiece", tiny_sp_model).fingerprint()
    for name, row in rows.items():
        assert row["rc"] == 0 and row["steps"] > 0 and row.get("error") is None, row
        assert 0 < row["bpb"] < 16 and 0 < row["bpb_best"] < 16, row
        assert row["tokenizer"] == fingerprint
        assert row["gpu_util"] == 80, row
        assert any(line.startswith(f"| {name} | ") and " | 80% | " in line for line in r.stdout.splitlines())
    # one sampler a run that started (not "lost"), on the run's GPU, once a second
    assert (tmp_path / "smi_args").read_text().splitlines() == 3 * [
        "--query-gpu=utilization.gpu --format=csv,noheader,nounits -i 0 -l 1"]
    assert r.stdout.rstrip().endswith(f"tokenizer fingerprint: {fingerprint}")
    # the header names the tokens scored, not --eval_tokens: the tiny validation file holds fewer than 2,000
    scored = {row["scored_tokens"] for row in rows.values()}
    assert len(scored) == 1 and 0 < min(scored) < 2000
    assert f"({min(scored):,} tokens scored, --eval_tokens 2,000; EMA)" in r.stdout
    assert (out / "race.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # best.pt's score is its own, whether race.py scored it or reused the final one's (the same weights)
    for name, row in rows.items():
        own = subprocess.run([sys.executable, "-m", "trm.evaluate", "--model_path", str(out / name / "best.pt"),
                              "--data", corpus["validation_0"], "--eval_tokens", "2000", "--device", "cpu"],
                             capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert own.returncode == 0, own.stderr
        assert row["bpb_best"] == json.loads(own.stdout.splitlines()[-1])["bits_per_byte"], (name, row)
        assert isinstance(row["best_is_final"], bool) and row["best_is_final"] == (row["bpb_best"] == row["bpb"])
