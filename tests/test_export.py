"""export.py and trm/model_folder.py: a checkpoint becomes a folder that generates and scores exactly as the checkpoint
does, holds the weights asked for, loads without unpickling anything, and refuses damage with one line."""
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, japanese_lines, make_checkpoint
from trm.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from trm.safetensors import load_file
from trm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models; the test machine is small and shared
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def export(*args):
    r = run("export.py", *args)
    assert r.returncode == 0, r.stderr
    return r


def trained_checkpoint(path, tokenizer, **config):
    """A checkpoint as a trainer writes it after some steps: EMA weights that differ from the raw ones, a validation
    result, tokens seen, the command's arguments, best.pt's record."""
    model = make_checkpoint(path, tokenizer, **config)
    state = load_checkpoint(str(path))
    torch.manual_seed(1)
    state["ema"]["model"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                             for k, v in state["ema"]["model"].items()}
    state.update(step=1200, tokens_seen=1_228_800, train_seconds=95.0, run_id="r1", best={"loss": 3.9, "step": 1000},
                 metrics={"loss": 4.25, "perplexity": 70.1, "bits_per_byte": 1.9876, "tokens": 4096, "bytes": 9000,
                          "step": 1200, "kind": "eval", "tokens_seen": 1_228_800},
                 args={"train_paths": ["train_0.jsonl.gz"], "valid_paths": ["validation_0.jsonl.gz"],
                       "batch_size": 4, "lr": 3e-4, "ema_decay": 0.995, "max_seq_len": 64, "seed": 1337,
                       "warmup_steps": 2000})
    save_checkpoint(state, str(path))
    return model, state


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sp_model):
    """(checkpoint path, its state, the folder export.py made of it with default flags)."""
    folder = tmp_path_factory.mktemp("export")
    _, state = trained_checkpoint(folder / "step_1200.pt", Tokenizer.from_args("sentencepiece", tiny_sp_model))
    export("--model_path", folder / "step_1200.pt", "--out", folder / "ja_tiny")
    return str(folder / "step_1200.pt"), state, str(folder / "ja_tiny")


def test_the_folder_holds_the_ema_weights_config_tokenizer_and_card(trained, tiny_sp_model):
    path, state, out = trained
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    tensors, metadata = load_file(os.path.join(out, "model.safetensors"))
    assert metadata["weights"] == "ema"
    assert sorted(tensors) == sorted(state["ema"]["model"])
    for k, v in state["ema"]["model"].items():
        assert torch.equal(tensors[k], v), k
    assert not torch.equal(tensors["embed.weight"], state["model"]["embed.weight"])  # the EMA, not the raw ones
    with open(tiny_sp_model, "rb") as f:
        assert open(os.path.join(out, "tokenizer.model"), "rb").read() == f.read()

    info = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
    assert info["config"] == state["config"] and info["weights"] == "ema"
    training = info["training"]
    assert training["step"] == 1200 and training["tokens_seen"] == 1_228_800
    assert training["checkpoint"] == "step_1200.pt"
    assert training["validation"]["bits_per_byte"] == 1.9876 and training["validation"]["weights"] == "ema"
    assert training["best"] == {"loss": 3.9, "step": 1000} and training["args"]["lr"] == 3e-4
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    for words in ("1,200", "1,228,800", "**1.9876 bits per UTF-8 byte** (of the text as its tokenizer normalizes it",
                  "validation_0.jsonl.gz",
                  "EMA of the weights (decay 0.995)", "3.9000 at step 1,000", "python generate.py --model_path ja_tiny",
                  'load_file("ja_tiny/model.safetensors")'):
        assert words in card, words
    # the settings are flags as a command takes them: `--seed 1,337` and `--lr 0.000300` were written there
    assert "`--batch_size 4` `--max_seq_len 64` `--lr 0.0003` `--warmup_steps 2000` `--seed 1337`" in card, card


def test_generation_and_evaluation_from_the_folder_equal_the_checkpoints(trained, tmp_path):
    path, _, out = trained
    for flags in (["--temperature", "0"], ["--temperature", "0.9", "--seed", "7", "--num_samples", "2"]):
        common = ["--prompt", "猫は", "--max_new_tokens", "40", "--repetition_penalty", "1.3", *flags]
        from_checkpoint, from_folder = run("generate.py", "--model_path", path, *common), \
            run("generate.py", "--model_path", out, *common)
        assert from_checkpoint.returncode == from_folder.returncode == 0, from_folder.stderr
        assert len(from_checkpoint.stdout) > 20 and from_folder.stdout == from_checkpoint.stdout
        assert "step 1200" in from_folder.stderr

    with gzip.open(tmp_path / "v.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in japanese_lines(60, seed=5))
    scores = []
    for model_path in (path, out):
        r = run("evaluate.py", "--model_path", model_path, "--data", tmp_path / "v.jsonl.gz", "--eval_tokens", "500")
        assert r.returncode == 0, r.stderr
        scores.append(json.loads(r.stdout))
    assert scores[1]["loss"] == scores[0]["loss"] and scores[1]["bits_per_byte"] == scores[0]["bits_per_byte"]
    assert scores[1]["step"] == 1200 and scores[1]["tokens"] == scores[0]["tokens"] > 0


def test_raw_weights_on_request_and_each_folder_holds_one_set(trained, tmp_path, capsys):
    path, state, out = trained
    export("--model_path", path, "--out", tmp_path / "raw", "--weights", "raw")
    model, _, info = load_model(str(tmp_path / "raw"), "raw")
    assert info["weights"] == "raw"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    load_model(str(tmp_path / "raw"))  # 'ema' asked of raw weights: used, with a note (as a checkpoint without EMA)
    assert "holds raw weights" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="holds only EMA weights; export the checkpoint with --weights raw"):
        load_model(out, "raw")


