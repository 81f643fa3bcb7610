"""trm/flags.py: flags that contradict each other are refused in one line before anything runs."""
import pytest

from trm.flags import check_flags, trainer_parser


def parse(*argv):
    return trainer_parser().parse_args(list(argv))


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


def test_a_cool_down_belongs_to_wsd_and_is_a_share_of_the_run():
    assert check_flags(parse("--lr_schedule", "wsd")) is None
    assert check_flags(parse("--lr_schedule", "wsd", "--lr_cooldown", "1")) is None
    problem = check_flags(parse("--lr_cooldown", "0.3"))  # the default cosine has no cool-down to set
    assert "--lr_schedule wsd" in problem and "cosine" in problem
    for bad in ("0", "1.5", "nan"):
        problem = check_flags(parse("--lr_schedule", "wsd", "--lr_cooldown", bad))
        assert problem.startswith("--lr_cooldown must be greater than 0 and at most 1"), problem
