"""trm/device.py: the one place that picks the device; a --device that names none is one line in every script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from trainer_run import TINY, make_corpus
from trm.device import bytecode_note, pick_device, start_processes

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_is_picked_when_asked():
    device, amp, why = pick_device("cpu", "auto")
    assert device.type == "cpu" and amp is None and "--device" in why


@pytest.mark.parametrize("script", ["train_trm_lm.py", "evaluate.py", "generate.py"])
def test_a_device_typo_is_one_line_naming_the_choices(tiny_checkpoint, tmp_path, script):
    corpus = make_corpus(tmp_path)
    extra = {"train_trm_lm.py": [*TINY, "--train_paths", corpus["train_0"], "--save_dir", str(tmp_path / "ck")],
             "evaluate.py": ["--model_path", tiny_checkpoint, "--data", corpus["validation_0"]],
             "generate.py": ["--model_path", tiny_checkpoint, "--prompt", "猫"]}[script]
    r = subprocess.run([sys.executable, str(ROOT / script), *extra, "--device", "gpu"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert_one_line_error(r, "--device must be one of auto, cuda, mps, cpu", "'gpu'", code=2)
    assert not (tmp_path / "ck").exists()  # before the save dir is touched


def test_a_device_this_machine_lacks_is_one_line(monkeypatch, capsys):
    # Apple's GPU on another machine, or a GPU number past the last: torch would fail later, with a traceback
    import torch
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        pick_device("mps")
    assert e.value.code == 2 and "--device mps was given but" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:
        pick_device("cuda:7", "fp32")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--device cuda:7: this machine has 1 GPU(s), cuda:0 to cuda:0" in err


def test_a_gpu_number_under_torchrun_is_one_line(monkeypatch, capsys):
    # each rank takes its LOCAL_RANK's GPU: a --device cuda:1 was silently ignored by every rank
    import torch
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as e:
        start_processes(torch.device("cuda", 1))
    assert e.value.code == 2 and "--device cuda:1 under torchrun" in capsys.readouterr().err


def test_the_bytecode_note_speaks_only_when_every_start_compiles_and_its_advice_works(tmp_path, monkeypatch):
    # torch without its bytecode (uv's default) and Python kept from writing it (PYTHONDONTWRITEBYTECODE, as container
    # images set): seconds at every start, which the log should name with the fix (an H100 host: 12.1 s against 3.6)
    import importlib.util
    import trm.device
    package = tmp_path / "fake_torch"
    package.mkdir()
    module = package / "__init__.py"
    module.write_text("x = 1\n")
    note = bytecode_note(str(module), dont_write=True)
    assert "PYTHONDONTWRITEBYTECODE is set" in note and f"compileall -q {package}" in note, note
    assert bytecode_note(str(module), dont_write=False) is None  # this start writes it
    monkeypatch.setattr(trm.device.os, "access", lambda path, mode: False)  # (a read-only install; root may write all)
    note = bytecode_note(str(module), dont_write=False)
    assert "is read-only" in note and "PYTHONPYCACHEPREFIX" in note, note
    monkeypatch.undo()
    # the advice, followed as written, with PYTHONDONTWRITEBYTECODE still set: the note is gone
    command = bytecode_note(str(module), dont_write=True).split("Write it once: ")[1].split(" (")[0]
    assert command.startswith("python -m compileall")
    r = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(importlib.util.cache_from_source(str(module)))
    assert bytecode_note(str(module), dont_write=True) is None
