"""train_trm_lm.py when something goes wrong: nothing lost, nobody confused. A save dir owned by one run, bad flags,
a full disk, unusable folders, interruptions, and messages that say what is true and what to do next."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_one_line_error
from trainer_run import ROOT, TINY, endless_trainer, logged, logged_losses, params, run_in_process, train
from trm.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from trm.run_dir import link_best, take_ownership


# ---- nothing lost, nobody confused ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_owns_its_save_dir(corpus, tmp_path):
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "8", "--eval_every", "4", "--log_every", "4")
    before = {n: (save / n).read_bytes() for n in ("step_4.pt", "final_step_8.pt", "metrics.jsonl")}
    # a fresh run in the folder of another run is refused, before any work, and touches nothing
    r = train(corpus, save, "--max_steps", "6", "--eval_every", "4", "--cache_dir", tmp_path / "cache", check=False)
    assert_one_line_error(r, "--resume auto", "--overwrite", code=2)
    assert {n: (save / n).read_bytes() for n in before} == before and not (tmp_path / "cache").exists()
    # --overwrite starts over: the old run's files move to a sibling folder, nothing is deleted
    r = train(corpus, save, "--max_steps", "6", "--eval_every", "4", "--log_every", "2", "--overwrite")
    aside = [d for d in tmp_path.iterdir() if d.name.startswith("ck.replaced-")]
    assert len(aside) == 1 and {n: (aside[0] / n).read_bytes() for n in before} == before
    assert (save / "final_step_6.pt").exists() and not (save / "step_4.pt").read_bytes() == before["step_4.pt"]
    # --resume auto continues the folder's run: another run's checkpoint is skipped although its step is higher
    (save / "final_step_8.pt").write_bytes(before["final_step_8.pt"])
    train(corpus, save, "--max_steps", "7", "--eval_every", "4", "--log_every", "1", "--resume", "auto")
    ids = [load_checkpoint(p)["run_id"] for p in (save / "final_step_7.pt", save / "final_step_6.pt",
                                                  aside[0] / "final_step_8.pt")]
    assert ids[0] == ids[1] != ids[2] and json.loads((save / "run.json").read_text())["run_id"] == ids[0]


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_keeps_what_it_writes(corpus, tmp_path):
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "12", "--eval_every", "4", "--log_every", "4")
    r = train(corpus, save, "--max_steps", "6", "--eval_every", "5", "--log_every", "5", "--keep_last", "1",
              "--resume", str(save / "step_4.pt"))
    # the checkpoint just written survives pruning; the abandoned stretch is kept aside, out of --resume auto's way
    assert (save / "step_5.pt").exists() and (save / "final_step_6.pt").exists() and not (save / "step_4.pt").exists()
    aside = {p.name for p in (save / "abandoned_after_step_4").iterdir()}
    assert aside - {"best.pt"} == {"step_8.pt", "final_step_12.pt", "metrics.jsonl"}  # its log went with them
    assert [h["step"] for h in logged(save / "abandoned_after_step_4", "train")] == [4, 8, 12]
    if "best.pt" in aside:  # the abandoned stretch's best went with it
        assert load_checkpoint(save / "abandoned_after_step_4" / "best.pt")["step"] > 4
    assert load_checkpoint(save / "best.pt")["step"] <= 6  # the resumed stretch's own
    r = train(corpus, save, "--max_steps", "7", "--eval_every", "5", "--log_every", "1", "--resume", "auto")
    assert f"resuming from {save / 'final_step_6.pt'}" in r.stdout


@pytest.mark.parametrize("case", ["best before the resume, its file kept", "best before the resume, pruned",
                                  "best.pt already the resumed stretch's"])
def test_resuming_an_earlier_checkpoint_takes_a_later_best_pt_aside_too(tmp_path, case):
    # export and generation take best.pt first: after a resume from step 4, a best.pt of the abandoned stretch (here
    # step 10's, pruned since: best.pt is its only copy) must not stay where they look
    save = tmp_path / "ck"

    def write(name, step, best_step):
        save_checkpoint({"step": step, "best": {"loss": 1 / step, "step": best_step}, "run_id": "r1"}, save / name)

    write("step_2.pt", 2, 2)
    write("step_4.pt", 4, 2)
    if case == "best before the resume, pruned":
        link_best(str(save), str(save / "step_2.pt"))
        os.remove(save / "step_2.pt")
        write("step_10.pt", 10, 10)
        link_best(str(save), str(save / "step_10.pt"))
    elif case == "best.pt already the resumed stretch's":
        link_best(str(save), str(save / "step_2.pt"))
        write("step_10.pt", 10, 2)
    else:
        write("step_10.pt", 10, 10)
        link_best(str(save), str(save / "step_10.pt"))
    os.remove(save / "step_10.pt")  # pruned
    write("final_step_12.pt", 12, 10)
    lines, resumed = [], str(save / "step_4.pt")
    take_ownership(str(save), load_checkpoint(resumed), resumed, resumed, False, lines.append)
    aside = save / "abandoned_after_step_4"
    if case == "best.pt already the resumed stretch's":
        assert load_checkpoint(save / "best.pt")["step"] == 2 and not (aside / "best.pt").exists()
        return
    assert load_checkpoint(aside / "best.pt")["step"] == 10
    if case == "best before the resume, its file kept":
        assert load_checkpoint(save / "best.pt")["step"] == 2 and lines[-1].endswith("best.pt is step_2.pt again")
    else:
        assert not (save / "best.pt").exists() and "improves on its best so far (step 2)" in lines[-1]


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    for n in (2, 8, 9):
        (tmp_path / f"step_{n}.pt").write_bytes(b"")
    removed = prune_checkpoints(str(tmp_path), 1, keep=[str(tmp_path / "step_2.pt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2.pt", "step_9.pt"]
    assert [os.path.basename(p) for p in removed] == ["step_8.pt"]


@pytest.mark.slow
def test_a_second_live_trainer_is_refused_and_kill_9_leaves_nothing_in_the_way(corpus, tmp_path):
    save = tmp_path / "ck"
    cmd = endless_trainer(corpus, save)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("step"):
                break
        r = train(corpus, save, "--max_steps", "4", "--resume", "auto", check=False)
        assert_one_line_error(r, f"another trainer (pid {proc.pid})", code=2)
    finally:
        proc.kill()
        proc.wait()
    # kill -9 leaves the lock file (harmless: the kernel dropped the lock) and, had it died mid-save, a partial file
    dead, live = save / f"step_3.pt.tmp.{proc.pid}", save / f"step_3.pt.tmp.{os.getpid()}"
    dead.write_bytes(b"partial")
    live.write_bytes(b"being written")
    train(corpus, save, "--max_steps", "2", "--eval_every", "2", "--log_every", "1", "--resume", "auto")
    assert (save / ".lock").exists() and (save / "final_step_2.pt").exists()
    assert not dead.exists() and live.exists()


BAD_FLAGS = [("--grad_clip", "-1", "at least 0 (0 = no clipping)"), ("--lr", "nan", "greater than 0"),
             ("--lr", "0", "greater than 0"), ("--lr", "inf", "greater than 0"), ("--warmup_steps", "-5", "at least 0"),
             ("--weight_decay", "-0.1", "at least 0"), ("--weight_decay", "nan", "at least 0"),
             ("--eval_tokens", "0", "at least 1"), ("--eval_every", "0", "at least 1"),
             ("--keep_last", "-1", "at least 0"), ("--save_every", "-2", "at least 0"),
             ("--dropout", "1", "at least 0 and less than 1"),
             ("--ema_decay", "nan", "at least 0 and less than 1 (0 = no EMA)"), ("--max_minutes", "-1", "at least 0"),
             ("--max_minutes", "nan", "at least 0"), ("--act_weight", "-0.5", "at least 0"),
             ("--batch_size", "0", "at least 1"), ("--grad_accum", "0", "at least 1"), ("--seed", "-1", "at least 0")]


@pytest.mark.parametrize("flag,value,expected", BAD_FLAGS, ids=[f"{f}={v}" for f, v, _ in BAD_FLAGS])
def test_numeric_flags_are_checked_before_any_work(capsys, tmp_path, flag, value, expected):
    code, out, err = run_in_process(capsys, "--train_paths", "nowhere.jsonl.gz", "--max_steps", "2",
                                    "--save_dir", str(tmp_path / "ck"), flag, value)
    assert code == 2 and err.startswith(f"error: {flag} must be {expected}"), err
    assert err.rstrip().endswith((f"got {value}", f"got {float(value)}")), err
    assert out == "" and not (tmp_path / "ck").exists()  # nothing done, not even the device chosen


@pytest.mark.slow
def test_grad_clip_0_means_no_clipping(corpus, tmp_path):
    common = ["--max_steps", "6", "--eval_every", "100", "--log_every", "3", "--dropout", "0", "--ema_decay", "0",
              "--warmup_steps", "1"]
    r = train(corpus, tmp_path / "off", *common, "--grad_clip", "0")
    assert "validation (raw weights): loss" in r.stdout  # --ema_decay 0: no EMA was evaluated, and it says so
    train(corpus, tmp_path / "huge", *common, "--grad_clip", "1e9")
    a, b = params(tmp_path / "off" / "final_step_6.pt"), params(tmp_path / "huge" / "final_step_6.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same as a bound never reached: it learns
    losses = [loss for _, kind, loss in logged_losses(tmp_path / "off") if kind == "train"]
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.slow
def test_a_torn_last_line_in_metrics_does_not_stop_a_resume(corpus, tmp_path):
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "4", "--eval_every", "4", "--log_every", "2")
    with open(save / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "kind": "tra')  # the crash came in the middle of an append
    train(corpus, save, "--max_steps", "6", "--eval_every", "4", "--log_every", "2", "--resume", "auto")
    assert [(s, k) for s, k, _ in logged_losses(save)] == [(2, "train"), (4, "train"), (4, "eval"), (6, "train"),
                                                           (6, "eval")]


DISK_FULL = """
import errno, runpy, sys, torch
real, calls = torch.save, []
def save(*a, **k):  # the first checkpoint fits, the second finds the disk full
    calls.append(1)
    if len(calls) > 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(*a, **k)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_disk_full_while_saving_is_one_sentence_and_the_previous_checkpoint_survives(corpus, tmp_path):
    save = tmp_path / "ck"
    cmd = [sys.executable, "-c", DISK_FULL, str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"],
           "--valid_paths", corpus["validation_0"], "--save_dir", str(save), "--max_steps", "12", "--eval_every", "4",
           "--log_every", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "No space left on device", f"{save / 'step_4.pt'} is intact", code=1)
    assert load_checkpoint(save / "step_4.pt")["step"] == 4 and not list(save.glob("*.tmp.*"))


