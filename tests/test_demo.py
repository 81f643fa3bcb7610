"""demo/run_demo.sh (`make demo`): steps 1-4 end to end, on a DATA_DIR given as users type it."""
import os
import subprocess
import sys

from test_demo_corpus import generate

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo", "run_demo.sh")


def run_demo(cwd, data_dir, work):
    # the smallest settings that still run every step: the flow is under test here, not the model
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=data_dir, WORK=str(work), STEPS="6", VOCAB="1000",
               D_MODEL="32", BATCH="2", SEQ="32")
    return subprocess.run(["bash", SCRIPT], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_data_dir_relative_to_where_make_runs_is_found(tmp_path):
    # `make demo DATA_DIR=../shared/corpus/aozora`: the script moves into its work folder, the path is the caller's
    generate(tmp_path / "corpus")
    r = run_demo(tmp_path, "corpus", tmp_path / "work")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "work" / "checkpoints_new" / "final_step_6.pt").is_file()
    assert "validation (EMA weights)" in r.stdout


def test_a_data_dir_that_is_not_a_folder_or_holds_no_shards_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for data_dir, words in (("missing", "is not a folder"), ("empty", "no train_*.jsonl.gz")):
        r = run_demo(tmp_path, data_dir, tmp_path / "work")
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "work" / "checkpoints_new").exists()
