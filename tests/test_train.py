"""train_trm_lm.py end to end on CPU: outputs, exact resume, interruption, damaged checkpoints, DDP on gloo, and the
defaults of a user's own run. Failures and the messages they give: test_train_failures.py."""
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, training_dtypes, without_packages
from trainer_run import (ROOT, TINY, copy_run_until, endless_trainer, logged, logged_losses, params, run_in_process,
                         train)
from trm.checkpoint import load_checkpoint, save_checkpoint
from trm.metrics import tensorboard_missing
from trm.schedule import lr_at
from trm.tokenizer import Tokenizer


@pytest.mark.slow
def test_smoke_run_writes_checkpoints_metrics_and_curves(corpus, tmp_path):
    save = tmp_path / "ck"
    tensorboard = ["--tensorboard", str(tmp_path / "tb")] if tensorboard_missing() is None else []
    r = train(corpus, save, "--max_steps", "12", "--eval_every", "6", "--log_every", "3", *tensorboard)
    names = sorted(os.listdir(save))
    assert {"step_6.pt", "final_step_12.pt", "metrics.jsonl", "training_curves.png"} <= set(names)
    state = load_checkpoint(save / "final_step_12.pt")  # weights_only=True inside
    for key in ("config", "model", "ema", "optimizer", "step", "tokens_seen", "loader", "rng", "args", "tokenizer"):
        assert key in state, key
    assert state["step"] == 12 and state["tokens_seen"] == 12 * 4 * 32
    assert state["args"]["d_model"] == 32
    # the log names the exact vocabulary, so runs on two draws of one tokenizer are told apart (BENCHMARKS.md)
    tok = Tokenizer.from_state(state["tokenizer"])
    assert f"vocab {tok.vocab_size:,}, fingerprint {tok.fingerprint()}" in r.stdout
    assert [h["step"] for h in logged(save, "train")] == [3, 6, 9, 12]
    evals = logged(save, "eval")
    assert [h["step"] for h in evals] == [6, 12] and all(0 < h["bits_per_byte"] < 8 for h in evals)
    # each evaluation's own time, a part of the evaluating the summary line counts (to its one decimal)
    evaluating = float(re.search(r"([\d.]+) s evaluating", r.stdout).group(1))
    assert all(h["seconds"] > 0 for h in evals) and sum(h["seconds"] for h in evals) <= evaluating + 0.05
    assert state["metrics"]["loss"] == evals[-1]["loss"]  # the final checkpoint carries its evaluation
    # EMA differs from the raw weights and is what the evaluation used: the same windows scored again from the
    # checkpoint give the trainer's figure with the EMA weights, and another with the raw ones
    assert any(not torch.equal(a, b) for a, b in zip(state["model"].values(), state["ema"]["model"].values()))
    scores = {}
    for weights in ("ema", "raw"):
        s = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model_path", str(save / "final_step_12.pt"),
                            "--data", corpus["validation_0"], "--eval_tokens", "256", "--device", "cpu", "--weights",
                            weights], capture_output=True, text=True, timeout=120)
        assert s.returncode == 0, s.stderr
        scores[weights] = json.loads(s.stdout)["loss"]
    assert scores["ema"] == pytest.approx(evals[-1]["loss"], rel=1e-6) and scores["raw"] != pytest.approx(
        evals[-1]["loss"], rel=1e-4)
    seconds = [h["train_seconds"] for h in logged(save)]  # the x axis of bench/race.py's race.png
    assert seconds == sorted(seconds) and 0 < seconds[-1] < 300
    if tensorboard:  # the same numbers as metrics.jsonl, under train/ and eval/
        from test_metrics import f32, scalars
        got = scalars(tmp_path / "tb")
        assert got["train/loss"] == [(h["step"], f32(h["loss"])) for h in logged(save, "train")]
        assert got["eval/bits_per_byte"] == [(h["step"], f32(h["bits_per_byte"])) for h in evals]
        assert {"train/lr", "train/tok_s", "eval/loss"} <= set(got)


def test_tensorboard_without_its_package_is_one_line_before_any_work(corpus, tmp_path):
    r = train(corpus, tmp_path / "ck", "--max_steps", "2", "--tensorboard", str(tmp_path / "tb"), check=False,
              env=without_packages(tmp_path, "tensorboard"))
    assert_one_line_error(r, "--tensorboard", "pip install tensorboard", code=2)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_paper_update_rule_trains(corpus, tmp_path):
    train(corpus, tmp_path / "ck", "--max_steps", "6", "--eval_every", "6", "--log_every", "3", "--sup_update", "each")
    state = load_checkpoint(tmp_path / "ck" / "final_step_6.pt")
    assert all(v["step"].item() == 6 * 2 for v in state["optimizer"]["state"].values())  # a step per round
    assert [h["step"] for h in logged(tmp_path / "ck", "eval")] == [6] and state["metrics"]["bits_per_byte"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["mean", "each"])
