"""Validation numbers: bits per byte computed from the loss and the bytes the targets stand for; the CLI."""
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, japanese_lines, make_checkpoint
from trm.data import document_ids, eval_windows
from trm.evaluate import compile_blocks, evaluate, unknown_note
from trm.model import TRM, TRMConfig
from trm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_bits_per_byte_is_the_loss_over_the_bytes_the_targets_stand_for(tiny_sp_model):
    tok = Tokenizer.from_args("sentencepiece", tiny_sp_model)
    texts = japanese_lines(40, seed=3)
    ids = [i for doc in document_ids(tok, texts) for i in doc]
    windows = eval_windows(np.array(ids), 32, 10_000)
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, max_seq_len=32, dropout=0.0))
    r = evaluate(model, windows, tok.token_bytes(), batch_size=3)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1), reduction="sum").item()
    target_bytes = int(tok.token_bytes()[windows[:, 1:].numpy()].sum())
    # the bytes of the targets are the UTF-8 bytes of their text (BOS/EOS count none)
    text = tok.decode([i for i in windows[:, 1:].reshape(-1).tolist()])
    assert target_bytes == len(text.encode("utf-8"))
    assert r["tokens"] == windows[:, 1:].numel() and r["bytes"] == target_bytes
    assert math.isclose(r["loss"], nats / r["tokens"], rel_tol=1e-5)
    assert math.isclose(r["bits_per_byte"], nats / math.log(2) / target_bytes, rel_tol=1e-5)
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-6)


def test_the_sums_kept_on_the_device_equal_the_scores_of_each_batch_added_up(tiny_sp_model):
    # evaluate() reads its sums once at the end; a plain loop that reads each batch's score gives the same numbers
    tok = Tokenizer.from_args("sentencepiece", tiny_sp_model)
    ids = [i for doc in document_ids(tok, japanese_lines(60, seed=4)) for i in doc]
    windows = eval_windows(np.array(ids), 24, 10_000)
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, max_seq_len=24, dropout=0.0,
                          supervision_steps=2, halt_head=True))
    r = evaluate(model, windows, tok.token_bytes(), batch_size=5)
    nats, n_bytes, halt_right = 0.0, 0, 0
    with torch.no_grad():
        for w in windows.split(5):
            targets = w[:, 1:]
            logits, _ = model(w[:, :-1])
            nats += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
            n_bytes += int(tok.token_bytes()[targets.numpy()].sum())
            for y in model.rounds(w[:, :-1]):
                halt_right += ((model.halt(y).squeeze(-1) > 0) == (model.head(y).argmax(-1) == targets)).sum().item()
    assert len(windows) % 5 and r["tokens"] == windows[:, 1:].numel() and r["bytes"] == n_bytes
    assert math.isclose(r["loss"], nats / r["tokens"], rel_tol=1e-9)
    assert math.isclose(r["bits_per_byte"], nats / math.log(2) / n_bytes, rel_tol=1e-9)
    assert r["halt_accuracy"] == halt_right / (r["tokens"] * 2)
    # the head in chunks of 2 windows (a large batch with a small batch's logits): the same scores
    chunked = evaluate(model, windows, tok.token_bytes(), batch_size=5, head_windows=2)
    assert chunked["halt_accuracy"] == r["halt_accuracy"] and chunked["bytes"] == r["bytes"]
    assert math.isclose(chunked["loss"], r["loss"], rel_tol=1e-6)  # each chunk's sum is float32: rounding


