"""trm/device.py: the one place that picks the device; a --device that names none is one line in every script."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from trainer_run import TINY, make_corpus
from trm.device import pick_device, start_processes

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