def test_both_update_rules_train_in_the_precision_chosen(corpus, tmp_path, rule):
    # --dtype bf16 autocasts on CPU too: the rule that steps the optimizer between rounds must not leave autocast out
    common = [*TINY, "--train_paths", corpus["train_0"], "--valid_paths", "--max_steps", "2", "--log_every", "1",
              "--sup_update", rule, "--compile", "off"]
    dtypes, _ = training_dtypes(ROOT / "train_trm_lm.py", [*common, "--save_dir", tmp_path / "bf16", "--dtype", "bf16"],
                                tmp_path)
    assert dtypes == {"bfloat16"}
    dtypes, _ = training_dtypes(ROOT / "train_trm_lm.py", [*common, "--save_dir", tmp_path / "fp32"], tmp_path)
    assert dtypes == {"float32"}  # the CPU's default


def test_time_budget_stops_with_a_final_checkpoint_and_a_decayed_lr(corpus, tmp_path):
    save, budget = tmp_path / "ck", ["--max_steps", "1000000", "--max_minutes", "0.1", "--warmup_steps", "1",
                                     "--eval_every", "1000000", "--log_every", "1"]
    train(corpus, save, *budget)
    final = [f for f in os.listdir(save) if f.startswith("final_step_")]
    steps = int(final[0][len("final_step_"):-3])
    assert len(final) == 1 and 1 < steps < 1000000
    assert 6.0 <= load_checkpoint(save / final[0])["train_seconds"] < 60
    lrs = [h["lr"] for h in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if h["kind"] == "train"]
    # the cosine schedule ran on the clock: from the top to near its floor (10% of --lr), where steps would say top
    assert lrs[0] == 3e-3 and lrs[-1] < 0.2 * 3e-3
    # the budget counts across a resume: a spent one trains no further step, says so, and rewrites nothing
    before = (save / final[0]).stat()
    r = train(corpus, save, *budget, "--resume", "auto")
    assert "nothing to train" in r.stdout and "raise --max_minutes" in r.stdout, r.stdout
    assert [f for f in os.listdir(save) if f.startswith("final_step_")] == final
    assert (save / final[0]).stat().st_mtime_ns == before.st_mtime_ns
    assert logged(save, "train")[-1]["step"] == load_checkpoint(save / final[0])["step"] == steps


def test_the_wsd_schedule_reaches_every_step_with_its_cool_down(corpus, tmp_path):
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "12", "--warmup_steps", "2", "--eval_every", "12", "--log_every", "1",
          "--lr_schedule", "wsd", "--lr_cooldown", "0.5")
    lrs = {h["step"]: h["lr"] for h in logged(save, "train")}
    assert lrs == pytest.approx({s: lr_at(s - 1, 3e-3, 2, 12, "wsd", cooldown=0.5) for s in range(1, 13)})
    assert lrs[7] == 3e-3 and lrs[12] < 3e-3 / 4  # held to the middle of the run after warm-up, then cooling to 0
    # a resume follows its own command's schedule, and says where it differs (here: the wsd flags left out)
    r = train(corpus, save, "--max_steps", "14", "--warmup_steps", "2", "--eval_every", "12", "--log_every", "1",
              "--resume", "auto")
    line = next(x for x in r.stdout.splitlines() if "the schedule follows this command" in x)
    assert "--lr_schedule cosine (was wsd)" in line and "--lr_cooldown unset (was 0.5)" in line, line
    assert "--max_steps 14 (was 12)" in line and "--lr " not in line and "--warmup_steps" not in line, line
    again = ("--max_steps", "14", "--warmup_steps", "2", "--eval_every", "12", "--log_every", "1", "--resume", "auto")
    assert "the schedule follows" not in train(corpus, save, *again).stdout  # the same schedule: nothing to say


