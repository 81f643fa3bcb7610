"""trm/flags.py: flags that contradict each other are refused in one line before anything runs."""
import pytest

from trm.flags import check_flags, trainer_parser


def parse(*argv):
    return trainer_parser("trainer\n\nexample").parse_args(list(argv))


@pytest.mark.parametrize("argv,words", [
    (("--random_depth", "--depth_warmup", "0.3"), "--depth_warmup"),
    (("--random_depth", "deep", "--depth_warmup", "0.3"), "--random_depth"),
    (("--sup_update", "each", "--grad_accum", "2"), "--sup_update each"),
    (("--train_halt_threshold", "0.5",), "--act_weight"),
    (("--overwrite", "--resume", "auto"), "choose one"),
])
def test_contradicting_flags_are_one_line(argv, words):
    problem = check_flags(parse(*argv))
    assert problem is not None and words in problem and "\n" not in problem


@pytest.mark.parametrize("argv", [(), ("--random_depth",), ("--depth_warmup", "0.3"), ("--sup_update", "each")])
def test_each_alone_is_taken(argv):
    assert check_flags(parse(*argv)) is None