def test_evaluate_command_prints_one_json_object(tiny_checkpoint, tmp_path):
    data = tmp_path / "validation_0.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        for t in japanese_lines(50, seed=1):
            f.write(json.dumps({"text": t, "meta": {}}, ensure_ascii=False) + "\n")
    cmd = [sys.executable, "-m", "trm.evaluate", "--model_path", tiny_checkpoint, "--data", str(data),
           "--eval_tokens", "500"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "params"} <= set(result)
    assert 0 < result["tokens"] <= 500 and result["bytes"] > 0
    missing = subprocess.run([*cmd[:-4], "--data", str(tmp_path / "nope.jsonl.gz")], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "nope.jsonl.gz" in missing.stderr and "Traceback" not in missing.stderr
    no_head = subprocess.run([*cmd, "--halt_threshold", "0.5"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert no_head.returncode == 2 and "halting head" in no_head.stderr and "Traceback" not in no_head.stderr
    # records it cannot read are told of, not dropped in silence: the score rests on the others
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in japanese_lines(20, seed=2)) +
                   'not json\n{"text": null}\n{"text": ""}\n', encoding="utf-8")
    r = subprocess.run([*cmd[:-4], "--data", str(odd)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] > 0, r.stderr
    assert "warning: 3 records skipped (1 empty text, 1 malformed JSON, 1 no string 'text' field; e.g." in r.stderr
    assert "the score is on the 20 documents read" in r.stderr
    assert "records skipped" not in subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120).stderr
    # ... and when nothing is left, what was skipped is the reason (here: the text is in another field)
    (tmp_path / "body.jsonl").write_text('{"body": "猫"}\n{"body": "犬"}\n', encoding="utf-8")
    r = subprocess.run([*cmd[:-4], "--data", str(tmp_path / "body.jsonl")], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2 and "no readable documents in" in r.stderr, r.stderr
    assert "2 records skipped (2 no string 'text' field" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_adaptive_scoring_brackets_and_the_halting_accuracy(tiny_sp_model):
    tok = Tokenizer.from_args("sentencepiece", tiny_sp_model)
    ids = [i for doc in document_ids(tok, japanese_lines(20, seed=5)) for i in doc]
    windows = eval_windows(np.array(ids), 24, 200)
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, max_seq_len=24, dropout=0.0,
                          supervision_steps=3, halt_head=True))
    fixed, one_round = evaluate(model, windows, tok.token_bytes()), evaluate(model, windows, tok.token_bytes(),
                                                                              supervision_steps=1)
    never = evaluate(model, windows, tok.token_bytes(), batch_size=4, halt_threshold=1.0)
    always = evaluate(model, windows, tok.token_bytes(), batch_size=4, halt_threshold=0.0)
    assert math.isclose(never["loss"], fixed["loss"], rel_tol=1e-5) and never["recursion_share"] == 1.0
    assert math.isclose(always["loss"], one_round["loss"], rel_tol=1e-5) and always["rounds_per_token"] == 1.0
    # a fresh head says "keep thinking" everywhere: it is right exactly where a round's argmax is wrong
    with torch.no_grad():
        wrong = [(model.lm_head(s).argmax(-1) != windows[:, 1:]).float().mean().item()
                 for s in model.rounds(windows[:, :-1])]
    assert math.isclose(fixed["halt_accuracy"], sum(wrong) / 3, rel_tol=1e-6)