def test_a_finished_run_resumed_again_trains_nothing_and_rewrites_nothing(corpus, tmp_path):
    # `--resume auto` run once more after the end (a script's loop, a habit): one line, exit 0, and the final
    # checkpoint, best.pt (its hard link) and the log stay as they were; a larger --max_steps trains on from there
    save, run = tmp_path / "ck", ["--max_steps", "4", "--eval_every", "2", "--log_every", "2"]
    train(corpus, save, *run)
    final, best = save / "final_step_4.pt", save / "best.pt"

    def files():  # what each file is and when it was written (the lock is rewritten by every run that opens it)
        return {name: (st.st_ino, st.st_mtime_ns, st.st_size) for name in os.listdir(save) if name != ".lock"
                for st in [(save / name).stat()]}

    written = files()
    assert best.stat().st_ino == final.stat().st_ino  # linked, not copied (the state this must keep)
    for resume in ("auto", str(best)):  # (best.pt, the final checkpoint's link, is that checkpoint)
        r = train(corpus, save, *run, "--resume", resume)
        assert "nothing to train" in r.stdout and "step 4 (--max_steps 4)" in r.stdout, r.stdout
        assert "done:" not in r.stdout and not r.stderr
        assert files() == written
    train(corpus, save, "--max_steps", "6", "--eval_every", "2", "--log_every", "2", "--resume", "auto")
    assert (save / "final_step_6.pt").exists() and logged(save, "train")[-1]["step"] == 6


@pytest.mark.parametrize("rule", ["mean", "each"])
def test_halting_head_trains_and_reports_its_accuracy(corpus, tmp_path, rule):
    train(corpus, tmp_path / "ck", "--max_steps", "6", "--eval_every", "3", "--log_every", "3", "--act_weight", "0.5",
          "--sup_update", rule)
    assert [h["step"] for h in logged(tmp_path / "ck", "eval") if 0 <= h["halt_accuracy"] <= 1] == [3, 6]
    state = load_checkpoint(tmp_path / "ck" / "final_step_6.pt")
    assert state["config"]["halt_head"] and state["metrics"]["halt_accuracy"] > 0
    assert not torch.equal(state["model"]["halt.weight"], torch.zeros_like(state["model"]["halt.weight"]))
    train(corpus, tmp_path / "stop", "--max_steps", "4", "--eval_every", "4", "--act_weight", "0.5", "--sup_update",
          rule, "--train_halt_threshold", "0.5")
    assert "halt_accuracy" in load_checkpoint(tmp_path / "stop" / "final_step_4.pt")["metrics"]
    gpt = train(corpus, tmp_path / "gpt", "--max_steps", "2", "--arch", "gpt", "--act_weight", "0.5", check=False)
    assert_one_line_error(gpt, "--act_weight needs --arch trm", code=2)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--random_depth"], ["--random_depth", "deep"], ["--depth_warmup", "0.5"],
                                   ["--train_paths", "SMALL"]],
                         ids=["fixed_depth", "random_depth", "random_deep_steps", "depth_warmup", "across_epochs"])