def test_a_score_from_a_depth_warmup_is_named_as_such_on_the_card(tmp_path):
    # a checkpoint from inside --depth_warmup holds a score of its shallow depth: the card must not pass it off as
    # the model's (on an H200 the two were 4.26 and 7.45 nats)
    _, state = trained_checkpoint(tmp_path / "step_600.pt", Tokenizer("byte"))
    state["metrics"]["eval_depth"] = {"deep_steps": 1}
    save_checkpoint(state, str(tmp_path / "step_600.pt"))
    export("--model_path", tmp_path / "step_600.pt", "--out", tmp_path / "warm")
    card = (tmp_path / "warm" / "README.md").read_text(encoding="utf-8")
    assert "scored at 1 deep step, the depth its --depth_warmup was training: not the model's own depth" in card


def test_a_byte_tokenizer_model_with_tied_embeddings_needs_no_tokenizer_file(tmp_path):
    tokenizer = Tokenizer("byte")
    model = make_checkpoint(tmp_path / "step_0.pt", tokenizer, tie_embeddings=True)
    export("--model_path", tmp_path / "step_0.pt", "--out", tmp_path / "bytes")
    assert "tokenizer.model" not in os.listdir(tmp_path / "bytes")
    loaded, tok, _ = load_model(str(tmp_path / "bytes"))
    assert tok.kind == "byte" and loaded.num_params() == model.num_params()
    ids = torch.tensor([[2, *tokenizer.encode("猫は見る")]])
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert "[b + 4 for b in" in (tmp_path / "bytes" / "README.md").read_text(encoding="utf-8")


def test_the_recommended_models_variants_export_and_score_as_the_checkpoint(tmp_path):
    """README's recommended commands: tied embeddings, QK-norm, zero-init output projections, rank-4 adapters per call.
    The zero-started weights get values first, so that a lost adapter or projection would change the logits."""
    tokenizer = Tokenizer("byte")
    config = dict(tie_embeddings=True, qk_norm=True, zero_init=True, adapter_rank=4, latent_steps=1,
                  supervision_steps=1)
    make_checkpoint(tmp_path / "step_0.pt", tokenizer, **config)
    state = load_checkpoint(str(tmp_path / "step_0.pt"))
    torch.manual_seed(2)
    zero = [k for k, v in state["model"].items() if v.is_floating_point() and not v.abs().sum()]
    assert any("adapter" in k for k in zero) and any("proj" in k for k in zero), zero  # both really zero-started
    weights = {k: torch.randn_like(v) * 0.2 if k in zero else v for k, v in state["model"].items()}
    state.update(model=weights, ema={**state["ema"], "model": weights})
    save_checkpoint(state, str(tmp_path / "step_0.pt"))
    export("--model_path", tmp_path / "step_0.pt", "--out", tmp_path / "folder")
    checkpoint, folder = load_model(str(tmp_path / "step_0.pt"))[0], load_model(str(tmp_path / "folder"))[0]
    assert folder.config.to_dict() == checkpoint.config.to_dict()
    ids = torch.tensor([[2, *tokenizer.encode("猫は見る")]])
    with torch.no_grad():
        assert torch.equal(folder(ids)[0], checkpoint(ids)[0])


def test_an_out_folder_with_files_is_refused_unless_overwrite(trained, tmp_path):
    path, _, _ = trained
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert_one_line_error(run("export.py", "--model_path", path, "--out", tmp_path / "busy"),
                          "is not empty", "--overwrite", code=2)
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run("export.py", "--model_path", path, "--out", tmp_path / "file"), "is not a folder",
                          code=2)
    # a folder that cannot be made (here under a file) holds nothing half-written: no "incomplete folder" to blame
    line = assert_one_line_error(run("export.py", "--model_path", path, "--out", tmp_path / "file" / "sub"),
                                 "nothing was written", code=1)
    assert "incomplete" not in line

    export("--model_path", path, "--out", tmp_path / "busy", "--overwrite")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"  # only the export's own files are replaced
    # a byte-tokenizer model over it: the old tokenizer.model goes, since it is not this model's
    make_checkpoint(tmp_path / "step_0.pt", Tokenizer("byte"))
    export("--model_path", tmp_path / "step_0.pt", "--out", tmp_path / "busy", "--overwrite")
    assert sorted(os.listdir(tmp_path / "busy")) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert load_model(str(tmp_path / "busy"))[1].kind == "byte"


