"""Checkpoints and the save dir under conditions the other tests do not reach: folder names with glob characters,
files beside the checkpoints that only look like them, leftovers of a killed trainer whose pid comes back (a
container restarted), a best.pt that missed its update, and a foreign checkpoint's odd version field."""
import errno
import os

import pytest
import torch

from trm import run_dir as run_dir_module
from trm.atomic import tmp_name
from trm.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, prune_checkpoints,
                            save_checkpoint)
from trm.run_dir import RunDir, SaveDirError, find_checkpoint, move_aside, take_ownership


def state(step, run_id="r1"):
    return {"step": step, "model": {"w": torch.arange(4.0) + step}, "optimizer": {}, "config": {}, "loader": {},
            "rng": {}, "tokens_seen": step, "run_id": run_id}


def test_a_save_dir_with_glob_characters_is_seen_for_what_it_holds(tmp_path):
    # "runs/lr[3e-4]" was read as a glob pattern: no checkpoints found, so --resume auto started from scratch over
    # the run's files, a fresh run was not refused, and --keep_last never pruned
    save = tmp_path / "lr[3e-4]"
    for step in (2, 4, 6):
        save_checkpoint(state(step), str(save / f"step_{step}.pt"))
    assert [os.path.basename(p) for p in list_checkpoints(str(save))] == ["step_6.pt", "step_4.pt", "step_2.pt"]
    assert find_checkpoint(str(save), "auto", print)[0]["step"] == 6
    with pytest.raises(SaveDirError, match="holds"):
        take_ownership(str(save), None, None, None, False, print)
    assert [os.path.basename(p) for p in prune_checkpoints(str(save), 2)] == ["step_2.pt"]
    os.makedirs(save / "abandoned_after_step_4")
    moved, dest = move_aside(str(save))
    assert "abandoned_after_step_4" in moved and os.path.isdir(os.path.join(dest, "abandoned_after_step_4"))


def test_pruning_leaves_files_that_only_look_like_checkpoints(tmp_path):
    # a user's copy kept beside the run ("step_4_good.pt") counted as the oldest step file and was deleted first
    for step in (2, 4, 6):
        save_checkpoint(state(step), str(tmp_path / f"step_{step}.pt"))
    save_checkpoint(state(4), str(tmp_path / "step_4_good.pt"))
    prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["step_4_good.pt", "step_6.pt"]
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_6.pt"]


def test_best_pt_never_writes_through_a_leftover_link_to_another_checkpoint(tmp_path):
    # a trainer killed between os.link and os.replace leaves best.pt.tmp.<host>.<pid> as a second name of a
    # checkpoint; a restarted container's trainer gets the same host and pid, so the link is not "stale", and the
    # copy fallback truncated and rewrote that checkpoint's inode: step_4.pt then held step 8
    save = tmp_path / "ck"
    run = RunDir(str(save), 0, lambda line: None)
    run.save(state(4), "step_4.pt", val_loss=2.0)
    os.link(save / "step_4.pt", tmp_name(str(save / "best.pt")))
    run.save(state(8), "step_8.pt", val_loss=1.0)
    assert load_checkpoint(save / "step_4.pt")["step"] == 4
    assert load_checkpoint(save / "best.pt")["step"] == 8
    assert sorted(os.listdir(save)) == ["best.pt", "step_4.pt", "step_8.pt"]


def test_best_pt_that_missed_its_update_is_set_right_by_the_resumed_run(tmp_path, monkeypatch):
    # step_8.pt records itself as the best, but the run stopped before best.pt followed (a kill between the two
    # renames, or the copy fallback on a full disk); the resumed run took the record as done and best.pt stayed
    # step 4's weights, which export and generate.py then used
    save = tmp_path / "ck"
    run = RunDir(str(save), 0, lambda line: None)
    run.save(state(4), "step_4.pt", val_loss=2.0)

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_dir_module, "link_best", disk_full)
    with pytest.raises(SaveDirError, match="No space left"):
        run.save(state(8), "step_8.pt", val_loss=1.0)
    monkeypatch.undo()
    resumed = load_checkpoint(save / "step_8.pt")
    assert resumed["best"] == {"loss": 1.0, "step": 8}
    run = RunDir(str(save), 0, lambda line: None, str(save / "step_8.pt"), resumed["best"])
    run.save(state(12), "step_12.pt", val_loss=1.5)  # not an improvement
    assert load_checkpoint(save / "best.pt")["step"] == 8


def test_a_version_field_of_another_type_is_one_line(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"format": "generative-trm", "version": "2"}, path)
    with pytest.raises(CheckpointError, match="version") as e:
        load_checkpoint(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