def test_resume_is_bit_identical(corpus, tmp_path, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    if "SMALL" in extra:  # a corpus of a few windows: the 16 steps cross several epochs, the resume lands inside one
        small = tmp_path / "small.jsonl"
        small.write_text("".join(json.dumps({"text": f"{i}番目の短い文書です。"}, ensure_ascii=False) + "\n"
                                 for i in range(12)), encoding="utf-8")
        extra = ["--train_paths", str(small)]
    common = ["--max_steps", "16", "--eval_every", "8", "--log_every", "4", "--dropout", "0.1", *extra]
    train(corpus, straight, *common)
    if "--train_paths" in extra:
        loader = load_checkpoint(straight / "final_step_16.pt")["loader"]  # 4 windows a step
        assert loader["cursor"] == 64 > 3 * loader["n_windows"] and 8 * 4 % loader["n_windows"]  # resumed mid-epoch
    copy_run_until(straight, resumed, 8)
    train(corpus, resumed, *common, "--resume", "auto")
    a, b = straight / "final_step_16.pt", resumed / "final_step_16.pt"
    assert load_checkpoint(b)["run_id"] == load_checkpoint(resumed / "step_8.pt")["run_id"]  # resumed, not begun anew
    for key in ("model", "ema"):
        pa, pb = params(a, key), params(b, key)
        assert all(torch.equal(pa[k], pb[k]) for k in pa), key
    oa, ob = load_checkpoint(a)["optimizer"]["state"], load_checkpoint(b)["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)
    assert logged_losses(straight) == logged_losses(resumed)


def test_a_resume_from_a_save_off_a_log_step_logs_the_same_losses(corpus, tmp_path):
    # saved at step 6, logged every 4: the checkpoint cut the log's window at 2 of its 4 steps. The resumed run's
    # step-8 line averaged only steps 7 and 8; it averages 5 to 8, as the uninterrupted run's
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--max_steps", "12", "--eval_every", "100", "--log_every", "4", "--save_every", "6"]
    train(corpus, straight, *common)
    copy_run_until(straight, resumed, 6)
    train(corpus, resumed, *common, "--resume", "auto")
    assert logged_losses(straight) == logged_losses(resumed)


def test_a_checkpoint_resumed_from_another_folder_brings_its_own_curves(corpus, tmp_path):
    # the history came from whatever metrics.jsonl the new save dir held (here a run that never saved a checkpoint),
    # spliced before the resumed steps; it is the resumed checkpoint's own run's
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--max_steps", "12", "--eval_every", "100", "--log_every", "4", "--save_every", "6"]
    train(corpus, first, *common)
    second.mkdir()
    stale = [{"step": s, "kind": "train", "loss": 99.0} for s in (2, 4, 6)]
    (second / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in stale))
    train(corpus, second, *common, "--resume", str(first / "step_6.pt"))
    assert logged_losses(second) == logged_losses(first)


@pytest.mark.slow
def test_grad_accum_is_one_step_on_all_its_micro_batches(corpus, tmp_path):
    # two micro-batches of 2 windows, their losses averaged, make one optimizer step on the same 4 windows as one
    # batch of 4 (the loader's cursor runs on): the same weights up to float rounding, the same tokens counted
    common = ["--max_steps", "4", "--eval_every", "100", "--log_every", "2", "--dropout", "0"]
    runs = {name: tmp_path / name for name in ("whole", "accum", "half")}
    train(corpus, runs["whole"], *common, "--batch_size", "4")
    train(corpus, runs["accum"], *common, "--batch_size", "2", "--grad_accum", "2")
    train(corpus, runs["half"], *common, "--batch_size", "2")  # the control: half the batch, other weights
    states = {name: load_checkpoint(d / "final_step_4.pt") for name, d in runs.items()}
    assert states["whole"]["tokens_seen"] == states["accum"]["tokens_seen"] == 4 * 4 * 32
    whole, accum, half = (states[name]["model"] for name in ("whole", "accum", "half"))
    for k in whole:
        torch.testing.assert_close(accum[k], whole[k], rtol=1e-4, atol=1e-5)
    assert max((half[k] - whole[k]).abs().max().item() for k in whole) > 1e-3


@pytest.mark.slow
def test_an_ema_switched_on_at_a_resume_starts_from_the_resumed_weights(corpus, tmp_path):
    # a run trained with --ema_decay 0 and resumed with an EMA: its first average must blend the resumed weights with
    # the next step's, not the random initialization's (what evaluation, best.pt and generation then use)
    save = tmp_path / "ck"
    common = ["--eval_every", "100", "--log_every", "1", "--dropout", "0"]
    train(corpus, save, "--max_steps", "6", "--ema_decay", "0", *common)
    train(corpus, save, "--max_steps", "7", "--ema_decay", "0.995", "--resume", "auto", *common)
    w6, w7 = params(save / "final_step_6.pt"), params(save / "final_step_7.pt")
    ema = params(save / "final_step_7.pt", "ema")
    d = 2 / 11  # the EMA's warm-up decay at its first update, min(0.995, (1 + 1) / (10 + 1))
    for k in w7:
        torch.testing.assert_close(ema[k], d * w6[k] + (1 - d) * w7[k], rtol=1e-5, atol=1e-6)


def test_the_logged_mfu_counts_each_steps_own_depth(corpus, tmp_path, capsys, monkeypatch):
    # --depth_warmup runs one deep step per round for the first half: those steps cost fewer FLOPs, and MFU must say
    # so (it billed them at the full depth). MFU / tok/s is FLOPs per token / peak, whatever the machine's speed.
    import trm.metrics
    from trm.model import TRM, TRMConfig
    monkeypatch.setattr(trm.metrics, "peak_flops", lambda device: 1e6)  # a "GPU" for the CPU, so MFU is logged
    code, out, _ = run_in_process(capsys, "--train_paths", corpus["train_0"], "--valid_paths", "--save_dir",
                                  str(tmp_path / "ck"), "--max_steps", "20", "--log_every", "10", "--depth_warmup",
                                  "0.5", "--device", "cpu", "--compile", "off")
    assert code == 0, out
    windows = [re.search(r"\| ([\d,]+) tok/s \| MFU ([\d.]+)%", line) for line in out.splitlines()
               if line.startswith("step ")]
    per_token = [float(m[2]) / 100 * 1e6 / float(m[1].replace(",", "")) for m in windows]  # FLOPs per token
    config = TRMConfig(**load_checkpoint(tmp_path / "ck" / "final_step_20.pt")["config"])
    shallow, full = (TRM(config).flops_per_token(config.max_seq_len, **d) for d in ({"deep_steps": 1}, {}))
    assert shallow < full
    assert per_token[0] == pytest.approx(shallow, rel=0.01) and per_token[1] == pytest.approx(full, rel=0.01)


def test_depth_warmup_evaluates_the_depth_it_trains(corpus, tmp_path, capsys, monkeypatch):
    # On an H200 a --depth_warmup run scored at the full depth during its one-step start sat near the unigram level
    # (7.45 nats where the model it trained scored 4.26), and the collapse guard stopped that healthy run at step
    # 3,000. The evaluations must score the depth being trained, and only full-depth scores may make best.pt or be
    # held against the later ones. The stand-in evaluate scores the shallow model far better than the full depth
    # ever gets, as there: without the depth passed on, best.pt stays a shallow checkpoint and the guard stops.
    import trm.evaluate
    import trm.guard
    calls = []

    def evaluate(model, windows, token_bytes, *args, **kwargs):
        depth = {k: kwargs[k] for k in ("deep_steps", "latent_steps", "supervision_steps") if k in kwargs}
        calls.append(depth)
        loss = 0.5 if depth == {"deep_steps": 1} else 3.5 - 0.1 * len(calls)  # full depth: healthy, falling
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss, "tokens": 1, "bytes": 1}

    monkeypatch.setattr(trm.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(trm.guard, "unigram_entropy", lambda tokens, vocab_size: 5.0)
    monkeypatch.setattr(trm.guard, "MIN_TOKENS", 0)  # the guard judges from the first evaluation on
    save = tmp_path / "ck"
    code, out, err = run_in_process(capsys, "--train_paths", corpus["train_0"], "--valid_paths",
                                    corpus["validation_0"], "--save_dir", str(save), "--max_steps", "16",
                                    "--eval_every", "4", "--log_every", "4", "--warmup_steps", "0",
                                    "--depth_warmup", "0.5", "--device", "cpu", "--compile", "off")
    assert code == 0, out + err
    assert calls == [{"deep_steps": 1}, {"deep_steps": 1}, {}, {}]  # steps 4 and 8 inside the warm-up, 12 and 16
    assert [h.get("eval_depth") for h in logged(save, "eval")] == [{"deep_steps": 1}, {"deep_steps": 1}, None, None]
    assert "at 1 deep step (warm-up)" in out and "note: --depth_warmup 0.5" in out
    assert load_checkpoint(save / "best.pt")["step"] == 16  # the best full-depth score, not a shallow one
    assert "warning" not in out + err

    def run(save, *flags):
        calls.clear()
        code, out, err = run_in_process(capsys, "--train_paths", corpus["train_0"], "--valid_paths",
                                        corpus["validation_0"], "--save_dir", str(save), "--warmup_steps", "0",
                                        "--device", "cpu", "--compile", "off", *flags)
        assert code == 0, out + err
        return out

    # a resume with no steps left scores the depth its last step trained at, and keeps it out of best.pt
    run(tmp_path / "short", "--max_steps", "8", "--eval_every", "100", "--save_every", "4", "--depth_warmup", "0.9")
    (tmp_path / "again").mkdir()  # (this process still holds the first folder's lock)
    shutil.copy(tmp_path / "short" / "step_4.pt", tmp_path / "again")
    run(tmp_path / "again", "--max_steps", "4", "--eval_every", "100", "--depth_warmup", "0.9", "--resume", "auto")
    assert calls == [{"deep_steps": 1}] and not (tmp_path / "again" / "best.pt").exists()
    # a model of one deep step has no shallower start: its scores are full-depth ones
    out = run(tmp_path / "deep1", "--max_steps", "8", "--eval_every", "4", "--deep_steps", "1", "--depth_warmup", "0.5")
    assert calls == [{}, {}] and "warm-up" not in out and (tmp_path / "deep1" / "best.pt").exists()


def test_a_run_resumed_inside_its_depth_warmup_still_stops_a_collapse(corpus, tmp_path, capsys, monkeypatch):
    # best.pt keeps only full-depth scores, so a run resumed inside its warm-up must take the resumed checkpoint's own
    # (shallow) score as the guard's best: else the collapse the guard stopped, resumed from the checkpoint its
    # message names, trains on unnoticed
    import trm.evaluate
    import trm.guard
    losses = []

    def evaluate(*args, **kwargs):
        loss = losses.pop(0)
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss, "tokens": 1, "bytes": 1}

    monkeypatch.setattr(trm.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(trm.guard, "unigram_entropy", lambda tokens, vocab_size: 7.96)
    monkeypatch.setattr(trm.guard, "MIN_TOKENS", 0)
    common = ["--train_paths", corpus["train_0"], "--valid_paths", corpus["validation_0"], "--max_steps", "20",
              "--eval_every", "4", "--warmup_steps", "0", "--depth_warmup", "0.9", "--device", "cpu",
              "--compile", "off"]
    losses[:] = [2.5, 2.0, 5.0, 5.1]  # shallow scores, then halfway back to the unigram level twice
    code, out, err = run_in_process(capsys, *common, "--save_dir", str(tmp_path / "straight"))
    assert code == 3 and "the run collapsed" in err
    (tmp_path / "resumed").mkdir()  # (this process still holds the first folder's lock)
    shutil.copy(tmp_path / "straight" / "step_8.pt", tmp_path / "resumed")
    losses[:] = [5.0, 5.1]
    code, out, err = run_in_process(capsys, *common, "--save_dir", str(tmp_path / "resumed"), "--resume", "auto")
    assert code == 3 and "the run collapsed" in err and "from its best 2.0000" in err, out + err


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_that_resumes(corpus, tmp_path):
    save = tmp_path / "ck"
    cmd = endless_trainer(corpus, save)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out  # saved, but not finished: what the shell reports after Ctrl-C
    saved = list(save.glob("step_*.pt"))
    assert len(saved) == 1 and not list(save.glob("final_step_*.pt"))
    step = load_checkpoint(saved[0])["step"]
    train(corpus, save, "--max_steps", str(step + 3), "--eval_every", "100000", "--log_every", "1",
          "--train_paths", corpus["train_0"], "--resume", "auto")
    assert load_checkpoint(save / f"final_step_{step + 3}.pt")["run_id"] == load_checkpoint(saved[0])["run_id"]
    assert [h["step"] for h in logged(save, "train")][-4:] == [step, step + 1, step + 2, step + 3]


@pytest.mark.slow
def test_truncated_checkpoint_is_reported_and_auto_resume_falls_back(corpus, tmp_path):
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "8", "--eval_every", "4", "--log_every", "4")
    final = save / "final_step_8.pt"
    final.write_bytes(final.read_bytes()[:1000])
    r = train(corpus, save, "--max_steps", "10", "--eval_every", "4", "--log_every", "2", "--resume", "auto")
    # the warning names the damaged file: the user's cue to look at it
    assert re.search(r"warning: .*final_step_8\.pt is unreadable or truncated .*; skipping it", r.stdout)
    assert [h["step"] for h in logged(save, "train")] == [4, 6, 8, 10]  # resumed from step_4.pt, its log kept
    r = train(corpus, save, "--resume", str(final), check=False)
    assert_one_line_error(r, "unreadable or truncated", str(final), code=2)


