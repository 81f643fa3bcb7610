"""The documents' commands: every training command the README and the Japanese procedure recommend parses with the
trainer's own flags, so a renamed or removed flag cannot leave a command users copy that fails at once."""
import re
import shlex
from pathlib import Path

import pytest

from trm.flags import trainer_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/TRAINING_PROCEDURE.ja.md"]


def training_commands(doc):
    """The `python train_trm_lm.py ...` lines of a document's bash blocks, continuation lines joined, comments cut;
    a command with a literal `...` (an abbreviation) is not one to run."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python train_trm_lm.py") and "..." not in line:
                yield shlex.split(line, comments=True)[2:]


@pytest.mark.parametrize("doc", DOCS)
def test_every_training_command_of_the_docs_parses(doc):
    parser = trainer_parser("the docs' commands\n\nexample")
    commands = list(training_commands(doc))
    assert len(commands) >= 2  # the procedure's step 3 and the recommended command(s) at least
    for argv in commands:
        args = parser.parse_args(argv)  # argparse exits (a test failure) on an unknown flag or a bad value
        assert args.sp_model


def test_a_removed_flag_would_be_caught():
    parser = trainer_parser("the docs' commands\n\nexample")
    with pytest.raises(SystemExit):
        parser.parse_args(["--sp_model", "ja_trm.model", "--no_such_flag", "1"])
