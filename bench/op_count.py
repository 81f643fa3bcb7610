"""The operations one training step runs, by kind: a stand-in, on any machine, for the kernels a launch-bound step
launches on a GPU.

    python bench/op_count.py --run "gpt7=--arch gpt --n_layers 7 --tie_embeddings --qk_norm --zero_init" \
        --run "trm384_ad4=--d_model 384 --n_heads 6 --latent_steps 1 --supervision_steps 1 --grad_deep_steps 0 \
                --tie_embeddings --qk_norm --zero_init --adapter_rank 4"

Each --run is NAME=FLAGS, the trainer's model flags (the rest take the trainer's defaults, "seed=" is the seed
model; --dropout 0 unless given; other trainer flags are read and ignored).
One forward and backward of --batch_size x --max_seq_len random tokens runs eagerly on the CPU, and every ATen call is
counted (the optimizer and the EMA are not: they are the same for the same parameters). At the procedure's batch 4 a
compiled step on an H200 is bound by how many kernels it launches, not by their arithmetic (BENCHMARKS.md), and the
matmuls are the kernels no compiler fuses: "mm" is the column to read. Pointwise ops are fused under torch.compile,
so "all" overstates a compiled step. The rows count what runs at this batch: the adapters merge their deltas into the
weights above a few hundred rows a call (trm/adapters.py) and multiply thin factors below.
"""
import argparse
import collections
import os
import shlex
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trm.flags import ARCH_FLAGS, trainer_parser  # noqa: E402
from trm.model import TRM, TRMConfig  # noqa: E402

MATMULS = ("mm", "addmm", "bmm", "baddbmm")


class Count(TorchDispatchMode):
    """Every ATen call under it, by name (its overload packet: mm, add, ...)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--run", action="append", required=True, help="NAME=FLAGS (the trainer's model flags)")
p.add_argument("--batch_size", type=int, default=4)
p.add_argument("--max_seq_len", type=int, default=512)
p.add_argument("--vocab_size", type=int, default=16000)
args = p.parse_args()

trainer = trainer_parser(__doc__ + "\n\n")
print(f"one training step, forward and backward, batch {args.batch_size} x {args.max_seq_len}, eager on the CPU")
print("| run | matmuls (mm) | attention | all ops | most frequent |")
print("|---|---|---|---|---|")
for spec in args.run:
    name, eq, flags = spec.partition("=")
    if not name or not eq:  # (empty FLAGS: the seed model)
        sys.exit(f"error: --run {spec!r}: give NAME=FLAGS")
    try:
        words = shlex.split(flags)
        flag_args, unknown = trainer.parse_known_args(["--dropout", "0"] + words)
        if unknown:
            sys.exit(f"error: --run {name}: not model flags: {' '.join(unknown)}")
        cfg = TRMConfig(vocab_size=args.vocab_size, **{k: getattr(flag_args, k) for k in ARCH_FLAGS
                                                       if k != "max_seq_len"}, max_seq_len=args.max_seq_len)
    except ValueError as e:
        sys.exit(f"error: --run {name}: {e}")
    model = TRM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (args.batch_size, args.max_seq_len), generator=torch.Generator().manual_seed(0))
    with Count() as count:
        _, loss = model(idx, targets=idx)
        loss.backward()
    calls = count.calls
    attention = sum(n for op, n in calls.items() if "attention" in op)
    top = ", ".join(f"{op} {n}" for op, n in calls.most_common(5))
    print(f"| {name} | {sum(calls[op] for op in MATMULS)} | {attention} | {sum(calls.values())} | {top} |")