def test_missing_inputs_are_clear_errors(corpus, tmp_path):
    r = train(corpus, tmp_path / "ck", "--train_paths", str(tmp_path / "train_9.jsonl.gz"), check=False)
    assert_one_line_error(r, "train file not found", "train_9.jsonl.gz", code=2)
    r = train(corpus, tmp_path / "ck", "--tokenizer", "sentencepiece", "--sp_model", str(tmp_path / "nope.model"),
              check=False)
    assert_one_line_error(r, "SentencePiece model not found", code=2)
    r = train(corpus, tmp_path / "ck", "--tokenizer", "sentencepiece", "--sp_model", str(tmp_path), check=False)
    assert_one_line_error(r, f"--sp_model {tmp_path} is a folder", "ja_trm.model", code=2)
    r = train(corpus, tmp_path / "ck", "--d_model", "30", "--n_heads", "4", check=False)
    assert_one_line_error(r, "n_heads", code=2)


def test_trains_from_an_xz_shard(corpus, tmp_path):
    import lzma
    xz = tmp_path / "train_0.jsonl.xz"
    xz.write_bytes(lzma.compress(gzip.decompress(Path(corpus["train_0"]).read_bytes())))
    save_dir = tmp_path / "ck"
    train(corpus, save_dir, "--train_paths", str(xz), "--max_steps", "3", "--eval_every", "3", "--log_every", "1")
    losses = [loss for step, kind, loss in logged_losses(save_dir) if kind == "train"]
    assert len(losses) == 3 and all(loss == loss and loss < 10 for loss in losses)  # finite: NaN != NaN
    assert list(save_dir.glob("*step_3*.pt"))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "4", "--eval_every", "4", "--log_every", "4", "--lr_schedule", "constant")
    good = (save / "final_step_4.pt").read_bytes()
    r = train(corpus, save, "--max_steps", "40", "--eval_every", "4", "--log_every", "4", "--resume", "auto",
              "--lr", "1e30", "--grad_clip", "1e30", "--warmup_steps", "0", "--lr_schedule", "constant", check=False)
    assert_one_line_error(r, "non-finite", f"the last good checkpoint {save / 'final_step_4.pt'} is intact", code=3)
    assert not list(save.glob("step_*.pt")) and (save / "final_step_4.pt").read_bytes() == good


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(corpus, tmp_path):
    common = ["--max_steps", "6", "--eval_every", "100", "--log_every", "2", "--dropout", "0"]
    train(corpus, tmp_path / "one", *common, "--batch_size", "4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"], corpus["train_1"],
           "--valid_paths", corpus["validation_0"], "--save_dir", str(tmp_path / "two"), *common, "--batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sum(line.startswith("step ") for line in r.stdout.splitlines()) == 3  # steps 2, 4, 6: only rank 0 logs
    a, b = params(tmp_path / "one" / "final_step_6.pt"), params(tmp_path / "two" / "final_step_6.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la, lb = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert [s for s, *_ in la] == [s for s, *_ in lb]
    for (_, _, x), (_, _, y) in zip(la, lb):
        assert abs(x - y) < 1e-4



# ---- the user's own run ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_checkpoints_are_pruned_by_default_keeping_best_final_and_the_newest_three(corpus, tmp_path):
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "10", "--eval_every", "2", "--log_every", "2")
    assert sorted(p.name for p in save.glob("*.pt")) == ["best.pt", "final_step_10.pt", "step_4.pt", "step_6.pt",
                                                         "step_8.pt"]
    # best.pt: the checkpoint with the lowest validation loss, a second name for its file (no second copy on disk)
    evals = {s: loss for s, kind, loss in logged_losses(save) if kind == "eval"}
    best = min(evals, key=evals.get)
    assert load_checkpoint(save / "best.pt")["step"] == best
    same = save / (f"final_step_{best}.pt" if best == 10 else f"step_{best}.pt")
    assert (save / "best.pt").stat().st_ino == same.stat().st_ino
    same.unlink()  # as pruning would: best.pt stays
    assert load_checkpoint(save / "best.pt")["step"] == best
    train(corpus, tmp_path / "all", "--max_steps", "6", "--eval_every", "2", "--log_every", "2", "--keep_last", "0")
    assert {"step_2.pt", "step_4.pt", "final_step_6.pt"} <= {p.name for p in (tmp_path / "all").iterdir()}