def test_an_unusable_save_dir_or_checkpoint_is_a_clear_error_before_any_work(corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = train(corpus, blocker / "ck", "--max_steps", "2", "--cache_dir", tmp_path / "cache", check=False)
    assert_one_line_error(r, "cannot write in --save_dir", code=2)
    assert not (tmp_path / "cache").exists()  # refused before the corpus was tokenized
    r = train(corpus, blocker, "--max_steps", "2", "--cache_dir", tmp_path / "cache", check=False)
    assert_one_line_error(r, f"--save_dir {blocker} is a file, not a folder", code=2)
    marker = tmp_path / "marker.pt"  # a file with the format marker and nothing else
    save_checkpoint({}, str(marker))
    r = train(corpus, tmp_path / "ck", "--max_steps", "2", "--resume", str(marker), check=False)
    assert_one_line_error(r, "cannot be resumed", code=2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_save_dir_is_reported_before_any_work(corpus, tmp_path):
    save = tmp_path / "ro"
    save.mkdir()
    save.chmod(0o555)
    try:
        r = train(corpus, save, "--max_steps", "2", "--cache_dir", str(tmp_path / "cache"), check=False)
    finally:
        save.chmod(0o755)
    assert_one_line_error(r, "cannot write in --save_dir", code=2)


@pytest.mark.slow
def test_a_resume_settles_tokenizer_and_architecture_before_the_corpus_is_tokenized(corpus, tmp_path, tiny_sp_model):
    save = tmp_path / "ck"
    train(corpus, save, "--max_steps", "2", "--eval_every", "2", "--log_every", "1")
    late = tmp_path / "cache"  # where the corpus would be tokenized: it must not come to that
    r = train(corpus, save, "--resume", "auto", "--tokenizer", "sentencepiece", "--sp_model", tiny_sp_model,
              "--cache_dir", late, check=False)
    assert_one_line_error(r, "different tokenizer (--tokenizer byte)", f"this command's --sp_model {tiny_sp_model}",
                          code=2)
    r = train(corpus, tmp_path / "heads", "--n_heads", "3", "--cache_dir", late, check=False)
    assert_one_line_error(r, "n_heads=3", code=2)
    assert not late.exists()
    # the checkpoint's window length wins over a disagreeing flag, which is told so (the corpus did not change)
    train(corpus, save, "--max_steps", "3", "--eval_every", "3", "--log_every", "1", "--resume", "auto",
          "--max_seq_len", "16")
    state = load_checkpoint(save / "final_step_3.pt")
    assert state["config"]["max_seq_len"] == state["args"]["max_seq_len"] == 32 and state["tokens_seen"] == 3 * 4 * 32


@pytest.mark.slow
def test_the_non_finite_stop_says_whether_a_checkpoint_exists(corpus, tmp_path):
    r = train(corpus, tmp_path / "ck", "--max_steps", "40", "--eval_every", "100", "--log_every", "4", "--lr", "1e30",
              "--grad_clip", "1e30", "--warmup_steps", "0", "--lr_schedule", "constant", check=False)
    assert "intact" not in assert_one_line_error(r, "no checkpoint of this run was saved yet", code=3)


# ---- a full disk or an unusable folder where the trainer writes (issue 24) ------------------------------------------

# Runs a script (argv[2:]) with files limited to argv[1] bytes: a write past the limit fails with EFBIG, as a write to
# a full disk fails with ENOSPC (SIGXFSZ ignored, or the kernel would kill the process instead).
FILE_SIZE_LIMIT = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train_limited(limit, corpus, save_dir, *extra):
    cmd = [sys.executable, "-c", FILE_SIZE_LIMIT, str(limit), str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths",
           corpus["train_0"], corpus["train_1"], "--valid_paths", corpus["validation_0"], "--save_dir", str(save_dir),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_full_disk_while_the_token_cache_builds_is_one_sentence(corpus, tmp_path):
    cache = tmp_path / "cache"
    r = train_limited(2000, corpus, tmp_path / "ck", "--max_steps", "2", "--cache_dir", str(cache))
    assert_one_line_error(r, "token cache", "--cache_dir", code=1)
    assert not list(cache.glob("*.tmp.*")) and not list((tmp_path / "ck").glob("*.pt"))


def test_a_cache_dir_that_cannot_be_one_is_refused_before_any_work(capsys, corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for cache, words in ((blocker, ("--cache_dir", "is a file")), (blocker / "cache", ("--cache_dir", "a_file"))):
        code, _, err = run_in_process(capsys, "--train_paths", corpus["train_0"], "--valid_paths",
                                      corpus["validation_0"], "--save_dir", str(tmp_path / "ck"),
                                      "--cache_dir", str(cache))
        assert code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and all(w in errors[0] for w in words), err
        assert not (tmp_path / "ck").exists()  # refused before the save dir was claimed


@pytest.mark.slow
def test_a_resume_on_a_nearly_full_disk_is_one_sentence_and_leaves_nothing_behind(corpus, tmp_path):
    save, cache = tmp_path / "ck", tmp_path / "cache"
    train(corpus, save, "--max_steps", "16", "--eval_every", "8", "--log_every", "1", "--cache_dir", cache)
    before = (save / "metrics.jsonl").read_bytes()
    # the resume rewrites metrics.jsonl whole, past the limit below; run.json (the run's arguments) stays under it
    assert len(before) > 2500 > (save / "run.json").stat().st_size
    r = train_limited(2500, corpus, save, "--max_steps", "20", "--eval_every", "4", "--log_every", "1",
                      "--cache_dir", str(cache), "--resume", "auto")
    assert_one_line_error(r, "metrics.jsonl", f"{save / 'final_step_16.pt'} is intact", "--resume auto", code=1)
    assert (save / "metrics.jsonl").read_bytes() == before and not list(save.glob("*.tmp.*"))


def test_a_training_file_named_twice_is_read_once(corpus, tmp_path):
    r = train(corpus, tmp_path / "ck", "--max_steps", "1", "--eval_every", "1", "--train_paths", corpus["train_0"],
              corpus["train_0"])
    assert "named again" in r.stdout and "each file is read once" in r.stdout
    assert load_checkpoint(tmp_path / "ck/final_step_1.pt")["args"]["train_paths"] == [corpus["train_0"]]
    once = train(corpus, tmp_path / "once", "--max_steps", "1", "--eval_every", "1", "--train_paths", corpus["train_0"])
    windows = [load_checkpoint(d / "final_step_1.pt")["loader"]["n_windows"] for d in (tmp_path / "ck",
                                                                                       tmp_path / "once")]
    assert windows[0] == windows[1] and "named again" not in once.stdout  # its tokens once, not twice
    assert "also a training file" not in r.stdout + once.stdout
    # the validation file among the training files (here through a symbolic link): scored, with a warning
    (tmp_path / "valid.jsonl.gz").symlink_to(corpus["train_0"])
    r = train(corpus, tmp_path / "same", "--max_steps", "1", "--train_paths", corpus["train_0"], "--valid_paths",
              str(tmp_path / "valid.jsonl.gz"))
    assert f"warning: {tmp_path / 'valid.jsonl.gz'} is also a training file" in r.stdout


# ---- messages that say what is true and what to do next (issue 24) --------------------------------------------------

def test_the_same_files_in_another_order_are_named_as_such(corpus, tmp_path):
    # the README's `train_*.jsonl.gz` puts train_10 before train_2 where the procedure lists 0..10: the same files in
    # another order read the corpus in another order, another run; the message says that that is the difference
    save, files = tmp_path / "ck", [corpus["train_0"], corpus["train_1"]]
    common = ("--max_steps", "2", "--eval_every", "2", "--cache_dir", tmp_path / "cache")
    train(corpus, save, *common, "--train_paths", *files)
    r = train(corpus, save, *common, "--train_paths", *files[::-1], check=False)
    line = assert_one_line_error(r, "a run of this command with its files in another order",
                                 "give the files in that run's order (its run.json) with --resume auto", code=2)
    assert "another run's checkpoints" not in line
    train(corpus, save, *common, "--train_paths", *files, "--max_steps", "3", "--resume", "auto")  # the advice works


def test_the_same_command_again_and_overwrites_get_advice_that_works(corpus, tmp_path):
    save, cache = tmp_path / "ck", tmp_path / "cache"
    first = ("--max_steps", "2", "--eval_every", "2", "--log_every", "1", "--cache_dir", cache)
    train(corpus, save, *first)
    # the same command again after it finished: that run, done, not "another run's checkpoints" nor a crash
    r = train(corpus, save, *first, check=False)
    line = assert_one_line_error(r, "this same command, which finished (final_step_2.pt)",
                                 "a larger --max_steps plus --resume auto", "--overwrite", code=2)
    assert "another run" not in line and "stopped before its end" not in line
    # ... and after a crash, whose newest checkpoint is a step_N.pt: the same run, to be continued
    (save / "final_step_2.pt").rename(save / "step_2.pt")
    r = train(corpus, save, *first, check=False)
    line = assert_one_line_error(r, "this same command", "stopped before its end",
                                 "the same command plus --resume auto", "--overwrite", code=2)
    assert "another run" not in line
    (save / "step_2.pt").rename(save / "final_step_2.pt")
    # a resume whose --max_steps is below the checkpoint's step would train nothing: refused, and nothing rewritten
    files = lambda: {p.name: p.read_bytes() for p in save.iterdir() if p.is_file() and p.name != ".lock"}
    before = files()
    r = train(corpus, save, *first[2:], "--max_steps", "1", "--resume", "auto", check=False)
    assert_one_line_error(r, "--max_steps 1 is below the step of", "final_step_2.pt (2)", "it was started with 2",
                          code=2)
    assert files() == before
    # each --overwrite keeps the replaced run: from the second on, the log says how many and how to delete them
    r = train(corpus, save, *first, "--overwrite")
    assert "rm -r" not in r.stdout
    # the advice after a failure drops --overwrite (with it, --resume auto is refused: "choose one")
    r = train_limited(100_000, corpus, save, *map(str, first), "--overwrite")  # a checkpoint is 0.8 MB: it fails
    assert_one_line_error(r, "without --overwrite, plus --resume auto", code=1)
    assert "2 such folders" in r.stdout and f"rm -r {save}.replaced-*" in r.stdout


def test_resume_auto_says_starting_from_scratch_only_when_it_does(capsys, corpus, tmp_path):
    save = tmp_path / "ck"
    save.mkdir()
    (save / "step_4.pt").write_bytes(b"PK" + bytes(100))  # unreadable: skipped, and then the folder is refused
    code, out, err = run_in_process(capsys, "--train_paths", corpus["train_0"], "--valid_paths", corpus["validation_0"],
                                    "--save_dir", str(save), "--resume", "auto")
    assert code == 2 and "no readable checkpoint" in err and "starting from scratch" not in out + err, out + err


def test_a_validation_file_without_documents_is_told_before_the_training_corpus_is_tokenized(capsys, corpus,
                                                                                               tmp_path):
    empty = tmp_path / "validation_0.jsonl"
    empty.write_text("not json\n")
    code, out, err = run_in_process(capsys, "--train_paths", corpus["train_0"], "--valid_paths", str(empty),
                                    "--save_dir", str(tmp_path / "ck"), "--cache_dir", str(tmp_path / "cache"))
    assert code == 2 and "no readable documents" in err and str(empty) in err, out + err
    assert "train: building" not in out, out


# Ctrl-C (a KeyboardInterrupt) in the middle of tokenizing the corpus into the cache
CTRL_C_WHILE_TOKENIZING = """
import runpy, sys
from trm.tokenizer import Tokenizer
def interrupted(*a, **k):
    raise KeyboardInterrupt
Tokenizer.encode_batch = interrupted
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_while_the_token_cache_builds_is_one_line(corpus, tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", CTRL_C_WHILE_TOKENIZING, str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths",
           corpus["train_0"], "--valid_paths", corpus["validation_0"], "--save_dir", str(tmp_path / "ck"),
           "--cache_dir", str(cache), "--max_steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "interrupted while tokenizing", "same command", code=130)
    assert not list(cache.glob("*.tmp.*")) and not list(cache.glob("*.bin"))


def test_a_corpus_shorter_than_one_window_is_pointed_out(corpus, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "猫です。"}\n', encoding="utf-8")  # 14 tokens, windows of 33
    r = train(corpus, tmp_path / "ck", "--max_steps", "1", "--eval_every", "1", "--train_paths", str(small))
    assert "less than one window of 33: each window repeats it about 2 times" in r.stdout, r.stdout


# The CPU allocator's failure (a RuntimeError, not MemoryError) in the first training step
NO_MEMORY = """
import runpy, sys
import trm.model
def forward(*a, **k):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)")
trm.model.TRM.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_batch_too_big_for_memory_on_cpu_is_one_line_naming_the_flags(corpus, tmp_path):
    cmd = [sys.executable, "-c", NO_MEMORY, str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"],
           "--valid_paths", corpus["validation_0"], "--save_dir", str(tmp_path / "ck"), "--max_steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "CPU out of memory", "21.5 GB", "--batch_size", code=1)
