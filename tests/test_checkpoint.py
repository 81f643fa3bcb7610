"""Behaviour of trm/checkpoint.py: atomic writes, every bad file a one-line CheckpointError, listing and pruning."""
import errno
import gzip
import io
import os
import pickle
import random

import pytest
import torch

from trm import atomic, checkpoint
from trm.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, load_model, prune_checkpoints,
                            same_weights, save_checkpoint)


def state(step=0):
    return {"step": step, "model": {"w": torch.arange(4.0) + step}}


def refused(path, *words):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    for w in words:
        assert w in message, message
    return message


# ---- atomic save --------------------------------------------------------------------------------------------------

def test_save_then_load_round_trip_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "run" / "step_3.pt"  # the directory is created
    save_checkpoint(state(3), str(path))
    assert os.listdir(path.parent) == ["step_3.pt"]
    loaded = load_checkpoint(str(path))
    assert loaded["format"] == "generative-trm" and loaded["step"] == 3
    assert torch.equal(loaded["model"]["w"], state(3)["model"]["w"])


def test_failing_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "step_1.pt"
    save_checkpoint(state(1), str(path))
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError), match="pickle"):
        # a lambda cannot be pickled: torch.save fails after it has started writing the temporary file
        save_checkpoint({**state(2), "bad": lambda: None}, str(path))
    assert os.listdir(tmp_path) == ["step_1.pt"]
    assert path.read_bytes() == before
    assert load_checkpoint(str(path))["step"] == 1


@pytest.mark.parametrize("err,when", [(errno.ENOSPC, "write"), (errno.EROFS, "open"), (errno.EACCES, "open")])
def test_write_failure_is_a_checkpoint_error_and_the_previous_one_is_intact(tmp_path, monkeypatch, err, when):
    path = tmp_path / "step_1.pt"
    save_checkpoint(state(1), str(path))
    before = path.read_bytes()
    real_open = open

    class FullDisk(io.FileIO):
        def write(self, b):
            if self.tell() + len(b) > 100:  # the disk fills up after 100 bytes of the new file
                raise OSError(err, os.strerror(err))
            return super().write(b)

    def failing_open(file, mode="r", *args, **kwargs):
        if ".tmp." not in str(file):
            return real_open(file, mode, *args, **kwargs)
        if when == "open":
            raise OSError(err, os.strerror(err), str(file))
        return FullDisk(file, "wb")

    monkeypatch.setattr(atomic, "open", failing_open, raising=False)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint({**state(2), "model": {"w": torch.zeros(10_000)}}, str(path))
    message = str(e.value)
    assert "\n" not in message and str(path) in message and os.strerror(err) in message
    assert "previous checkpoint is intact" in message
    assert os.listdir(tmp_path) == ["step_1.pt"]  # the partial temporary file is gone
    assert path.read_bytes() == before


# ---- every bad file is a CheckpointError with a reason ------------------------------------------------------------

def test_flipped_byte_in_a_tensor_is_refused(tmp_path):
    path = tmp_path / "step_4.pt"
    weights = torch.linspace(-1, 1, 1000)
    save_checkpoint({"step": 4, "model": {"w": weights}}, str(path))
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weights.numpy().tobytes())  # torch.save stores tensor bytes as they are
    assert at > 0
    data[at + 1603] ^= 0x40  # one byte of one float: -0.2 or so becomes a very different number
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weights)  # torch.load says nothing
    refused(path, "damaged", "checksum")


def test_checkpoint_without_checksum_still_loads(tmp_path):
    path = tmp_path / "old.pt"  # as written before checkpoints carried a checksum
    torch.save({"format": "generative-trm", "version": 1, "step": 7, "model": {"w": torch.ones(3)}}, path)
    loaded = load_checkpoint(str(path))
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.ones(3))


def test_checksum_covers_values_and_resaving_a_loaded_checkpoint_works(tmp_path):
    path = tmp_path / "step_1.pt"
    full = {"step": 1, "model": {"w": torch.arange(6, dtype=torch.bfloat16).view(2, 3)}, "rng": (3, (1, 2), None),
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}, "args": {"lr": 0.1, "name": "猫"}}
    save_checkpoint(full, str(path))
    loaded = load_checkpoint(str(path))
    assert "checksum" not in loaded and loaded["rng"] == (3, (1, 2), None)
    loaded["step"] = 2  # what a fixture or a tool does: load, change, save again
    save_checkpoint(loaded, str(path))
    assert load_checkpoint(str(path))["step"] == 2
    assert checkpoint.checksum({"a": 1}) != checkpoint.checksum({"a": 1.0}) != checkpoint.checksum({"a": "1"})


def test_missing_path_and_directory(tmp_path):
    refused(tmp_path / "missing.pt", "not found", "has no checkpoints")
    refused(tmp_path, "not a file")