def test_compile_auto_graphs_launch_bound_steps_whole_where_it_can():
    from trm.flags import choose_compile
    mode = lambda *a: choose_compile(*a)[0]  # noqa: E731
    assert mode("auto", "cuda", 4 * 512) == "whole"  # the procedure's batch: launch-bound, the optimizer's launches too
    assert mode("auto", "cuda", 16 * 512) == "whole"
    assert mode("auto", "cuda", 4 * 512, None, "--compile whole steps AdamW inside the graph") == "graphs"  # Muon, ...
    assert mode("auto", "cuda", 64 * 512) == "on"  # compute-bound: plain compile
    assert mode("auto", "cpu", 4 * 512) == "off"
    assert mode("auto", "cuda", 4 * 512, "--sup_update each steps inside") == "off"
    assert mode("graphs", "cuda", 64 * 512) == "graphs"
    assert mode("graphs", "cpu", 4 * 512) == "off"  # the GPU command on a CPU: no compiling
    assert mode("on", "cuda", 4 * 512) == "on"
    assert mode("off", "cuda", 4 * 512) == "off"


def test_warnings_that_save_a_run(capsys, tmp_path):
    from trm.run_dir import disk_warning
    from trm.schedule import budget_warning, warmup_warning
    code, out, _ = run_in_process(capsys, "--train_paths", "nowhere.jsonl.gz", "--save_dir", str(tmp_path / "ck"),
                                  "--warmup_steps", "10", "--max_steps", "4")
    assert "warning: --warmup_steps 10 >= --max_steps 4" in out and "never reached" in out
    assert "only at the last step" in warmup_warning(3e-4, 500, 500) and warmup_warning(3e-4, 500, 501) is None
    # the time budget ends before the warm-up: 2 steps/s for 60 s more reach step 130 of 500
    assert "near step 130" in budget_warning(10, 500, 2.0, 60) and budget_warning(10, 100, 2.0, 60) is None
    # the procedure's run kept every checkpoint: 101 of 157 MB need 15.9 GB
    assert "15.9 GB" in disk_warning("ck", 10e9, 157e6, 101) and disk_warning("ck", 10e9, 157e6, 5) is None


