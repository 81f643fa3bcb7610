"""trm/saver.py: checkpoints written by a background thread are those of the step they name, whole or absent, and a
failed write is the one-line error it always was."""
import errno
import signal
import subprocess
import sys
import threading

import pytest
import torch

from trainer_run import ROOT, TINY, logged_losses
from trm import run_dir as run_dir_module
from trm.checkpoint import load_checkpoint
from trm.ema import EMA
from trm.model import TRM, TRMConfig
from trm.run_dir import RunDir, SaveDirError
from trm.saver import Saver


class Trainer:
    """A tiny model, its AdamW and EMA, stepped in place as the training loop does."""

    def __init__(self, device="cpu", tie_embeddings=False):
        torch.manual_seed(0)
        self.device = device
        cfg = TRMConfig(vocab_size=64, d_model=32, n_heads=2, max_seq_len=16, dropout=0.0,
                        tie_embeddings=tie_embeddings)
        self.model = TRM(cfg).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, fused=device == "cuda")
        self.ema = EMA(self.model, 0.9)
        self.steps = 0

    def step(self, n=1):
        for _ in range(n):
            x = torch.randint(0, 64, (2, 16), device=self.device)
            _, loss = self.model(x, x)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.model)
            self.steps += 1

    def state(self):
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.steps, "rng": {"torch": torch.get_rng_state()},
                "args": {"lr": 1e-2}}


def tensors(x, prefix=""):
    """{path: a CPU copy of the tensor} over a nested checkpoint state."""
    if isinstance(x, torch.Tensor):
        return {prefix: x.detach().cpu().clone()}
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def held_writer(monkeypatch):
    """The writer thread waits for `release` before it writes a file; `started` is set once it is waiting."""
    real = run_dir_module.save_checkpoint
    started, release = threading.Event(), threading.Event()

    def held(state, path):
        started.set()
        assert release.wait(60), "the test never released the writer"
        return real(state, path)

    monkeypatch.setattr(run_dir_module, "save_checkpoint", held)
    yield started, release
    release.set()


def saver_in(path, log=None):
    lines = [] if log is None else log
    return Saver(RunDir(str(path), 2, lines.append), lines.append), lines


def test_the_snapshot_is_the_step_named_in_the_file_not_what_the_thread_found(tmp_path, held_writer):
    started, release = held_writer
    t = Trainer()
    t.step(2)
    at_step_2 = tensors(t.state())
    saver, _ = saver_in(tmp_path)
    path = saver.save(t.state(), "step_2.pt")
    assert started.wait(60)
    t.step(3)  # the weights, EMA and Adam moments change in place while the file is not yet written
    assert not torch.equal(t.model.state_dict()["embed.weight"], at_step_2["/model/embed.weight"])
    release.set()
    saver.close()
    assert load_checkpoint(path)["step"] == 2
    saved = tensors(load_checkpoint(path))
    assert_same({k: saved[k] for k in at_step_2}, at_step_2)


def test_the_background_file_is_the_one_the_training_thread_would_have_written(tmp_path):
    t = Trainer(tie_embeddings=True)  # a tied matrix must stay one storage, as torch.save keeps it
    t.step(2)
    RunDir(str(tmp_path / "sync"), 2, print).save(t.state(), "step_2.pt")
    saver, _ = saver_in(tmp_path / "async")
    saver.save(t.state(), "step_2.pt")
    saver.close()
    a, b = tmp_path / "sync" / "step_2.pt", tmp_path / "async" / "step_2.pt"
    raw = [torch.load(p, weights_only=True) for p in (a, b)]
    assert raw[0]["checksum"] == raw[1]["checksum"] and a.stat().st_size == b.stat().st_size
    model = raw[1]["model"]
    assert model["embed.weight"].data_ptr() == model["lm_head.weight"].data_ptr()


def test_buffers_are_reused_from_one_save_to_the_next(tmp_path):
    t = Trainer()
    t.step()
    saver, _ = saver_in(tmp_path)
    first = saver.snapshot(t.state())
    t.step()
    second = saver.snapshot(t.state())
    assert first["model"]["embed.weight"].data_ptr() == second["model"]["embed.weight"].data_ptr()
    assert len(saver.buffers) == len(tensors(t.state()))
    saver.close()


