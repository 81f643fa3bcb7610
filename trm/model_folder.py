"""A model folder, for sharing a trained model: what export.py writes and generate.py / evaluate.py read back.

    model.safetensors   one set of weights (EMA or raw), by parameter name; loads anywhere, runs no code
    config.json         the model's config, which weights these are, the tokenizer's fingerprint, the training
                        summary (steps, tokens, validation loss and bits/byte), and each file's size and sha256
    tokenizer.model     the SentencePiece model the run used (none for --tokenizer byte)
    README.md           the model card

config.json is written last, so a folder without it is unfinished. Its checksums catch what atomic writes cannot:
a crash between two files of an --overwrite, a partial copy, a flipped byte. Reading uses json and our own
safetensors reader: nothing is unpickled.
"""
import hashlib
import json
import os

from trm.atomic import AtomicFile
from trm.checkpoint import CheckpointError, model_for, one_line

FORMAT = "generative-trm-model"
VERSION = 1
WEIGHTS, CONFIG, TOKENIZER, CARD = "model.safetensors", "config.json", "tokenizer.model", "README.md"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_folder(out, tensors, config, weights, tokenizer, training, card):
    """Write the four files into `out` (created if needed), each whole or not at all, config.json last.
    `config` is the TRMConfig dict, `weights` 'ema' or 'raw', `training` a JSON-able summary, `card` markdown."""
    from trm.safetensors import save_file

    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, WEIGHTS), {"format": "pt", "weights": weights})
    files = [WEIGHTS]
    if tokenizer.kind == "sentencepiece":
        with AtomicFile(os.path.join(out, TOKENIZER)) as f:
            f.write(tokenizer.proto)
        files.append(TOKENIZER)
    elif os.path.isfile(os.path.join(out, TOKENIZER)):  # an earlier export's, overwritten: it is not this model's
        os.remove(os.path.join(out, TOKENIZER))
    with AtomicFile(os.path.join(out, CARD), "w", encoding="utf-8") as f:
        f.write(card)
    info = {"format": FORMAT, "version": VERSION, "config": config, "weights": weights,
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
                          "file": TOKENIZER if tokenizer.kind == "sentencepiece" else None},
            "training": training,
            "files": {name: {"bytes": os.path.getsize(path), "sha256": sha256(path)}
                      for name, path in ((name, os.path.join(out, name)) for name in files)}}
    with AtomicFile(os.path.join(out, CONFIG), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return info


def is_model_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def load_folder(path, weights="ema"):
    """(model in eval mode, tokenizer, state) from a model folder, as load_model gives them from a checkpoint; state
    holds the training summary (step, tokens_seen, ...) and the config. A folder of EMA weights asked for 'raw' is
    refused (it has no others); a folder of raw weights asked for 'ema' gives them with a note, as a checkpoint
    without an EMA does. Every failure is a CheckpointError with one line."""
    import sys

    from trm.safetensors import load_file
    from trm.tokenizer import Tokenizer, TokenizerError

    if not is_model_folder(path):
        raise CheckpointError(f"{path} is a folder without {CONFIG} (a model folder written by export.py has one) and "
                              f"without checkpoints (a save dir has best.pt or step_N.pt); give a checkpoint file "
                              f"such as {os.path.join(path, 'best.pt')}, or one of those folders")
    try:
        with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG)} is unreadable ({type(e).__name__}: {str(e)[:120]})") \
            from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{os.path.join(path, CONFIG)} is not a model folder's config (no '{FORMAT}' marker)")
    if info.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {info['version']}; this code reads up to {VERSION}")
    try:
        for name, want in info["files"].items():
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} is missing (the model folder is incomplete; export it again)")
            if os.path.getsize(file) != want["bytes"] or sha256(file) != want["sha256"]:
                raise CheckpointError(f"{file} is damaged or not this folder's: it does not match the size and sha256 "
                                      f"in {CONFIG} (a partial copy or a changed byte); export or copy it again")
        if weights not in ("ema", "raw"):
            raise CheckpointError(f"weights must be 'ema' or 'raw', got {weights!r}")
        if weights == "raw" and info["weights"] == "ema":
            raise CheckpointError(f"{path} holds only EMA weights; export the checkpoint with --weights raw for the "
                                  f"raw ones")
        if weights == "ema" and info["weights"] == "raw":
            print(f"note: {path} holds raw weights (exported with --weights raw or trained with --ema_decay 0): "
                  f"using them", file=sys.stderr)
        kind = info["tokenizer"]["kind"]
        proto = None
        if kind == "sentencepiece":
            with open(os.path.join(path, info["tokenizer"]["file"]), "rb") as f:
                proto = f.read()
        tokenizer = Tokenizer(kind, proto)
        if tokenizer.fingerprint() != info["tokenizer"]["fingerprint"]:
            raise CheckpointError(f"{path}: the tokenizer is not the one the model was trained with (fingerprint "
                                  f"{tokenizer.fingerprint()} vs {info['tokenizer']['fingerprint']})")
        tensors, _ = load_file(os.path.join(path, WEIGHTS))
        model = model_for(info["config"], tensors, path)
        model.load_state_dict(tensors)
    except CheckpointError:
        raise
    except (KeyError, TypeError, RuntimeError, ValueError, AttributeError, OSError, TokenizerError) as e:
        raise CheckpointError(f"{path} does not match this code's model ({type(e).__name__}: {one_line(e)})") \
            from None
    state = {**(info.get("training") or {}), "config": info["config"], "weights": info["weights"]}
    return model.eval(), tokenizer, state