@pytest.mark.slow
def test_the_summary_line_adds_up_and_a_costly_evaluation_is_pointed_out(corpus, tmp_path):
    save = tmp_path / "ck"
    t = time.time()
    r = train(corpus, save, "--max_steps", "4", "--eval_every", "1", "--eval_tokens", "4096", "--log_every", "2")
    t = time.time() - t
    wall, trained = map(float, re.search(r"done: 4 steps in ([\d.]+) min \(([\d.]+) of them training\)",
                                         r.stdout).groups())
    assert trained <= wall
    # where the seconds went: steps 1-3 and the end each evaluate and save
    m = re.search(r"time: ([\d.]+) s training, ([\d.]+) s evaluating \(4 evaluations\), ([\d.]+) s saving \(4 "
                  r"checkpoints: the loop's stalls and the last write\), ([\d.]+) s other \(start-up, data; "
                  r"([\d.]+) s before the first step\)", r.stdout)
    assert m, r.stdout
    *seconds, startup = [float(x) for x in m.groups()]
    assert all(x > 0 for x in seconds) and sum(seconds) <= t + 0.2  # (each rounded to 0.05 s)
    assert 0 < startup <= seconds[3] + 0.1  # the start-up is part of "other"
    assert abs(seconds[0] / 60 - trained) < 0.06
    assert r.stdout.count("note: an evaluation takes") == 1 and "--eval_tokens (now 4,096)" in r.stdout
    state = load_checkpoint(save / "final_step_4.pt")
    state["train_seconds"] = 600.0  # ten minutes of training in earlier sessions
    save_checkpoint(state, str(save / "final_step_4.pt"))
    r = train(corpus, save, "--max_steps", "6", "--eval_every", "6", "--log_every", "2", "--resume", "auto")
    m = re.search(r"done: 6 steps \(2 in this session: ([\d.]+) min, ([\d.]+) of them training; ([\d.]+) min of "
                  r"training in all\)", r.stdout)
    assert m and float(m[2]) <= float(m[1]) < 10 <= float(m[3]), r.stdout


