"""Several processes (torchrun, gloo on CPU): one writer, one lock, exact resume, and a lost rank ends the run cleanly.

The same-global-batch equality of two processes and one is in test_train.py; these are the run's other promises.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from test_metrics import scalars
from trainer_run import ROOT, TINY, copy_run_until, endless_trainer, logged, logged_losses, params
from trm.checkpoint import load_checkpoint
from trm.metrics import tensorboard_missing

pytestmark = pytest.mark.slow


# Every rank but 0 records, outside the save dir, each file it opens for writing, renames, links, creates or deletes
# inside it; its first line says the hook loaded in that rank (without it, an empty record would prove nothing).
RECORDER = textwrap.dedent('''
    import builtins, io, os, shutil
    if os.environ.get("RANK", "0") != "0":
        save_dir, log = os.path.realpath(os.environ["WATCH_DIR"]), os.environ["WATCH_LOG"]
        _open = builtins.open
        with _open(log, "a") as f:
            f.write(f"{os.environ['RANK']} loaded\\n")
        def note(what, path):
            path = os.path.realpath(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
            if isinstance(path, str) and path.startswith(save_dir):
                with _open(log, "a") as f:
                    f.write(f"{os.environ['RANK']} {what} {path}\\n")
        def wrap(module, name, what, arg=0, writes=lambda *a, **k: True):
            real = getattr(module, name)
            def hooked(*a, **k):
                if writes(*a, **k):
                    note(what, a[arg] if len(a) > arg else k.get("dst", k.get("path", k.get("file"))))
                return real(*a, **k)
            setattr(module, name, hooked)
        opens_for_writing = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")
        wrap(builtins, "open", "open", writes=opens_for_writing)
        wrap(io, "open", "open", writes=opens_for_writing)  # pathlib's write_text and open
        wrap(os, "open", "open", writes=lambda path, flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        for name in ("replace", "rename", "link", "symlink"):
            wrap(os, name, name, arg=1)
        for name in ("remove", "unlink", "rmdir", "mkdir", "makedirs"):
            wrap(os, name, name)
        wrap(shutil, "rmtree", "rmtree")
''')


def torchrun(corpus, save_dir, *extra, port, nproc=2, env=None, popen=False, launch=None):
    """The trainer on the tiny corpus under torchrun: `nproc` processes on one node, or torchrun's own flags
    `launch`."""
    launch = launch or ["--nproc_per_node", str(nproc), "--master_port", str(port)]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(ROOT / "train_trm_lm.py"), *TINY,
           "--train_paths", corpus["train_0"], corpus["train_1"],
           "--valid_paths", corpus["validation_0"], "--save_dir", str(save_dir), "--batch_size", "2", "--dropout",
           "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def interrupt(proc, at, act):
    """The output of a torchrun started with popen=True: read until a line that starts with `at`, act(), then the
    rest (the launcher killed if anything fails)."""
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(at):
                break
        act()
        out.append(proc.communicate(timeout=120)[0])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return "".join(out)


def rank_pid(proc, rank):
    """The pid of rank 0 or 1 of a 2-process torchrun: the older or the younger of its two workers."""
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "train_trm_lm.py"], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) == 2, ranks
    return sorted(map(int, ranks))[rank]


def test_only_rank_0_writes_checkpoints_metrics_curves_and_run_json(corpus, tmp_path):
    hook, save, log = tmp_path / "hook", tmp_path / "ck", tmp_path / "writes_by_other_ranks.txt"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RECORDER)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WATCH_DIR": str(save), "WATCH_LOG": str(log)}
    tensorboard = ["--tensorboard", str(tmp_path / "tb")] if tensorboard_missing() is None else []
    r = torchrun(corpus, save, "--max_steps", "6", "--eval_every", "2", "--log_every", "2", "--keep_last", "1",
                 *tensorboard, port=29541, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert log.read_text().splitlines() == ["1 loaded"]  # the hook ran in rank 1, which touched nothing in save_dir
    if tensorboard:  # one event file (a writer per process would make one each), holding every log step
        assert len(list((tmp_path / "tb").iterdir())) == 1
        assert [step for step, _ in scalars(tmp_path / "tb")["train/loss"]] == [2, 4, 6]
    # rank 0 did write them all, once each
    names = {p.name for p in save.iterdir()}
    assert {"metrics.jsonl", "run.json", "best.pt", "final_step_6.pt"} <= names and any(n.endswith(".png")
                                                                                       for n in names)
    history = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    keys = [(h["step"], h["kind"]) for h in history if h["kind"] in ("train", "eval")]
    assert len(keys) == len(set(keys)), keys
    # pruning ran once, on rank 0: the newest interval checkpoint only (step_4; step_2 pruned), plus best and final
    assert not (save / "step_2.pt").exists() and (save / "step_4.pt").exists()
    assert not [n for n in names if ".tmp" in n]


@pytest.mark.parametrize("dropout,port", [("0", 29542), ("0.1", 29552)])
def test_a_two_process_run_resumes_bit_identically(corpus, tmp_path, dropout, port):
    # with dropout each rank draws its own noise: the checkpoint keeps every rank's generators, not rank 0's alone
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--max_steps", "8", "--eval_every", "4", "--log_every", "2", "--dropout", dropout]
    r = torchrun(corpus, straight, *common, port=port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Warning" not in r.stdout + r.stderr, r.stderr  # (torch 2.13's DDP warned of a renamed flag, per rank)
    copy_run_until(straight, resumed, 4)
    r = torchrun(corpus, resumed, *common, "--resume", "auto", port=port + 1)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = straight / "final_step_8.pt", resumed / "final_step_8.pt"
    for key in ("model", "ema"):
        pa, pb = params(a, key), params(b, key)
        assert all(torch.equal(pa[k], pb[k]) for k in pa), key
    assert logged_losses(straight) == logged_losses(resumed)
    # the finished run resumed once more: every rank leaves at once, rank 0 says why in one line, nothing is rewritten
    written = a.stat().st_mtime_ns
    r = torchrun(corpus, straight, *common, "--resume", "auto", port=port + 40)
    assert r.returncode == 0 and r.stdout.count("nothing to train") == 1, r.stdout + r.stderr
    assert "error" not in (r.stdout + r.stderr).lower() and a.stat().st_mtime_ns == written


def test_a_locked_save_dir_refuses_every_rank_at_once(corpus, tmp_path):
    save = tmp_path / "ck"
    live = subprocess.Popen(endless_trainer(corpus, save), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in live.stdout:  # the single-process trainer holds the lock once it trains
            if line.startswith("step"):
                break
        t0 = time.time()
        r = torchrun(corpus, save, "--max_steps", "4", "--resume", "auto", port=29544)
        assert r.returncode != 0 and time.time() - t0 < 120  # no rank left waiting at a barrier
        errors = {line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")}
        assert len(errors) == 1 and f"another trainer (pid {live.pid})" in errors.pop(), r.stdout + r.stderr
        assert not [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("[rank")]  # tracebacks
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("rank,port", [(1, 29545), (0, 29575)])
def test_a_rank_that_dies_ends_the_run_with_one_line_and_a_usable_checkpoint(corpus, tmp_path, rank, port):
    # rank 1 lost: rank 0 says it; rank 0 lost (the one that saves and speaks): rank 1 says it instead
    save = tmp_path / "ck"
    proc = torchrun(corpus, save, "--max_steps", "100000", "--eval_every", "5", "--log_every", "1", port=port,
                    popen=True)
    text = interrupt(proc, "step     10/", lambda: os.kill(rank_pid(proc, rank), signal.SIGKILL))  # past a checkpoint
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--resume auto" in errors[0], text
    assert not [line for line in text.splitlines() if line.startswith("[rank")], text  # no trainer traceback
    saved = sorted(save.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    assert saved, text
    step = load_checkpoint(saved[-1])["step"]
    r = torchrun(corpus, save, "--max_steps", str(step + 2), "--eval_every", "100000", "--resume", "auto",
                 port=port + 1)
    assert r.returncode == 0 and f"resuming from {saved[-1]}" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("how", ["ctrl-c in the terminal", "SIGTERM to rank 1 alone"])
def test_a_signal_saves_every_ranks_step_and_the_run_resumes(corpus, tmp_path, how):
    # Ctrl-C: the terminal sends SIGINT to torchrun, which passes it on to its workers (their own session). SIGTERM to
    # one worker (one node of several pre-empted): the others hear of it when they agree on stopping. Either way every
    # rank stops at the same step and rank 0 saves it as an interrupted step (not a final one).
    save = tmp_path / "ck"
    proc = torchrun(corpus, save, "--max_steps", "100000", "--eval_every", "100000", "--log_every", "1", port=29547,
                    popen=True)
    text = interrupt(proc, "step      6/", lambda: os.killpg(proc.pid, signal.SIGINT) if how == "ctrl-c in the terminal"
                     else os.kill(rank_pid(proc, 1), signal.SIGTERM))
    assert proc.returncode != 0  # (torchrun's own: it was interrupted)
    stopped = re.search(r"interrupted at step (\d+): saved (\S+); continue with the same command plus --resume auto",
                        text)
    # rank 0 says "interrupted" although the signal reached rank 1 alone; no trainer traceback
    assert stopped and "[rank" not in text and "done:" not in text, text
    step = int(stopped[1])
    assert load_checkpoint(stopped[2])["step"] == step and not list(save.glob("final_step_*.pt"))
    r = torchrun(corpus, save, "--max_steps", str(step + 2), "--eval_every", "100000", "--log_every", "1",
                 "--resume", "auto", port=29548)
    assert r.returncode == 0 and f"resuming from {stopped[2]}" in r.stdout, r.stdout + r.stderr
    assert [h["step"] for h in logged(save, "train")][-3:] == [step, step + 1, step + 2]


def test_two_nodes_through_the_rendezvous_train_as_one_node_does(corpus, tmp_path):
    # the README's multi-node command as written (c10d rendezvous, the same command on every node), with two nodes of
    # one process each on this host: the same global batch, so the same run as two processes on one node
    common = ["--max_steps", "4", "--eval_every", "2", "--log_every", "1", "--dropout", "0.1"]
    r = torchrun(corpus, tmp_path / "one", *common, port=29561)
    assert r.returncode == 0, r.stdout + r.stderr
    launch = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:29563",
              "--rdzv_id", f"trm_{tmp_path.name}"]
    nodes = [torchrun(corpus, tmp_path / "two", *common, port=None, launch=launch, popen=True) for _ in range(2)]
    try:
        outs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "".join(outs)
    assert "Warning" not in "".join(outs), "".join(outs)
    assert sum("done: 4 steps" in out for out in outs) == 1  # rank 0 alone reports, on whichever node it is
    a, b = tmp_path / "one" / "final_step_4.pt", tmp_path / "two" / "final_step_4.pt"
    for key in ("model", "ema"):
        pa, pb = params(a, key), params(b, key)
        assert all(torch.equal(pa[k], pb[k]) for k in pa), key
    assert logged_losses(tmp_path / "one") == logged_losses(tmp_path / "two")


def test_a_two_process_run_continues_on_one_process_at_the_same_global_batch(corpus, tmp_path):
    # the README's promise: resume with another number of GPUs at the same global batch (here 2 x 2 -> 1 x 4): the
    # same windows in the same order, so the same run up to float rounding (the all-reduce sums in another order)
    common = ["--max_steps", "8", "--eval_every", "4", "--log_every", "2", "--dropout", "0"]
    r = torchrun(corpus, tmp_path / "two", *common, port=29565)  # (its own --batch_size 2)
    assert r.returncode == 0, r.stdout + r.stderr
    copy_run_until(tmp_path / "two", tmp_path / "then_one", 4)
    one = [sys.executable, str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"], corpus["train_1"],
           "--valid_paths", corpus["validation_0"], "--batch_size", "4", *common]
    r = subprocess.run([*one, "--save_dir", str(tmp_path / "then_one"), "--resume", "auto"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    a, b = params(tmp_path / "two" / "final_step_8.pt"), params(tmp_path / "then_one" / "final_step_8.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert load_checkpoint(tmp_path / "then_one" / "final_step_8.pt")["loader"]["cursor"] == 8 * 4


def test_a_device_the_machine_lacks_is_one_line_not_one_per_process(corpus, tmp_path):
    # each process of a machine asks for the same device: its first says why (two processes printed it twice)
    r = torchrun(corpus, tmp_path / "ck", "--max_steps", "2", "--device", "cuda:99", port=29569)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1 and "--device cuda" in errors[0], r.stdout + r.stderr
    assert not [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("[rank")]


def test_the_same_verdict_on_every_rank_is_one_line(corpus, tmp_path):
    # a flag refused, or a resume refused by its checkpoint, is the same on every rank: one line, not one a process
    for extra in (["--max_steps", "2", "--compile", "whole"], ["--max_steps", "2", "--lr", "-1"]):
        r = torchrun(corpus, tmp_path / "ck", *extra, port=29571)
        errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
        assert r.returncode != 0 and len(errors) == 1, r.stdout + r.stderr


def test_a_halting_checkpoint_resumes_under_ddp_without_act_weight(corpus, tmp_path):
    # no loss reaches the halting head without --act_weight: DDP, waiting for its gradient, ended the run at the next
    # step with a traceback from every rank. One process trains on with the head as it was; so do two now
    common = ["--eval_every", "100", "--log_every", "1"]
    r = torchrun(corpus, tmp_path / "ck", "--max_steps", "2", "--act_weight", "0.1", *common, port=29572)
    assert r.returncode == 0, r.stdout + r.stderr
    head = {k: v for k, v in params(tmp_path / "ck" / "final_step_2.pt").items() if k.startswith("halt.")}
    r = torchrun(corpus, tmp_path / "ck", "--max_steps", "4", "--resume", "auto", *common, port=29573)
    assert r.returncode == 0, r.stdout + r.stderr
    after = params(tmp_path / "ck" / "final_step_4.pt")
    assert head and all(torch.equal(after[k], v) for k, v in head.items())
