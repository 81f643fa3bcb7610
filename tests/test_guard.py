"""The collapse guard: the rule on evaluation curves (healthy ones never stop, collapsed ones stop at the second
evaluation after the collapse), and a tiny CPU run made to collapse on purpose."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error
from trainer_run import ROOT, TINY, logged, train
from trm.checkpoint import load_checkpoint
from trm.guard import MIN_TOKENS, CollapseGuard, last_good_checkpoint, unigram_entropy


def test_unigram_entropy_is_the_loss_of_predicting_token_frequencies():
    assert unigram_entropy(np.arange(8, dtype=np.uint16).repeat(5), 16) == pytest.approx(math.log(8))
    tokens = np.random.default_rng(0).zipf(1.5, 100_000).clip(max=999).astype(np.uint16)
    p = np.bincount(tokens, minlength=1000) / len(tokens)
    expected = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert unigram_entropy(tokens, 1000) == pytest.approx(expected)
    assert unigram_entropy(tokens, 1000, chunk=777) == pytest.approx(expected)  # the chunks add up


def run(curve, u=8.0, warmup=500, every=500, tokens_per_step=2048, best=None):
    """Feed a guard one evaluation loss per --eval_every steps; (step it stopped at or None, warnings)."""
    guard = CollapseGuard(u, warmup, best)  # a fresh run: the trend of its first evaluation is unknown
    warnings = []
    for i, loss in enumerate(curve, 1):
        step = i * every
        if warning := guard.observe(step, step * tokens_per_step, loss):
            warnings.append(warning)
        if guard.collapsed:
            return step, warnings
    return None, warnings


HEALTHY = {
    "a GPU run": [6.2, 5.6, 5.3, 5.1, 5.0, 4.95, 4.92, 4.91],
    "a small CPU model on real text, near the unigram level but falling": [7.9, 7.7, 7.5, 7.35, 7.25, 7.18, 7.15],
    "overfitting: creeps up from its best": [6.0, 5.2, 4.9, 4.95, 5.0, 5.08, 5.15, 5.3],
    "one loss spike that recovers": [6.0, 5.2, 7.9, 5.1, 5.0],
}


@pytest.mark.parametrize("curve", HEALTHY.values(), ids=HEALTHY.keys())
def test_a_healthy_run_is_never_stopped(curve):
    assert run(curve)[0] is None


# The procedure's own command on an H200 (batch 4, 512 tokens, --eval_every 500, the default --lr 3e-4; one aozora-xl
# shard, unigram entropy 7.932): the guard of commit e9f8052 stopped it at step 4,000 as "not falling", because it
# asked every evaluation for a drop of 0.079 nats whatever the tokens between two.
PROCEDURE = [8.3462, 8.2574, 8.0704, 7.9170, 7.7833, 7.6917, 7.6263, 7.5698]


# The same command for 10,000 steps on two aozora-xl shards (unigram entropy 7.908), on an H200 at commit a8e2115: the
# schedule decays to 3e-5 and the loss flattens at 0.90 u; a level of 0.9 u stopped it at its final evaluation.
PROCEDURE_10K = [8.3286, 8.2251, 8.0342, 7.8782, 7.7448, 7.6150, 7.4960, 7.4083, 7.3449, 7.2942, 7.2642, 7.2334,
                 7.2117, 7.1934, 7.1799, 7.1658, 7.1454, 7.1332, 7.1314, 7.1316]


def test_a_healthy_run_flattening_at_the_end_of_its_schedule_is_not_stopped():
    step, warnings = run(PROCEDURE_10K, u=7.908)
    assert step is None and len(warnings) == 1 and warnings[0].startswith("note: step 500")


@pytest.mark.parametrize("every", [500, 100, 20])
def test_a_slow_run_above_the_unigram_level_is_not_stopped_however_often_it_is_evaluated(every):
    # the same descent seen every `every` steps: the drop per evaluation shrinks with them, the rate per token not
    per_step = np.interp(np.arange(500, 4001, every), np.arange(500, 4001, 500), PROCEDURE)
    step, warnings = run(list(per_step), u=7.932, every=every, warmup=every)
    assert step is None
    assert len(warnings) <= 1  # at most the first evaluation, which has no trend yet: a note, not a warning
    assert all(w.startswith("note: ") and "A slow start is normal" in w for w in warnings)


def test_a_flat_run_is_stopped_however_often_it_is_evaluated():
    # the collapsed GPT's drift, ~0.00004 nats per million tokens, seen at the race's batch and at the procedure's
    for every, tokens_per_step in ((500, 32768), (100, 2048), (20, 2048)):
        drift = 0.00004 * every * tokens_per_step / 1e6
        curve = [8.17 - i * drift for i in range(12)]
        first = every * max(1, math.ceil(MIN_TOKENS / tokens_per_step / every))  # the first evaluation judged
        assert run(curve, u=7.96, every=every, warmup=every, tokens_per_step=tokens_per_step)[0] == first + every


def test_a_resumed_run_judges_its_first_trend_from_the_resume_point():
    # resumed at step 3,000 (6.1M tokens) from a best of 7.70: the next evaluation 1M tokens later at 7.69 is falling
    guard = CollapseGuard(7.932, 500, best=7.70, step=3000, tokens_seen=3000 * 2048)
    assert guard.observe(3500, 3500 * 2048, 7.69) is None and not guard.suspect


def test_nothing_is_judged_during_warm_up_nor_before_the_first_tokens():
    assert run([8.2] * 7, warmup=3000)[0] == 3500  # judged from step 3,000 on: 3,000 and 3,500
    tiny = run([8.2] * 40, every=8, warmup=5, tokens_per_step=128)  # the test suite's runs: 40 x 8 x 128 < 200k
    assert tiny == (None, []) and 40 * 8 * 128 < MIN_TOKENS


def test_a_run_stuck_at_the_unigram_level_stops_at_its_second_evaluation():
    # issue 19: a 12-layer GPT at --lr 3e-3 sat at eval 8.17 (unigram entropy 7.96) from step 500 on
    step, warnings = run([8.17, 8.17, 8.16, 8.17], u=7.96)
    assert step == 1000 and len(warnings) == 1 and "step 500" in warnings[0] and "unigram level" in warnings[0]


def test_a_non_finite_first_evaluation_is_no_slow_start():
    # a first evaluation at the unigram level may be a slow start, and a run ending on it keeps its weights (with a
    # note); a non-finite one is no slow start: the run must stop without saving those weights
    slow, broken = CollapseGuard(7.96, 500), CollapseGuard(7.96, 500)
    assert slow.observe(1000, 1000 * 2048, 8.1).startswith("note: ") and slow.first_look
    assert not broken.observe(1000, 1000 * 2048, math.nan).startswith("note: ")
    assert broken.suspect and not broken.first_look


def test_scores_at_another_depth_start_the_comparison_afresh():
    # --depth_warmup scores a one-step model first, then the full depth: a new model, worse at first. Against the
    # shallow best (2.0) the full depth's 5.2 and 5.1 are more than halfway back to u (7.96): two bad, a stop
    shallow, full = [(500, 2.5), (1000, 2.0)], [(1500, 5.2), (2000, 5.1), (2500, 4.5)]
    guard = CollapseGuard(7.96, 500, tokens_seen=0)
    for step, loss in shallow:
        assert guard.observe(step, step * 2048, loss, {"deep_steps": 1}) is None
    for step, loss in full:
        assert guard.observe(step, step * 2048, loss, {}) is None and not guard.suspect
    assert guard.best == 4.5
    blind = CollapseGuard(7.96, 500)
    for step, loss in shallow + full[:2]:
        blind.observe(step, step * 2048, loss)
    assert blind.collapsed


def test_a_collapse_across_the_depth_change_still_stops_at_the_second_bad_evaluation():
    # the comparison starts afresh at a new depth, the count of bad evaluations in a row does not
    guard = CollapseGuard(7.96, 0, min_tokens=0)
    guard.observe(500, 500 * 2048, 6.0, {"deep_steps": 1})
    assert guard.observe(1000, 1000 * 2048, 7.9, {"deep_steps": 1}) and guard.suspect
    guard.observe(1500, 1500 * 2048, 8.0, {})
    assert guard.collapsed


def test_a_guard_resumed_inside_the_warmup_compares_with_its_checkpoints_score():
    # best.pt keeps only full-depth scores: a run resumed inside --depth_warmup starts from the resumed checkpoint's
    # own (shallow) evaluation, so the next two shallow ones far above it still stop the run
    guard = CollapseGuard(7.96, 0, best=2.0, step=8, min_tokens=0, tokens_seen=8 * 2048, depth={"deep_steps": 1})
    for step, loss in ((12, 5.2), (16, 5.1)):
        guard.observe(step, step * 2048, loss, {"deep_steps": 1})
    assert guard.collapsed


def test_a_collapse_after_learning_stops_at_the_second_evaluation_after_it():
    assert run([6.2, 5.6, 5.3, 8.1, 8.1, 8.1])[0] == 2500  # back at the unigram level
    assert run([6.2, 5.6, 5.3, 6.8, 6.9, 7.0])[0] == 2500  # halfway back: 5.3 + (8 - 5.3) / 2 = 6.65
    assert run([6.2, 5.6, 5.3, 6.6, 6.6, 6.6])[0] is None  # not quite halfway: a bad patch, not a collapse
    assert run([6.0, 5.0, float("nan"), float("inf")])[0] == 2000


def test_a_resumed_run_compares_with_its_best_checkpoint():
    assert run([6.8, 6.9], best=5.3)[0] == 1000


def test_the_stop_message_is_one_line_naming_the_lr_a_safer_one_and_the_surviving_checkpoint():
    guard = CollapseGuard(7.96, 500)
    for step in (500, 1000):
        guard.observe(step, step * 2048, 8.17)
    msg = guard.message(3e-3, "ck/step_400.pt")
    assert "\n" not in msg and "--lr 0.003 is too high" in msg and "--resume ck/step_400.pt --lr 0.0015" in msg
    assert "steps 500 and 1,000" in msg and "7.960" in msg and "--collapse_guard off" in msg
    assert "start again with --lr 0.0015 --overwrite" in guard.message(3e-3, None)


def test_the_last_good_checkpoint_is_the_newest_one_written_at_or_before_the_last_passed_evaluation(tmp_path):
    saved = [str(tmp_path / f"step_{n}.pt") for n in (500, 1000, 1200)]  # 1200: written after the last good eval
    for p in saved[1:]:
        open(p, "w").close()  # step_500.pt was pruned
    assert last_good_checkpoint(saved, 1000, str(tmp_path)) == saved[1]
    assert last_good_checkpoint(saved, 900, str(tmp_path)) is None
    open(tmp_path / "best.pt", "w").close()
    assert last_good_checkpoint(saved, 900, str(tmp_path)) == str(tmp_path / "best.pt")


# ---- end to end: a tiny run made to collapse ------------------------------------------------------------------------

# The trainer with the guard judging from the first token on (the tiny run never reaches MIN_TOKENS)
NO_TOKEN_FLOOR = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # the repository, as when the trainer runs as a script
import trm.guard
trm.guard.MIN_TOKENS = 0
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# a learning rate that wrecks the weights without a non-finite loss (the gradient is clipped)
COLLAPSE = ["--lr", "30", "--warmup_steps", "0", "--lr_schedule", "constant", "--eval_every", "2", "--log_every", "2"]


def guarded_train(corpus, save_dir, *extra, launcher=(sys.executable,), env=None):
    wrapper = save_dir.parent / "no_token_floor.py"  # a file, not -c: torchrun runs scripts
    wrapper.write_text(NO_TOKEN_FLOOR)
    cmd = [*launcher, str(wrapper), str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"],
           corpus["train_1"], "--valid_paths", corpus["validation_0"], "--save_dir", str(save_dir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_collapsing_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(corpus, tmp_path):  # noqa: F811
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "8", "--eval_every", "4", "--log_every", "4")
    good = {name: (save / name).read_bytes() for name in ("step_4.pt", "final_step_8.pt", "best.pt")}
    r = guarded_train(corpus, save, "--max_steps", "40", "--resume", "auto", *COLLAPSE)
    assert r.returncode == 3, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "collapsed" in errors[0] and "--lr 30 is too high" in errors[0] and "steps 10 and 12" in errors[0]
    assert f"--resume {save / 'final_step_8.pt'} --lr 15" in errors[0]
    assert "warning: step 10: the validation loss" in r.stdout and "is not saved" in r.stdout
    # nothing written after the collapse; every earlier checkpoint as it was, best.pt included
    assert sorted(p.name for p in save.glob("*.pt")) == ["best.pt", "final_step_8.pt", "step_4.pt"]
    assert {name: (save / name).read_bytes() for name in good} == good
    # the advice works: the last good checkpoint continues at the safer rate, and --collapse_guard off trains on
    again = guarded_train(corpus, save, "--max_steps", "10", "--resume", str(save / "final_step_8.pt"),
                          "--eval_every", "2", "--log_every", "2")
    assert again.returncode == 0 and load_checkpoint(save / "final_step_10.pt")["step"] == 10
    off = guarded_train(corpus, tmp_path / "off", "--max_steps", "6", *COLLAPSE, "--collapse_guard", "off")
    assert off.returncode == 0 and "collapse guard" not in off.stdout, off.stderr


@pytest.mark.slow
def test_a_run_that_ends_on_a_bad_evaluation_does_not_save_it(corpus, tmp_path):  # noqa: F811
    # the loop says "this checkpoint is not saved" of a bad evaluation; a run whose last step it was saved it all the
    # same, as final_step_N.pt, the checkpoint --resume auto then trusts
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "8", "--eval_every", "4", "--log_every", "4")
    r = guarded_train(corpus, save, "--max_steps", "10", "--resume", "auto", *COLLAPSE)
    line = assert_one_line_error(r, "the run ended on a bad evaluation", "step 10", "Stopped without saving",
                                 f"--resume {save / 'final_step_8.pt'} --lr 15", code=3)
    assert "collapsed" not in line
    assert sorted(p.name for p in save.glob("*.pt")) == ["best.pt", "final_step_8.pt", "step_4.pt"]
    # ... unless it was the run's first evaluation, which cannot tell a slow start from a collapse: saved, with a note
    r = guarded_train(corpus, tmp_path / "fresh", "--max_steps", "2", *COLLAPSE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: the run ended on its first evaluation" in r.stdout and (tmp_path / "fresh" / "final_step_2.pt").exists()


@pytest.mark.slow
def test_weights_the_loop_just_evaluated_are_not_evaluated_and_judged_again(corpus, tmp_path):  # noqa: F811
    # the budget runs out at an evaluation step: the end reuses that evaluation (judged twice, one bad evaluation
    # counted as two and a first one as "falling"; and metrics.jsonl held it twice)
    r = train(corpus, tmp_path / "ck", "--max_steps", "1000", "--eval_every", "1", "--log_every", "1",
              "--max_minutes", "0.0001")
    evals = logged(tmp_path / "ck", "eval")
    assert len(evals) == 1 and "(1 evaluation)" in r.stdout, (evals, r.stdout)


@pytest.mark.slow
def test_a_collapse_stops_every_process_under_ddp(corpus, tmp_path):  # noqa: F811
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541")
    r = guarded_train(corpus, tmp_path / "ck", "--max_steps", "40", "--batch_size", "2", *COLLAPSE,
                      launcher=launcher, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]  # rank 0's, not cut off by rank 1
    assert r.returncode != 0 and len(errors) == 1, r.stderr
    assert "the run collapsed" in errors[0] and "no checkpoint was saved" in errors[0], r.stderr
    assert not list((tmp_path / "ck").glob("*.pt"))