def test_a_missing_checkpoint_names_the_ones_beside_it(tmp_path):
    # the procedure's command names final_step_50000.pt; a run stopped by --max_minutes wrote another final step
    for name in ("step_500.pt", "step_1000.pt", "final_step_1234.pt", "best.pt"):
        (tmp_path / name).write_bytes(b"")
    message = refused(tmp_path / "final_step_50000.pt", "not found")
    assert message.endswith(f"; {tmp_path} has final_step_1234.pt, best.pt, step_1000.pt"), message
    message = refused(tmp_path / "no_such_folder" / "final_step_50000.pt", "not found")
    assert " has " not in message, message  # no folder, nothing to list: the plain sentence


def test_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello world\n")  # the unpickler raises KeyError on it
    refused(path, "is a text file, not a PyTorch checkpoint")


def test_a_corpus_shard_or_an_exported_model_is_named_as_such(tmp_path):
    shard = tmp_path / "train_0.jsonl.gz"  # the unpickler's own words were "Unsupported operand 31"
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        f.write('{"text": "こんにちは"}\n')
    message = refused(shard, "is a gzip file (a corpus shard?), not a PyTorch checkpoint")
    assert "operand" not in message
    exported = tmp_path / "model.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    exported.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    refused(exported, "is a safetensors file (an exported model: generate.py and evaluate.py take its folder")


def test_one_byte_and_empty_file(tmp_path):
    one = tmp_path / "one.pt"
    one.write_bytes(b"\x80")  # a pickle PROTO opcode with no argument: IndexError inside the unpickler
    refused(one, "not a PyTorch checkpoint")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    refused(empty, "empty")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    data = random.Random(0).randbytes(4096)
    assert data[:1] not in (b"c", b"\x93")  # not a GLOBAL / STACK_GLOBAL opcode: that would be a (junk) global
    path.write_bytes(data)
    message = refused(path, "not a PyTorch checkpoint")
    assert "run code" not in message


def test_random_bytes_that_begin_like_a_pickle_give_the_error_alone(tmp_path, recwarn):
    # PROTO with a protocol number torch does not know: torch warns about it before failing, and a generate.py run
    # printed that warning (two lines of torch internals) above its one-line error; found by os.urandom in CI
    path = tmp_path / "random.pt"
    path.write_bytes(b"\x80\x66" + random.Random(0).randbytes(4094))
    refused(path, "not a PyTorch checkpoint")
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


def test_a_good_load_passes_torchs_warnings_on(tmp_path, monkeypatch):
    path = tmp_path / "step_1.pt"
    save_checkpoint(state(1), str(path))
    real_load = torch.load

    def load(*a, **k):
        import warnings
        warnings.warn("a note from torch.load", UserWarning)
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", load)
    with pytest.warns(UserWarning, match="a note from torch.load"):
        assert load_checkpoint(str(path))["step"] == 1


def test_plain_dict_without_marker(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    refused(path, "not a checkpoint of this project", "generative-trm")
    torch.save([1, 2, 3], path)
    refused(path, "not a checkpoint of this project")


def test_newer_format_version(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": "generative-trm", "version": 99}, path)
    refused(path, "version 99")


def test_truncated_file(tmp_path):
    path = tmp_path / "step_5.pt"
    save_checkpoint(state(5), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # what a crash mid-copy leaves
    message = refused(path, "unreadable or truncated")
    assert "run code" not in message


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # full pickle would create the sentinel file while loading


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_without_running_its_payload(tmp_path, legacy):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    evil = {"format": "generative-trm", "version": 1, "model": Payload(str(sentinel))}
    if legacy:  # a bare pickle, not torch.save's zip container
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save(evil, path)
    message = refused(path, "would run code", "GLOBAL", "open")
    assert "not a PyTorch checkpoint" not in message
    assert not sentinel.exists()


def test_load_model_wraps_config_and_tokenizer_mismatches(tmp_path, tiny_checkpoint):
    good = torch.load(tiny_checkpoint, weights_only=True)
    good.pop("checksum")  # edited by hand below: saved without one, as older checkpoints were
    cases = {"arch.pt": {**good, "config": {**good["config"], "arch": "rnn"}},          # ValueError from TRMConfig
             "huge.pt": {**good, "config": {**good["config"], "d_model": 1 << 24}},    # refused before allocating
             "zero.pt": {**good, "config": {**good["config"], "n_layers": 0}},
             "tok.pt": {**good, "tokenizer": {"kind": "bytes", "proto": [1, 2, 3]}},   # AttributeError: .numpy()
             "keys.pt": {**good, "model": {"w": torch.zeros(1)}, "ema": None},         # RuntimeError: state dict
             "shape.pt": {**good, "config": {**good["config"], "d_model": 64}}}         # its shapes, not the config's
    for name, bad in cases.items():
        path = tmp_path / name
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match="does not match this code's model") as e:
            load_model(str(path))
        # load_state_dict's message runs over lines ("...for TRM:\n\tsize mismatch for ..."): the error was two lines
        assert "\n" not in str(e.value), str(e.value)
    assert "not those of its config" in str(e.value) and "in the file" in str(e.value)
    with pytest.raises(CheckpointError, match="weights must be"):
        load_model(tiny_checkpoint, weights="best")


def test_a_config_asking_for_more_than_its_weights_is_refused_before_the_model_is_built(tmp_path, tiny_checkpoint,
                                                                                          monkeypatch):
    # a hand-edited or tampered config may ask for up to TRMConfig.MAX_PARAMS (~80 GB in float32): the shapes are
    # compared on the meta device, so nothing of that size is ever allocated. Here a 2 GB ask, and where it was built
    import trm.model
    good = torch.load(tiny_checkpoint, weights_only=True)
    good.pop("checksum")
    path = tmp_path / "wide.pt"
    torch.save({**good, "config": {**good["config"], "d_model": 4096, "n_heads": 32}}, path)
    built_on = []

    class Watched(trm.model.TRM):
        def __init__(self, config):
            built_on.append(torch.empty(0).device.type)  # the default device the weights would be made on
            super().__init__(config)
    monkeypatch.setattr(trm.model, "TRM", Watched)
    with pytest.raises(CheckpointError, match="not those of its config"):
        load_model(str(path))
    assert built_on == ["meta"]
    load_model(tiny_checkpoint)  # a checkpoint that fits: checked on meta, then built for real
    assert built_on == ["meta", "meta", "cpu"]


def test_load_model_without_ema_says_it_uses_the_raw_weights(tmp_path, tiny_checkpoint, capsys):
    state = load_checkpoint(tiny_checkpoint)
    path = tmp_path / "no_ema.pt"
    save_checkpoint({**state, "ema": None}, str(path))  # as --ema_decay 0 writes it
    model, _, _ = load_model(str(path))
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    note = capsys.readouterr().err
    assert note.startswith("note: ") and "no EMA" in note and "raw weights" in note and note.count("\n") == 1
    load_model(tiny_checkpoint)  # a checkpoint with an EMA: nothing to say
    load_model(str(path), weights="raw")  # the raw weights asked for: nothing to say
    assert capsys.readouterr().err == ""


def test_same_weights_tells_a_checkpoint_from_one_differing_in_one_weight_or_its_ema(tiny_checkpoint):
    # bench/race.py scores best.pt once when it holds the final checkpoint's weights: a false "same" would report
    # the final score as best.pt's
    state = load_checkpoint(tiny_checkpoint)
    assert same_weights(state, load_checkpoint(tiny_checkpoint))
    for part in ("model", "ema"):
        other = load_checkpoint(tiny_checkpoint)
        weights = other["model"] if part == "model" else other["ema"]["model"]
        name = sorted(weights)[-1]
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] += 1e-3
        assert not same_weights(state, other) and not same_weights(other, state), part
    assert not same_weights(state, {**state, "ema": None}) and same_weights({**state, "ema": None},
                                                                             {**state, "ema": None})


# ---- listing and pruning ------------------------------------------------------------------------------------------

NAMES = ["step_2.pt", "step_10.pt", "final_step_5.pt", "step_5.pt", "final_step_1.pt", "step_7.pt", "notes.txt",
         "best.pt"]


def touch_all(save_dir):
    for name in NAMES:
        (save_dir / name).write_bytes(b"")


def test_list_checkpoints_newest_first_final_before_step(tmp_path):
    touch_all(tmp_path)
    got = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    # numeric order (10 after 7, not before 2), final_step_N ahead of step_N, other files ignored
    assert got == ["step_10.pt", "step_7.pt", "final_step_5.pt", "step_5.pt", "step_2.pt", "final_step_1.pt"]
    assert list_checkpoints(str(tmp_path / "nowhere")) == []


def test_prune_keeps_newest_step_files_and_every_final(tmp_path):
    touch_all(tmp_path)
    prune_checkpoints(str(tmp_path), keep_last=0)  # 0 = keep everything
    assert sorted(os.listdir(tmp_path)) == sorted(NAMES)
    prune_checkpoints(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == sorted(["step_10.pt", "step_7.pt", "final_step_5.pt", "final_step_1.pt",
                                                    "notes.txt", "best.pt"])
    prune_checkpoints(str(tmp_path), keep_last=1)
    assert sorted(os.listdir(tmp_path)) == sorted(["step_10.pt", "final_step_5.pt", "final_step_1.pt", "notes.txt",
                                                    "best.pt"])