def test_evaluate_script_runs_from_the_data_folder(tiny_checkpoint, tmp_path):
    # the README's relative paths point into the users' data folder: the entry point must work from there
    data = tmp_path / "validation_0.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        for t in japanese_lines(30, seed=2):
            f.write(json.dumps({"text": t, "meta": {}}, ensure_ascii=False) + "\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--model_path", tiny_checkpoint, "--data", data.name,
           "--eval_tokens", "300"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] > 0
    bad = subprocess.run([*cmd[:-1], "0"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2 and "--eval_tokens must be at least 1" in bad.stderr
    help_text = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True,
                               cwd=tmp_path, env=env, timeout=120).stdout
    assert "example" in help_text and help_text.count("(default: 1000000)") == 1


def test_a_window_longer_than_the_model_was_trained_on_is_refused(tiny_checkpoint, tmp_path):
    data = tmp_path / "validation_0.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in japanese_lines(50, seed=1))
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model_path", tiny_checkpoint, "--data", str(data),
                        "--seq_len", "65"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_one_line_error(r, "--seq_len 65", "64", code=2)
    assert r.stdout == ""  # no score printed


def test_a_parquet_file_scores_as_its_jsonl_twin(tiny_checkpoint, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (requirements-test.txt)")
    import pyarrow.parquet as pq
    from trm.evaluate import main
    texts = japanese_lines(50, seed=2)
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                      encoding="utf-8")
    pq.write_table(pa.table({"body": texts}), str(tmp_path / "v.parquet"), row_group_size=7)
    scores = []
    parquet = ["--data", str(tmp_path / "v.parquet"), "--text_field", "body"]
    for data in (["--data", str(tmp_path / "v.jsonl")], parquet):
        assert main(["--model_path", tiny_checkpoint, "--eval_tokens", "500", "--device", "cpu", *data]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["tokens"] > 0 and scores[0]["loss"] == scores[1]["loss"]


def held_out(tmp_path):
    data = tmp_path / "v.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in japanese_lines(50, seed=3)),
                    encoding="utf-8")
    return str(data)


def test_running_out_of_memory_is_one_line_naming_the_batch(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import trm.evaluate

    def out_of_memory(*args, **kwargs):  # what the CPU allocator raises (a GPU's OutOfMemoryError is the same case)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789000 bytes")

    monkeypatch.setattr(trm.evaluate, "evaluate", out_of_memory)
    code = trm.evaluate.main(["--model_path", tiny_checkpoint, "--data", held_out(tmp_path), "--eval_tokens", "500",
                              "--device", "cpu", "--batch_size", "64"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "out of memory scoring 64 windows at once" in err
    assert "123.5 GB" in err and "lower --batch_size (e.g. 16)" in err


def test_depth_flags_on_a_gpt_are_refused(tiny_sp_model, tmp_path):
    # a GPT has no recursion: the flags changed nothing while generate.py's header claimed their depth
    from conftest import make_checkpoint
    path = tmp_path / "gpt.pt"
    make_checkpoint(path, Tokenizer.from_args("sentencepiece", tiny_sp_model), arch="gpt")
    for script, extra in (("evaluate.py", ["--data", held_out(tmp_path)]), ("generate.py", ["--prompt", "猫"])):
        r = subprocess.run([sys.executable, str(ROOT / script), "--model_path", str(path), *extra, "--deep_steps", "7",
                            "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert_one_line_error(r, "--deep_steps set the depth of a TRM's recursion", "is a GPT", code=2)


def test_a_checkpoint_with_non_finite_weights_is_refused(tiny_sp_model, tmp_path):
    # saved from a run that diverged: sampling failed deep in torch.multinomial and evaluation printed NaN
    from conftest import make_checkpoint
    from trm.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
    path = tmp_path / "nan.pt"
    make_checkpoint(path, Tokenizer.from_args("sentencepiece", tiny_sp_model))
    state = load_checkpoint(str(path))
    state["ema"]["model"] = {k: v.clone() for k, v in state["ema"]["model"].items()}  # (saved shared with the raw)
    state["ema"]["model"]["embed.weight"][0, 0] = float("nan")
    save_checkpoint(state, str(path))
    load_model(str(path), "raw")  # the raw weights are finite
    with pytest.raises(CheckpointError, match="not finite .*embed.weight"):
        load_model(str(path))


def test_the_json_names_the_weights_that_were_scored(tiny_sp_model, tmp_path, capsys):
    # a checkpoint trained with --ema_decay 0 has no EMA: asked for the default 'ema', its raw weights are scored,
    # and a results table built from the JSON must not file them as EMA
    from trm.checkpoint import load_checkpoint, save_checkpoint
    from trm.evaluate import main
    path = tmp_path / "no_ema.pt"
    make_checkpoint(path, Tokenizer.from_args("sentencepiece", tiny_sp_model))
    state = load_checkpoint(str(path))
    state["ema"] = None
    save_checkpoint(state, str(path))
    scores = {}
    for asked in ("ema", "raw"):
        assert main(["--model_path", str(path), "--data", held_out(tmp_path), "--eval_tokens", "200",
                     "--device", "cpu", "--weights", asked]) == 0
        scores[asked] = json.loads(capsys.readouterr().out)
    assert scores["ema"]["loss"] == scores["raw"]["loss"]  # the same weights...
    assert scores["ema"]["weights"] == scores["raw"]["weights"] == "raw"  # ...and labelled as such
    # a checkpoint with an EMA keeps the label asked for
    make_checkpoint(tmp_path / "ema.pt", Tokenizer.from_args("sentencepiece", tiny_sp_model))
    assert main(["--model_path", str(tmp_path / "ema.pt"), "--data", held_out(tmp_path), "--eval_tokens", "200",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "ema"


# ---- evaluate(compiled=True): the trainer's evaluation on a GPU, one torch.compile graph a batch (issue 20) ---------
def tiny_config(**kw):  # compiling costs per op, not per weight: one block, one net call a deep step, two rounds
    return TRMConfig(**{**dict(vocab_size=300, d_model=32, n_heads=2, max_seq_len=16, dropout=0.0, n_layers=1,
                               latent_steps=1, deep_steps=1, supervision_steps=2), **kw})


def random_windows(n):
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 300, (n, 17), generator=g), torch.randint(0, 4, (300,), generator=g)


@pytest.fixture
def graphs_compiled():
    """torch.compile starts afresh (another test's graphs count against no limit here); returns a function that
    says how many graphs it has built since: one per batch shape and depth when a batch compiles whole, more at a
    graph break, none when evaluation runs eagerly."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    start = counters["stats"]["unique_graphs"]
    return lambda: counters["stats"]["unique_graphs"] - start


@pytest.mark.slow  # compiling: ~20 s for a process's first graph (inductor cache empty), a few s for each next
@pytest.mark.parametrize("arch", ["trm", "gpt"])
def test_compiled_evaluation_gives_the_eager_scores(arch, graphs_compiled):
    # in float32 on a CPU the fused graph sums in another order, nothing more: the loss to rounding, bytes exactly
    torch.manual_seed(0)
    model = TRM(tiny_config(arch=arch, n_layers=2 if arch == "gpt" else 1))
    windows, token_bytes = random_windows(7)  # two batches of 4 windows, the second short: a shape of its own
    depths = [{}, {"deep_steps": 2}] if arch == "trm" else [{}]
    losses = []
    for depth in depths:
        eager = evaluate(model, windows, token_bytes, batch_size=4, head_windows=3, **depth)
        compiled = evaluate(model, windows, token_bytes, batch_size=4, head_windows=3, compiled=True, **depth)
        assert compiled["tokens"] == eager["tokens"] == 7 * 16 and compiled["bytes"] == eager["bytes"]
        for key in ("loss", "bits_per_byte", "perplexity"):
            assert math.isclose(compiled[key], eager[key], rel_tol=1e-5), (depth, key, compiled, eager)
        losses.append(eager["loss"])
    assert len(set(losses)) == len(depths)  # the depth reached the compiled recursion, not the trained one
    assert graphs_compiled() == 2 * len(depths)  # one graph per batch shape and depth: the batch compiled whole


@pytest.mark.slow
def test_compiled_evaluation_scores_weights_updated_in_place(graphs_compiled):
    # the trainer's EMA weights move in place between its evaluations (EMA.lerp): the compiled graph must read them
    # at each call, not keep those of its first, and must not be rebuilt for them (a new graph per evaluation)
    from trm.ema import EMA
    torch.manual_seed(0)
    raw = TRM(tiny_config())
    ema = EMA(raw, 0.9)
    windows, token_bytes = random_windows(8)  # two full batches of 4: one graph
    first = evaluate(ema.model, windows, token_bytes, batch_size=4, compiled=True)
    graphs = graphs_compiled()
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(torch.randn_like(p))
    ema.lerp(raw, 0.5)
    after = {c: evaluate(ema.model, windows, token_bytes, batch_size=4, compiled=c) for c in (False, True)}
    assert graphs_compiled() == graphs == 1
    assert abs(after[True]["loss"] - first["loss"]) > 0.01  # the update moved the score...
    assert math.isclose(after[True]["loss"], after[False]["loss"], rel_tol=1e-5)  # ...as it moved the eager one
    # the raw model, another object through the same compiled function: its own weights, not the EMA's
    raw_scores = [evaluate(raw, windows, token_bytes, batch_size=4, compiled=c)["loss"] for c in (False, True)]
    assert math.isclose(raw_scores[1], raw_scores[0], rel_tol=1e-5) and abs(raw_scores[1] - after[True]["loss"]) > 0.01


# ---- compile_blocks: each block compiled in place, the rest of the evaluation eager (issue 20) -----------------------
@pytest.mark.slow
@pytest.mark.parametrize("arch,head", [("trm", True), ("trm", False), ("gpt", True)])
def test_compiled_blocks_give_the_eager_scores_with_one_graph_per_batch_shape(arch, head, graphs_compiled):
    # the TRM with a prelude and a coda: 4 blocks, 19 block calls a batch; however many, one graph a batch shape
    torch.manual_seed(0)
    shape = dict(n_layers=2, deep_steps=2, prelude_layers=1, coda_layers=1) if arch == "trm" else dict(n_layers=3)
    model = TRM(tiny_config(arch=arch, **shape))
    windows, token_bytes = random_windows(7)  # two batches of 4 windows, the second short: a shape of its own
    eager = evaluate(model, windows, token_bytes, batch_size=4, head_windows=3)
    names = list(model.state_dict())
    compiled = evaluate(compile_blocks(model), windows, token_bytes, batch_size=4, head_windows=3, compiled_head=head)
    assert compiled["tokens"] == eager["tokens"] == 7 * 16 and compiled["bytes"] == eager["bytes"]
    for key in ("loss", "bits_per_byte", "perplexity"):
        assert math.isclose(compiled[key], eager[key], rel_tol=1e-5), (key, compiled, eager)
    # compiled (not silently eager), and shared by every block and call: one graph a batch shape (4 and 3 windows);
    # the head's loss, one a chunk shape (3 and 1 windows: the batches' chunks are 3 + 1 and 3)
    assert graphs_compiled() == (4 if head else 2)
    assert list(model.state_dict()) == names  # a checkpoint of the model keeps its names


@pytest.mark.slow
@pytest.mark.parametrize("head", [False, True])
def test_compiled_blocks_score_weights_updated_in_place(head, graphs_compiled):
    # the trainer's EMA moves its weights in place between evaluations: the compiled blocks (and head) read them at
    # each call
    from trm.ema import EMA
    torch.manual_seed(0)
    raw = TRM(tiny_config(n_layers=2))
    ema = EMA(raw, 0.9)
    compile_blocks(ema.model)
    windows, token_bytes = random_windows(8)  # two full batches of 4: one graph
    first = evaluate(ema.model, windows, token_bytes, batch_size=4, compiled_head=head)["loss"]
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(torch.randn_like(p))
    ema.lerp(raw, 0.5)
    after = evaluate(ema.model, windows, token_bytes, batch_size=4, compiled_head=head)["loss"]
    assert graphs_compiled() == 1 + head  # no graph rebuilt for new values
    reference = TRM(tiny_config(n_layers=2))  # eager, with the EMA's weights as they are now
    reference.load_state_dict(ema.model.state_dict())
    assert abs(after - first) > 0.01 and math.isclose(
        after, evaluate(reference, windows, token_bytes, batch_size=4)["loss"], rel_tol=1e-5)


def test_a_model_with_a_halting_head_is_scored_eagerly_when_compiled_is_asked(graphs_compiled):
    # halt_accuracy and adaptive scoring are not score_batch's: the eager path gives them, the same numbers exactly
    torch.manual_seed(0)
    model = TRM(tiny_config(halt_head=True))
    windows, token_bytes = random_windows(6)
    for threshold in (None, 0.5):
        eager = evaluate(model, windows, token_bytes, batch_size=4, halt_threshold=threshold)
        assert evaluate(model, windows, token_bytes, batch_size=4, halt_threshold=threshold, compiled=True) == eager
    assert graphs_compiled() == 0


def test_the_json_names_the_checkpoint_file_a_save_dir_stood_for(tiny_sp_model, tmp_path, capsys):
    # a save dir stands for its best.pt, else its newest checkpoint: the JSON named the folder, so a results table could
    # not tell which file was scored (and the same folder names another file once training goes on)
    from trm.evaluate import main
    save = tmp_path / "checkpoints_new"
    save.mkdir()
    make_checkpoint(save / "step_7.pt", Tokenizer.from_args("sentencepiece", tiny_sp_model))
    args = ["--model_path", str(save), "--data", held_out(tmp_path), "--eval_tokens", "200", "--device", "cpu"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(save / "step_7.pt")
    make_checkpoint(save / "best.pt", Tokenizer.from_args("sentencepiece", tiny_sp_model))
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(save / "best.pt")
    # a file named is named as given
    assert main([*args[:1], str(save / "step_7.pt"), *args[2:]]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(save / "step_7.pt")


def test_unknown_targets_are_named_where_no_byte_fallback_carries_their_bytes(tiny_sp_model, tmp_path):
    # a tokenizer without byte fallback (the users' earlier ja_trm.model) maps a character outside its vocabulary to
    # <unk>, which stands for no bytes: bits/byte counts its loss and not its bytes, and should say so
    import sentencepiece as spm
    model_file = tmp_path / "no_fallback"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(japanese_lines()), model_prefix=str(model_file),
                                   vocab_size=300, model_type="bpe", byte_fallback=False, character_coverage=0.98,
                                   unk_id=0, pad_id=1, bos_id=2, eos_id=3, minloglevel=2)
    text = "鬱蒼とした森の奥で、猫は静かに眠っていた。" * 20
    for tokenizer, unknowns in ((Tokenizer.from_args("sentencepiece", str(model_file) + ".model"), True),
                                (Tokenizer.from_args("sentencepiece", tiny_sp_model), False)):
        windows = eval_windows(np.array(next(document_ids(tokenizer, [text]))), 16, 10_000)
        note = unknown_note(windows, tokenizer)
        assert (note is not None) == unknowns
        if unknowns:
            n = int((windows[:, 1:] == 0).sum())
            assert note.startswith(f"{n:,} of the scored tokens") and "no byte fallback" in note