def test_a_save_dir_exports_its_best_checkpoint(trained, tmp_path):
    path, _, _ = trained
    shutil.copy(path, tmp_path / "best.pt")
    make_checkpoint(tmp_path / "step_1300.pt", Tokenizer("byte"))  # newer, but not the best
    r = export("--model_path", tmp_path, "--out", tmp_path.parent / (tmp_path.name + "_out"))
    assert "best.pt" in r.stderr
    assert load_model(str(tmp_path.parent / (tmp_path.name + "_out")))[2]["step"] == 1200


def test_damaged_or_mismatched_folders_are_refused_with_one_line(trained, tmp_path, tiny_sp_model):
    _, _, out = trained

    def copy(name):
        shutil.copytree(out, tmp_path / name)
        return tmp_path / name

    flipped = copy("flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-5] ^= 1  # a weight's byte: the header still parses, only the checksum can tell
    (flipped / "model.safetensors").write_bytes(bytes(data))
    assert_one_line_error(run("generate.py", "--model_path", flipped, "--prompt", "猫"),
                          "model.safetensors is damaged", code=2)

    swapped = copy("swapped")
    (swapped / "tokenizer.model").write_bytes(b"not the model's tokenizer")
    assert_one_line_error(run("generate.py", "--model_path", swapped, "--prompt", "猫"), "tokenizer.model", code=2)

    missing = copy("missing")
    os.remove(missing / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(str(missing))
    os.remove(missing / "config.json")
    r = run("evaluate.py", "--model_path", missing, "--data", tiny_sp_model)
    assert_one_line_error(r, "without config.json", "best.pt", code=2)

    # a hand-edited config.json of the wrong types: evaluate.py showed a traceback (TypeError), generate.py one line
    edited = copy("edited")
    info = json.loads((edited / "config.json").read_text(encoding="utf-8"))
    info["version"] = str(info["version"])
    (edited / "config.json").write_text(json.dumps(info), encoding="utf-8")
    for script, extra in (("evaluate.py", ["--data", tiny_sp_model]), ("generate.py", ["--prompt", "猫"])):
        assert_one_line_error(run(script, "--model_path", edited, *extra), str(edited), code=2)


def test_a_config_that_does_not_build_its_weights_is_one_line(trained, tmp_path):
    # config.json has no checksum of its own: a hand-edited width asks for a model its weights do not fit (refused
    # before it is built, trm.checkpoint.model_for), and load_state_dict's multi-line message made the error two lines
    _, _, out = trained
    shutil.copytree(out, tmp_path / "wider")
    info = json.loads((tmp_path / "wider" / "config.json").read_text(encoding="utf-8"))
    info["config"]["d_model"] *= 2
    (tmp_path / "wider" / "config.json").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(CheckpointError, match="does not match this code's model") as e:
        load_model(str(tmp_path / "wider"))
    assert "\n" not in str(e.value) and "not those of its config" in str(e.value), str(e.value)


def test_a_link_to_the_checkpoints_folder_is_its_own_folder(trained, tmp_path):
    # the guard compared paths as written: through a link, --overwrite put the export's files among the checkpoints
    path, _, _ = trained
    run_dir = tmp_path / "run1"
    run_dir.mkdir()
    shutil.copy(path, run_dir / "step_1200.pt")
    os.symlink(run_dir, tmp_path / "run1link")
    r = run("export.py", "--model_path", run_dir / "step_1200.pt", "--out", tmp_path / "run1link", "--overwrite")
    assert_one_line_error(r, "is the checkpoint's own folder", code=2)
    assert sorted(os.listdir(run_dir)) == ["step_1200.pt"]


def test_loading_a_folder_unpickles_nothing(trained, monkeypatch):
    _, _, out = trained

    def refuse(*args, **kwargs):
        raise AssertionError("a model folder was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model, tokenizer, state = load_model(out)
    assert state["step"] == 1200 and tokenizer.kind == "sentencepiece"


def test_the_try_it_line_works_from_the_folder_it_was_run_in(trained, tmp_path):
    # run from a data folder (the README's evaluate.py example does the same): `python generate.py` was not there
    path, _, _ = trained
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--model_path", path, "--out", "m"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(line for line in (r.stdout + r.stderr).splitlines() if line.startswith("try it: python "))
    generate = line.split()[3]
    assert generate != "generate.py" and (tmp_path / generate).resolve() == Path(ROOT, "generate.py").resolve()