def test_one_write_in_flight_and_the_writers_lines_reach_the_log_on_the_training_thread(tmp_path, held_writer):
    started, release = held_writer
    threads = []
    saver, lines = saver_in(tmp_path)
    saver.log = lambda line: (threads.append(threading.current_thread()), lines.append(line))
    t = Trainer()
    t.step()
    saver.save(t.state(), "step_1.pt")
    assert started.wait(60)
    blocked = threading.Thread(target=saver.save, args=(t.state(), "step_2.pt"))  # waits for step_1.pt first
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive() and not (tmp_path / "step_1.pt").exists()
    release.set()
    blocked.join(60)
    saver.close()
    assert [p.name for p in sorted(tmp_path.glob("step_*.pt"))] == ["step_1.pt", "step_2.pt"]
    assert any("saved" in line and "step_1.pt" in line for line in lines)
    assert threads and "checkpoint-writer" not in {th.name for th in threads}


def test_a_failed_write_is_one_line_on_the_training_thread_and_the_last_good_checkpoint_survives(tmp_path, monkeypatch):
    t = Trainer()
    t.step()
    told = []
    saver = Saver(RunDir(str(tmp_path), 2, print), print, on_error=told.append)  # the trainer passes its fail()
    saver.save(t.state(), "step_1.pt")
    saver.wait()
    good = (tmp_path / "step_1.pt").read_bytes()

    def disk_full(state, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    t.step()
    saver.save(t.state(), "step_2.pt")  # returns at once: the failure comes later, between two steps
    saver.thread.join(60)
    saver.poll()
    assert len(told) == 1 and "\n" not in told[0], told
    assert "No space left on device" in told[0] and "Stopped at step 2" in told[0]
    assert f"the last good checkpoint {tmp_path / 'step_1.pt'} is intact" in told[0]
    assert (tmp_path / "step_1.pt").read_bytes() == good and not list(tmp_path.glob("*.tmp.*"))
    saver.close()
    saver, _ = saver_in(tmp_path)  # without on_error: a SaveDirError at the next save, poll or wait
    saver.save(t.state(), "step_3.pt")
    with pytest.raises(SaveDirError, match="No space left on device"):
        saver.wait()
    saver.close()


def test_abandoning_a_write_leaves_the_old_files_and_no_temporary_one(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = torch.save

    def stalls(obj, f, *a, **k):  # halfway through the file
        f.write(b"PK" + bytes(100))
        f.flush()
        started.set()
        release.wait(60)
        return real(obj, f, *a, **k)

    t = Trainer()
    saver, lines = saver_in(tmp_path)
    saver.save(t.state(), "step_0.pt")
    saver.wait()
    monkeypatch.setattr(torch, "save", stalls)
    t.step()
    saver.save(t.state(), "step_1.pt")
    assert started.wait(60) and list(tmp_path.glob("step_1.pt.tmp.*"))
    saver.abandon()
    assert lines[-1] == f"abandoned writing {tmp_path / 'step_1.pt'}; the last good checkpoint " \
                        f"{tmp_path / 'step_0.pt'} is intact"
    assert not list(tmp_path.glob("*.tmp.*")) and load_checkpoint(tmp_path / "step_0.pt")["step"] == 0
    release.set()  # the abandoned thread's failure to rename is nobody's news
    saver.close()
    assert not (tmp_path / "step_1.pt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_state_is_copied_to_reused_pinned_buffers_at_the_step(tmp_path, held_writer):
    started, release = held_writer
    t = Trainer("cuda")
    t.step(2)
    at_step_2 = tensors(t.state())
    saver, _ = saver_in(tmp_path)
    path = saver.save(t.state(), "step_2.pt")
    assert started.wait(60)
    assert all(b.is_pinned() for k, b in saver.buffers.items() if k[0] in ("model", "ema"))
    pointers = {k: b.data_ptr() for k, b in saver.buffers.items()}
    t.step(3)
    release.set()
    saver.wait()
    saved = tensors(load_checkpoint(path))
    assert_same({k: saved[k] for k in at_step_2}, at_step_2)
    saver.save(t.state(), "step_5.pt")
    assert {k: b.data_ptr() for k, b in saver.buffers.items()} == pointers  # no new pinned allocation
    saver.close()
    assert load_checkpoint(tmp_path / "step_5.pt")["step"] == 5
    assert_same(tensors(load_checkpoint(tmp_path / "step_5.pt")["model"]), tensors(t.model.state_dict()))


# ---- the trainer, killed or interrupted while a checkpoint is being written -----------------------------------------

# The second checkpoint's file stops halfway, on the writer thread, until the process is killed; training goes on.
STALLED_WRITE = """
import runpy, sys, threading, torch
real, calls = torch.save, []
def save(obj, f, *a, **k):
    calls.append(1)
    if len(calls) == 2:
        f.write(b"PK" + bytes(1000))
        f.flush()
        print(f"stalled writing {f.name} on {threading.current_thread().name}", flush=True)
        threading.Event().wait()
    return real(obj, f, *a, **k)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def trainer_cmd(corpus, save_dir, *extra, stalled=False):
    wrap = ["-c", STALLED_WRITE] if stalled else []
    return [sys.executable, *wrap, str(ROOT / "train_trm_lm.py"), *TINY, "--train_paths", corpus["train_0"],
            corpus["train_1"], "--valid_paths", corpus["validation_0"], "--save_dir", str(save_dir),
            "--max_steps", "12", "--eval_every", "4", "--log_every", "1", "--dropout", "0.1", *extra]


def start_stalled(corpus, save_dir):
    """A trainer whose step_8.pt write has stalled halfway; returns (process, its temporary file, its output)."""
    proc = subprocess.Popen(trainer_cmd(corpus, save_dir, stalled=True), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(240, proc.kill)  # a loop that waited for the stalled write would never log step 10
    watchdog.daemon = True
    watchdog.start()
    out, tmp = [], None
    for line in proc.stdout:
        out.append(line)
        if line.startswith("stalled writing"):
            tmp = line.split()[2]
            assert line.split()[-1] == "checkpoint-writer" and tmp.endswith(f".{proc.pid}") and "step_8.pt.tmp." in tmp
        if tmp and line.startswith("step     10/12"):  # the loop trains on while the file is being written
            return proc, tmp, out
    proc.kill()
    raise AssertionError("".join(out))


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_background_write_resumes_bit_identically(corpus, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = subprocess.run(trainer_cmd(corpus, straight), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    proc, tmp, _ = start_stalled(corpus, killed)
    proc.kill()
    proc.wait()
    # the partial file is all there is of step 8: nothing broken under a checkpoint's name
    assert (killed / tmp.rsplit("/", 1)[1]).exists() and not (killed / "step_8.pt").exists()
    assert load_checkpoint(killed / "step_4.pt")["step"] == 4
    r = subprocess.run(trainer_cmd(corpus, killed, "--resume", "auto"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"removed {tmp}" in r.stdout and f"resuming from {killed / 'step_4.pt'}" in r.stdout
    a, b = load_checkpoint(straight / "final_step_12.pt"), load_checkpoint(killed / "final_step_12.pt")
    assert_same(tensors({k: a[k] for k in ("model", "ema", "optimizer")}),
                tensors({k: b[k] for k in ("model", "ema", "optimizer")}))
    assert logged_losses(straight) == logged_losses(killed)
    # step_8.pt of the straight run was written while steps 9.. ran: it holds step 8's weights all the same
    assert_same(tensors(load_checkpoint(straight / "step_8.pt")["model"]),
                tensors(load_checkpoint(killed / "step_8.pt")["model"]))


@pytest.mark.slow
def test_a_second_ctrl_c_abandons_the_write_in_flight_and_keeps_the_old_checkpoint(corpus, tmp_path):
    save = tmp_path / "ck"
    proc, tmp, out = start_stalled(corpus, save)
    proc.send_signal(signal.SIGINT)  # the first: stop after this step, then save (waiting for step_8.pt first)
    for line in proc.stdout:
        out.append(line)
        if "SIGINT received" in line:
            break
    proc.send_signal(signal.SIGINT)  # the second: give up the write
    out.append(proc.communicate(timeout=120)[0])
    out = "".join(out)
    # one line, not a traceback (a KeyboardInterrupt could surface inside torch.save: "RuntimeError: unexpected pos")
    assert proc.returncode == 130 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "interrupted twice" in errors[0] and "--resume auto" in errors[0], out
    assert f"abandoned writing {save / 'step_8.pt'}; the last good checkpoint {save / 'step_4.pt'} is intact" in out
    assert not list(save.glob("*.tmp.*")) and sorted(p.name for p in save.glob("step_*.pt")) == ["step_4.pt"]
    assert load_checkpoint(save / "step_4.pt")["step"] == 4
