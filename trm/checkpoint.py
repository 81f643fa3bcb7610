"""Checkpoint files: written atomically, self-contained, and loaded without executing pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` reads
it and refuses anything that would run code on load. It holds everything needed to resume exactly (model, EMA,
optimizer, step, data position, RNG states, config, args) and to generate (the tokenizer itself). It also carries a
checksum of its contents, verified on load: torch.load does not check the zip's own CRCs, so a flipped byte in a
weight would otherwise load silently.
"""
import hashlib
import os
import pickle
import re
import sys
import warnings
import zipfile

import torch

from trm.atomic import AtomicFile

FORMAT = "generative-trm"
VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state, path):
    """Write to a temporary file in the same directory, then rename: a crash never leaves a half-written step_N.pt.

    A write that fails (disk full, read-only or forbidden directory) is a CheckpointError saying so; the partial
    temporary file is removed and every earlier checkpoint is left as it was."""
    state = {"format": FORMAT, "version": VERSION, **{k: v for k, v in state.items() if k != "checksum"}}
    state["checksum"] = checksum(state)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with AtomicFile(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write of its zip writer as RuntimeError("unexpected pos ..."), the OSError behind
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(f"could not write checkpoint {path}: {cause.strerror or cause}; the previous checkpoint "
                              f"is intact (nothing was replaced)") from None


def checksum(state):
    """blake2b over the checkpoint's contents in order: each tensor's dtype, shape and bytes, every other value's type
    and repr (steps, RNG states, args). About 0.9 GB/s on one CPU core: 0.26 s for a 15M-parameter fp32 model saved
    with its EMA and Adam moments (240 MB), at save and again at load."""
    h = hashlib.blake2b(digest_size=16)

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}\0".encode())
            h.update(t.view(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"dict {len(x)}\0".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__} {len(x)}\0".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__} {x!r}\0".encode())

    walk(state)
    return h.hexdigest()


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint; every failure is a CheckpointError with a one-line reason."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}" + _what_is_there(os.path.dirname(path) or "."))
    if not os.path.isfile(path):
        raise CheckpointError(f"not a file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    if kind := _foreign(_head(path, 16)):
        raise CheckpointError(f"{path} is {kind}, not a PyTorch checkpoint")
    try:
        # random bytes that begin with a pickle's first opcode make torch warn about the protocol before it fails:
        # a failed load's warnings are dropped (the one-line error says it all), a good load's are passed on
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know, i.e. anything that could execute code while loading;
        # other unpickling errors (an unknown opcode in random bytes) only mean the file is not a checkpoint
        refused, reason = _unpickler_reason(str(e))
        if refused:
            raise CheckpointError(f"{path} was refused: it contains objects that would run code when loaded "
                                  f"(weights_only=True) [{reason}]") from None
        raise CheckpointError(_not_a_checkpoint(path, reason)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is unreadable or truncated ({type(e).__name__}: {_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001
        # weights_only=True runs no code from the file, so any other failure (a text file gives KeyError, one byte
        # IndexError) is the unpickler tripping over bytes that are not a pickle
        raise CheckpointError(_not_a_checkpoint(path, f"{type(e).__name__}: {_first_line(e)}")) from None
    for w in caught:  # outside the try: a warning made an error by the caller's filters is not "unreadable"
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no '{FORMAT}' marker)")
    if type(state.get("version", 0)) is not int:  # (a foreign writer's "2" made the comparison below a TypeError)
        raise CheckpointError(f"{path} has the format version {state['version']!r}, not a whole number; this code "
                              f"reads up to {VERSION}")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {state['version']}; this code reads up to {VERSION}")
    stored = state.pop("checksum", None)  # None: written before checkpoints had one, loaded unverified
    if stored is not None and checksum(state) != stored:
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with it (a changed "
                              f"byte on disk or in a copy); use another checkpoint or copy it again")
    return state


MAGIC = ((b"\x1f\x8b", "a gzip file (a corpus shard?)"), (b"\xfd7zXZ\x00", "an xz file (a corpus shard?)"),
         (b"\x28\xb5\x2f\xfd", "a zstd file (a corpus shard?)"), (b"PAR1", "a Parquet file (a corpus shard?)"))


def _head(path, n=4096):
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:  # (torch.load then says what is wrong, as "unreadable")
        return b""


def _foreign(head):
    """What a file whose first bytes are another format's is (the unpickler's own words, 'Unsupported operand 31' for
    a .jsonl.gz, tell a user nothing), or None."""
    if kind := next((what for magic, what in MAGIC if head.startswith(magic)), None):
        return kind
    if head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 1 << 27:  # a header's length, then its JSON
        return ("a safetensors file (an exported model: generate.py and evaluate.py take its folder; training cannot "
                "resume from it)")
    return None


def _not_a_checkpoint(path, reason):
    """The one line for a file the unpickler cannot read: a text file is named as such, else the unpickler's reason."""
    try:
        if _head(path).decode("utf-8"):  # (a character cut at 4096 bytes makes it binary here: rare, only wordier)
            return f"{path} is a text file, not a PyTorch checkpoint"
    except UnicodeDecodeError:
        pass
    return f"{path} is unreadable or not a PyTorch checkpoint ({reason})"


def _what_is_there(folder):
    """The checkpoints beside a path that is not there: the procedure's command names final_step_50000.pt, which a run
    stopped by --max_minutes or Ctrl-C, or resumed with other --max_steps, never wrote."""
    if not os.path.isdir(folder):
        return ""
    paths = list_checkpoints(folder)
    names = [os.path.basename(p) for p in paths if os.path.basename(p).startswith("final_")]
    if os.path.exists(os.path.join(folder, "best.pt")):
        names.append("best.pt")
    names += [os.path.basename(p) for p in paths if os.path.basename(p).startswith("step_")][:1]  # the newest
    return f"; {folder} has {', '.join(names)}" if names else f"; {folder} has no checkpoints"


def one_line(e, limit=200):
    """An exception's text on one line: load_state_dict's runs over several ("...for TRM:\\n\\tsize mismatch for ..."),
    and its first line alone says nothing; 200 characters hold its first mismatch whole."""
    return " ".join(str(e).split())[:limit]


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0][:160] if text else "no details"


def _unpickler_reason(message):
    """(refused GLOBAL?, the weights-only unpickler's own reason) from its multi-paragraph error message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported global" in line:
            return True, line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0][:160]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return False, (rest or (lines[i + 1] if i + 1 < len(lines) else "no details"))[:160]
    return False, (lines[0] if lines else "no details")[:160]


def checkpoint_step(path):
    m = re.search(r"step_(\d+)\.pt$", os.path.basename(path))
    return int(m.group(1)) if m else -1


CHECKPOINT_NAME = re.compile(r"(?:final_)?step_\d+\.pt")


def list_checkpoints(save_dir):
    """step_N.pt and final_step_N.pt in save_dir, newest (highest N) first; final before step at equal N.

    By exact name, not by glob: a save dir named like "lr[3e-4]" is a pattern to glob (it found nothing there), and
    "step_*.pt" also matched a user's "step_4_good.pt", which pruning then deleted as the oldest."""
    try:
        names = os.listdir(save_dir)
    except OSError:  # no such folder (yet), or not one
        return []
    paths = [os.path.join(save_dir, name) for name in names if CHECKPOINT_NAME.fullmatch(name)]
    return sorted(paths, key=lambda p: (checkpoint_step(p), os.path.basename(p).startswith("final")), reverse=True)


def checkpoint_of(save_dir):
    """The checkpoint a save dir stands for when a user names the folder: best.pt, else its newest; None if none."""
    best = os.path.join(save_dir, "best.pt")
    return best if os.path.isfile(best) else next(iter(list_checkpoints(save_dir)), None)


def same_weights(a, b):
    """Whether two loaded checkpoints hold the same weights, and the same EMA weights (or neither keeps an EMA): best.pt
    and the final checkpoint of a run whose last evaluation was its best."""
    if (a.get("ema") is None) != (b.get("ema") is None):
        return False
    pairs = [(a["model"], b["model"])] + ([(a["ema"]["model"], b["ema"]["model"])] if a.get("ema") else [])
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in pairs)


def prune_checkpoints(save_dir, keep_last, keep=()):
    """Delete all but the newest `keep_last` step_N.pt files (0 = keep all), never those in `keep` (e.g. the one just
    written, which is not the highest step after resuming from an earlier one) nor a final checkpoint. Returns the
    deleted paths."""
    if keep_last <= 0:
        return []
    keep = {os.path.abspath(p) for p in keep}
    steps = [p for p in list_checkpoints(save_dir) if os.path.basename(p).startswith("step_")]
    removed = [p for p in steps[keep_last:] if os.path.abspath(p) not in keep]
    for p in removed:
        os.remove(p)
    return removed


def model_for(config, weights, path):
    """The TRM that config builds, for the state dict `weights`: its shapes compared first on the meta device, where
    nothing is allocated. A config that asks for far more than its file holds (a hand-edited or tampered one may ask
    for up to TRMConfig.MAX_PARAMS, ~80 GB in float32) is then refused in a line instead of filling the memory."""
    from trm.model import TRM, TRMConfig
    config = TRMConfig(**config)
    with torch.device("meta"):
        want = {name: tuple(t.shape) for name, t in TRM(config).state_dict().items()}
    have = {name: tuple(t.shape) for name, t in weights.items()}
    if want != have:
        wrong = sorted(set(want) ^ set(have)) or [name for name in want if want[name] != have[name]]
        name = wrong[0]
        raise CheckpointError(f"{path} does not match this code's model (its weights are not those of its config: "
                              f"{name} is {have.get(name, 'missing')} in the file, {want.get(name, 'unknown')} in "
                              f"the model; {len(wrong)} such)")
    return TRM(config)


def load_model(path, weights="ema", map_location="cpu"):
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint, for generation and evaluation.

    weights='ema' (the default everywhere) or 'raw'. A checkpoint without an EMA (trained with --ema_decay 0) gives its
    raw weights, with a note on stderr; the dict's "weights" names those loaded, which the callers' own output
    (generate.py's header, evaluate.py's JSON) reports. A folder is a model folder written by export.py
    (trm/model_folder.py): the same three things; or a trainer's save dir, which stands for its best.pt, else its newest
    checkpoint (said on stderr). The dict's "path" is the file or model folder loaded.
    """
    from trm.tokenizer import Tokenizer

    if os.path.isdir(path):
        from trm.model_folder import is_model_folder, load_folder
        if not is_model_folder(path) and (chosen := checkpoint_of(path)) is not None:  # a trainer's save dir
            print(f"note: {path} is a save dir: loading {chosen}", file=sys.stderr)
            path = chosen
    if os.path.isdir(path):
        try:
            model, tokenizer, state = load_folder(path, weights)
            state["path"] = path
        except CheckpointError:
            raise
        except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as e:  # a hand-edited config.json
            raise CheckpointError(f"{path} is not a model folder this code can read ({type(e).__name__}: "
                                  f"{one_line(e)})") from None
        return finite(model, path), tokenizer, state
    state = load_checkpoint(path, map_location)
    state["path"] = path
    try:
        if weights not in ("ema", "raw"):
            raise CheckpointError(f"weights must be 'ema' or 'raw', got {weights!r}")
        sd, state["weights"] = state["model"], "raw"
        if weights == "ema" and state.get("ema") is not None:
            sd, state["weights"] = state["ema"]["model"], "ema"
        elif weights == "ema":
            print(f"note: {path} has no EMA weights (trained with --ema_decay 0): using its raw weights",
                  file=sys.stderr)
        model = model_for(state["config"], sd, path)
        model.load_state_dict(sd)
        tokenizer = Tokenizer.from_state(state["tokenizer"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} does not match this code's model ({type(e).__name__}: {one_line(e)})") \
            from None
    return finite(model, path).eval(), tokenizer, state


def finite(model, path):
    """model, unless a weight is NaN or infinite (saved from a run that diverged, or damaged alike): sampling from it
    fails deep in torch.multinomial, and its evaluation is NaN."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise CheckpointError(f"{path} holds weights that are not finite (NaN or inf; {name}, first): the run "
                                  f"diverged before it was saved. Use an earlier checkpoint of the run")
    return model
