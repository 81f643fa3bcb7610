"""What redrawing the curves after every evaluation cost the procedure's run (--max_steps 50000 --log_every 100
--eval_every 500: 500 train points and 100 evaluations), and what one redraw costs with the whole history.

    python bench/plot_speed.py [--reps 11]

MetricsLog.draw is the redraw that plot() now does at most once a minute. The first call imports matplotlib (once per
process) and is left out of the sums.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trm.metrics import MetricsLog  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--reps", type=int, default=11, help="redraws timed with the whole history")
p.add_argument("--max_steps", type=int, default=50_000)
p.add_argument("--log_every", type=int, default=100)
p.add_argument("--eval_every", type=int, default=500)
args = p.parse_args()


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


with tempfile.TemporaryDirectory() as d:
    log = MetricsLog(d, "trm d_model=256 n_layers=2")
    first = timed(log.draw)  # (an empty figure: the import)
    run = []  # after each evaluation, with the history up to it, as the trainer drew
    for step in range(1, args.max_steps + 1):
        if step % args.log_every == 0:
            log.history.append({"step": step, "kind": "train", "loss": 8 / (1 + step / 5000)})
        if step % args.eval_every == 0:
            log.history.append({"step": step, "kind": "eval", "loss": 8.2 / (1 + step / 5000)})
            run.append(timed(log.draw))
    whole = [timed(log.draw) for _ in range(args.reps)]
print(f"first draw (imports matplotlib): {first:.3f} s")
print(f"a redraw after each of {len(run)} evaluations: {sum(run):.1f} s in all (median {statistics.median(run):.3f} s, "
      f"last {run[-1]:.3f} s)")
print(f"one redraw of the whole history ({len(log.history) - len(run)} train, {len(run)} eval points): median "
      f"{statistics.median(whole):.3f} s, min {min(whole):.3f} s over {args.reps}")
