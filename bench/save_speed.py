"""How long a checkpoint save stops the training loop: RunDir.save on the training thread (before) against
trm/saver.py's snapshot, with the write in a background thread (after).

    python bench/save_speed.py                      # seed size (d_model 256) and d_model 512, on this machine's device
    python bench/save_speed.py --device cuda --reps 5

The state is what train_trm_lm.py saves (weights, EMA, AdamW moments, RNG, args). Columns: the checkpoint's size; the
training thread's time per save, synchronous and background (median of --reps; the first background save allocates
its buffers, shown apart); how long the background write itself takes; and a training step's time alone and while a
write is in flight (the thread competes for the CPU: on a GPU machine the step runs on the device instead).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from trm.ema import EMA  # noqa: E402
from trm.model import TRM, TRMConfig  # noqa: E402
from trm.run_dir import RunDir  # noqa: E402
from trm.saver import Saver  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--d_models", type=int, nargs="+", default=[256, 512])
p.add_argument("--reps", type=int, default=3)
p.add_argument("--step_tokens", type=int, default=256, help="tokens of the training step timed beside a write")
p.add_argument("--dir", default=None, help="where to write (default: a temporary folder; the same disk matters)")
args = p.parse_args()
device = torch.device(args.device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(f):
    sync()
    t = time.perf_counter()
    f()
    sync()
    return time.perf_counter() - t


rows = []
for d_model in args.d_models:
    torch.manual_seed(0)
    cfg = TRMConfig(d_model=d_model, n_heads=d_model // 64)
    model = TRM(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ema = EMA(model, 0.995)
    x = torch.randint(0, cfg.vocab_size, (1, args.step_tokens), device=device)

    def train_step():
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)

    def state(step):
        return {"config": cfg.to_dict(), "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "rng": {"torch": torch.get_rng_state()},
                "args": vars(args)}

    train_step()  # Adam's moments exist from the first step on
    work = tempfile.mkdtemp(prefix="trm_save_", dir=args.dir)
    before = RunDir(os.path.join(work, "sync"), 2, lambda line: None)
    sync_s = [timed(lambda: before.save(state(i), f"step_{i}.pt")) for i in range(args.reps)]
    size = os.path.getsize(before.saved[-1])

    saver = Saver(RunDir(os.path.join(work, "async"), 2, lambda line: None), lambda line: None)
    first = timed(lambda: saver.save(state(0), "step_0.pt"))
    saver.wait()
    async_s, write_s, step_alone, step_writing = [], [], [], []
    for i in range(1, args.reps + 1):
        step_alone.append(timed(train_step))
        t = time.perf_counter()
        async_s.append(timed(lambda: saver.save(state(i), f"step_{i}.pt")))
        step_writing.append(timed(train_step))  # starts while the write has just begun
        saver.wait()
        write_s.append(time.perf_counter() - t)
    saver.close()
    shutil.rmtree(work, ignore_errors=True)  # two folders of checkpoints per model size: left in /tmp, ~1 GB a run
    rows.append((f"d_model {d_model}", f"{model.num_params() / 1e6:.1f}M", f"{size / 1e6:.0f}", sync_s, async_s,
                 [first], write_s, step_alone, step_writing))

print(f"device: {device}, torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
      f"--reps {args.reps}, step: batch 1 x {args.step_tokens} tokens; seconds as median (min): other jobs only add")
print("| model | params | checkpoint MB | sync save s (training thread) | background save s (training thread) | "
      "first background save s (allocates) | background write s | step s alone | step s during a write |")
print("|---|---|---|---|---|---|---|---|---|")
for name, n, mb, *t in rows:
    print(f"| {name} | {n} | {mb} | " + " | ".join(
        f"{statistics.median(v):.3f}" + (f" ({min(v):.3f})" if len(v) > 1 else "") for v in t) + " |")