def test_help_shows_each_default_once_and_ends_with_an_example(capsys):
    code, out, _ = run_in_process(capsys, "--help")
    assert code == 0
    options = out.split("options:\n", 1)[1].split("\n\n")[0]
    for block in re.split(r"\n  (?=--)", options)[1:]:  # (the first is -h)
        assert block.count("(default") == 1, block
    assert out.rstrip().splitlines()[-3].strip().startswith("python train_trm_lm.py --tokenizer sentencepiece")


@pytest.mark.parametrize("name", ["metrics.jsonl", "best.pt", "step_2.pt"])
def test_a_save_dir_file_that_is_a_fifo_is_refused_before_any_work(corpus, tmp_path, name):
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    os.mkfifo(save_dir / name)
    r = train(corpus, save_dir, "--max_steps", "2", "--eval_every", "2", check=False)
    assert_one_line_error(r, "--save_dir", name, "FIFO", code=2)
    assert "data:" not in r.stdout + r.stderr  # before the corpus is tokenized
    assert (save_dir / name).is_fifo() and {p.name for p in save_dir.iterdir()} - {".lock"} == {name}


def test_resuming_with_another_seed_warns_and_keeps_the_checkpoints_order(corpus, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--max_steps", "8", "--eval_every", "4", "--log_every", "2"]
    train(corpus, straight, *common)
    copy_run_until(straight, resumed, 4)
    r = train(corpus, resumed, *common, "--resume", "auto", "--seed", "8")
    assert "warning: --seed 8 ignored: the resumed run keeps its checkpoint's seed 7" in r.stdout + r.stderr
    assert logged_losses(straight) == logged_losses(resumed)
    assert load_checkpoint(resumed / "final_step_8.pt")["args"]["seed"] == 7
