"""trm/metrics.py: --tensorboard writes the numbers of metrics.jsonl, and a resumed run hides what it replaces."""
import json

import numpy as np
import pytest

from trm import metrics
from trm.metrics import MetricsLog

TRAIN = [{"step": s, "kind": "train", "loss": 5.0 - s / 10, "lr": 1e-3 * s, "tok_s": 1000.0 + s, "tokens_seen": 64 * s,
          "epoch": s / 40, "train_seconds": 0.5 * s} for s in (2, 4, 6, 8)]
EVAL = [{"step": s, "kind": "eval", "loss": 4.0 - s / 10, "bits_per_byte": 1.5 - s / 100, "perplexity": 50.0,
         "halt_accuracy": 0.7, "tokens_seen": 64 * s, "train_seconds": 0.5 * s} for s in (4, 8)]


def f32(x):
    """TensorBoard keeps scalars as float32."""
    return float(np.float32(x))


def scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard events in `folder`, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


needs_tensorboard = pytest.mark.skipif(metrics.tensorboard_missing() is not None,
                                       reason="tensorboard is not installed (requirements-test.txt)")


@needs_tensorboard
def test_every_number_of_metrics_jsonl_becomes_a_scalar(tmp_path):
    log = MetricsLog(str(tmp_path), "t", tensorboard_dir=str(tmp_path / "tb"))
    log.start()
    for entry in sorted(TRAIN + EVAL, key=lambda h: h["step"]):
        log.append(entry)
    got = scalars(tmp_path / "tb")
    assert set(got) == {f"train/{k}" for k in TRAIN[0] if k not in ("step", "kind")} | \
        {f"eval/{k}" for k in EVAL[0] if k not in ("step", "kind")}
    assert got["train/loss"] == [(h["step"], f32(h["loss"])) for h in TRAIN]
    assert got["train/lr"] == [(h["step"], f32(h["lr"])) for h in TRAIN]
    assert got["eval/bits_per_byte"] == [(h["step"], f32(h["bits_per_byte"])) for h in EVAL]
    assert got["eval/halt_accuracy"] == [(4, f32(0.7)), (8, f32(0.7))]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [2, 4, 4, 6, 8, 8]


@needs_tensorboard
def test_a_resumed_run_hides_the_steps_it_logs_again(tmp_path):
    log = MetricsLog(str(tmp_path), "t", tensorboard_dir=str(tmp_path / "tb"))
    log.start()
    for entry in TRAIN:  # steps 2..8; the run then resumes from its checkpoint of step 4
        log.append(entry)
    log.tensorboard.close()
    log = MetricsLog(str(tmp_path), "t", tensorboard_dir=str(tmp_path / "tb"))
    log.start(resume_step=4)
    log.append(dict(TRAIN[2], loss=9.0))  # step 6 again, another loss
    assert scalars(tmp_path / "tb")["train/loss"] == [(2, f32(4.8)), (4, f32(4.6)), (6, 9.0)]


def test_without_tensorboard_nothing_is_written_and_the_flag_is_refused_in_one_line(tmp_path, monkeypatch):
    log = MetricsLog(str(tmp_path), "t")
    log.start()
    log.append(TRAIN[0])
    assert log.tensorboard is None and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)  # `import tensorboard` now fails
    assert metrics.tensorboard_missing() == "--tensorboard needs the tensorboard package: pip install tensorboard"


def test_the_curves_are_redrawn_at_most_once_a_minute_and_whenever_forced(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    log = MetricsLog(str(tmp_path), "t")
    log.start()
    drawn = []  # the entries each drawing held
    monkeypatch.setattr(log, "draw", lambda: drawn.append(len(log.history)))

    def after(seconds, entry=None, force=False):
        now[0] += seconds
        if entry is not None:
            log.append(entry)
        log.plot(force)

    after(0, TRAIN[0])                 # the first drawing at once
    after(30, TRAIN[1])                # half a minute later: not yet
    after(29.9, EVAL[0])
    assert drawn == [1]
    after(0.1, TRAIN[2])               # a minute after the last drawing
    after(0.1, force=True)             # forced, but nothing new to draw
    after(0.1, TRAIN[3], force=True)   # the end of a run: drawn whatever the time
    assert drawn == [1, 4, 5]
    monkeypatch.undo()
    log.plot(force=True)  # (nothing new: drawn already)
    assert not (tmp_path / "training_curves.png").exists()
    log.append(EVAL[1])
    log.plot(force=True)
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_full_disk_leaves_whole_lines_and_the_error_names_the_file(tmp_path):
    # the kernel's file-size limit stands in for a full disk: a write across it is cut short, the next one fails,
    # as a disk that fills up in the middle of a line does (seen: a run that died so left `{"step": 88, "kind": ...`)
    import resource
    import signal
    log = MetricsLog(str(tmp_path), "t")
    log.start()
    log.append(TRAIN[0])
    before = (tmp_path / "metrics.jsonl").read_bytes()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 20, limits[1]))  # room for 20 bytes of the next line
    try:
        with pytest.raises(OSError) as e:
            log.append(TRAIN[1])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # no partial line
    assert e.value.filename == str(tmp_path / "metrics.jsonl")  # the trainer's one-line error names it


def test_warm_up_evaluations_are_drawn_apart_from_the_full_depth_ones(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    shallow = [dict(h, eval_depth={"deep_steps": 1}) for h in EVAL[:1]]
    log = MetricsLog(str(tmp_path), "t", "validation loss")
    log.history = sorted(TRAIN + shallow + EVAL[1:], key=lambda h: h["step"])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the drawing to read its lines
    log.draw()
    lines = {line.get_label(): list(line.get_xdata()) for line in figures[0].axes[0].get_lines()}
    assert lines == {"train loss": [2, 4, 6, 8], "validation loss": [8],
                     "validation loss, warm-up (1 deep step)": [4]}


def test_an_abandoned_stretch_keeps_its_log_beside_its_checkpoints(tmp_path):
    log = MetricsLog(str(tmp_path), "t")
    log.start()
    for entry in TRAIN:
        log.append(entry)
    (tmp_path / "abandoned_after_step_4").mkdir()  # a resume from step 4 moved the later checkpoints there
    MetricsLog(str(tmp_path), "t").start(resume_step=4)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    aside = [json.loads(line)["step"] for line in open(tmp_path / "abandoned_after_step_4" / "metrics.jsonl")]
    assert steps == [2, 4] and aside == [2, 4, 6, 8]
    MetricsLog(str(tmp_path), "t").start(resume_step=2)  # (nothing moved aside: the stretch after 2 is dropped)
    assert not (tmp_path / "abandoned_after_step_2").exists()
