"""The one place that decides device and precision, and says why; and what this machine's Python costs each start."""
import importlib.util
import inspect
import os
import re
import sys

import torch
import torch.distributed as dist

from trm.cli import fail_once
from trm.optim import MuonAdamW

DEVICES = ("auto", "cuda", "mps", "cpu")  # and cuda:N, a GPU by number


def refuse(message):
    # under torchrun each process of a machine asks for the same device: one line a machine (another, whose GPUs may
    # differ, says its own)
    fail_once(message, local=True)


def pick_device(requested="auto", dtype="auto"):
    """Returns (device, autocast dtype or None, reason). cuda -> mps -> cpu; bf16 autocast on capable GPUs."""
    if requested == "auto":
        if torch.cuda.is_available():
            device, why = torch.device("cuda"), "CUDA GPU found"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device, why = torch.device("mps"), "Apple GPU (MPS) found"
        else:
            device, why = torch.device("cpu"), "no GPU found"
    else:
        kind, _, number = requested.partition(":")
        if kind not in DEVICES[1:] or (number and not (kind == "cuda" and number.isdigit())):
            refuse(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {requested!r}")
        device, why = torch.device(requested), "--device"
        if device.type == "cuda" and not torch.cuda.is_available():
            refuse("--device cuda was given but torch.cuda.is_available() is False (no GPU, or a CPU-only torch "
                   "build)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            refuse(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                   f"cuda:{torch.cuda.device_count() - 1}")
        if device.type == "cuda" and device.index is not None:
            # and the current device: the CUDA graphs of decoding and of --compile whole are captured on streams of
            # the current device (torch.cuda.Stream()), which must be the model's
            torch.cuda.set_device(device)
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            refuse("--device mps was given but torch.backends.mps.is_available() is False (MPS is Apple's GPU, on "
                   "macOS with a torch built for it)")
    if dtype == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        amp = torch.bfloat16 if bf16_ok else None
        why += ", bf16 autocast" if bf16_ok else ", fp32"
    elif dtype == "bf16":
        amp, why = torch.bfloat16, why + ", bf16 autocast (--dtype)"
    elif dtype == "fp32":
        amp, why = None, why + ", fp32 (--dtype)"
    else:
        refuse(f"--dtype must be auto, bf16 or fp32, got {dtype!r}")
    return device, amp, why


def start_processes(device):
    """(world_size, rank, device) of this process: under torchrun the process group is started and a GPU rank gets
    its local GPU; alone, (1, 0, device)."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world_size > 1:
        if device.type == "cuda" and device.index is not None:
            refuse(f"--device {device} under torchrun: each process takes the GPU of its LOCAL_RANK; give --device "
                   f"cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        # told its device, NCCL binds each rank to its GPU at once instead of guessing from the global rank (which
        # can hang when ranks map to GPUs unevenly, as across nodes)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return world_size, rank, device


def end_processes(code, ddp):
    """Exit with `code`; under torchrun once every rank is here (a process group torn down on one side only can abort
    the other), the group destroyed. Then without the interpreter's finalization: gloo's teardown there aborted rank 1
    of a complete run, twice in CI ("terminate called without an active exception" after "done:", and torchrun failed
    the run), even with the DDP wrapper freed first. The caller has nothing left to do: its files are written and
    closed, its output is flushed here."""
    if not ddp:
        sys.exit(code)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def distributed(model, device):
    """model in DistributedDataParallel. Its buffers (initial states, rotary tables) are constants: no need to
    broadcast them every forward (torch 2.13 renamed that flag and warns at the old name, once per rank)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{name: False})


def autocast(device, amp_dtype):
    """Context manager for the forward pass: bf16 autocast when chosen, otherwise a no-op."""
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def autocast_each(steps, device, amp_dtype):
    """Each next() of the iterator `steps` under autocast, and nothing between two: for a generator whose steps are
    forward passes and whose caller runs the backward and the optimizer step in between (--sup_update each)."""
    while True:
        with autocast(device, amp_dtype):
            step = next(steps, None)
        if step is None:
            return
        yield step


def out_of_memory(e):
    """None when `e` is not running out of memory; otherwise what the failed allocation asked for, in words
    (' (it asked for 12.3 GB more)'), or ''. CPU tensors fail with a RuntimeError from the allocator, not
    MemoryError."""
    cuda_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    cpu_oom = isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    if not (isinstance(e, (MemoryError, cuda_oom)) or cpu_oom):
        return None
    m = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGT]iB)", str(e))
    if not m:
        return ""
    return f" (it asked for {int(m[1]) / 1e9:,.1f} GB more)" if m[1] else f" (it asked for {m[2]} more)"


def training_out_of_memory(e, device, batch_size, seq_len, d_model):
    """The trainer's line for running out of memory, naming the flags to lower and to what; None for any other error."""
    if (more := out_of_memory(e)) is None:
        return None
    return (f"{'CUDA' if device.type == 'cuda' else 'CPU'} out of memory at --batch_size {batch_size} --max_seq_len "
            f"{seq_len} --d_model {d_model}{more}. Reduce --batch_size (e.g. {max(1, batch_size // 4)}; keep the "
            f"global batch with --grad_accum), --max_seq_len (e.g. {max(16, seq_len // 2)}) or --d_model (e.g. "
            f"{max(32, d_model // 2)})")


def compile_training(model, optimizer, mode, deep_steps):
    """The trainer's model under torch.compile for --compile on/graphs/whole (mode), and Muon's update too.
    Compiled after DDP, so the compiler splits the graph at gradient buckets and overlaps the all-reduce; CUDA graphs
    replay a whole step's kernels with one launch: small batches are launch-bound, not math-bound."""
    import torch._dynamo
    # one graph per depth a depth schedule asks for (--random_depth deep: 2T of them), each compiled once
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * deep_steps + 4)
    model = torch.compile(model, mode="reduce-overhead" if mode == "graphs" else None)
    if isinstance(optimizer, MuonAdamW):  # ~170 launches a step from Python would hold back a 12-layer GPT on a GPU
        optimizer.muon.compile(graphed=mode == "whole")  # (captured, its shapes stay apart: trm/muon.py)
    return model


def bytecode_note(module_file=None, dont_write=None):
    """One line when Python compiles torch from source at every start, else None: torch installed without its bytecode
    (`uv pip install` compiles none unless told to) and Python not allowed to write it (PYTHONDONTWRITEBYTECODE, which
    many container images set, or a read-only install). On an H100's host `import torch, torch._dynamo` took 12.1 s
    so, against 3.6 s with the bytecode (BENCHMARKS.md, issue 20), and every run pays it again."""
    module_file = module_file or torch.__file__
    dont_write = sys.flags.dont_write_bytecode if dont_write is None else dont_write
    cached = importlib.util.cache_from_source(module_file)  # (under PYTHONPYCACHEPREFIX when it is set)
    if os.path.exists(cached):
        return None
    folder = os.path.dirname(cached)
    while not os.path.isdir(folder):  # (__pycache__ not made yet: whether its parent may be written)
        folder = os.path.dirname(folder)
    head = ("Python compiles torch from source at every start here, several seconds each time (its install has no "
            "bytecode")
    if not os.access(folder, os.W_OK):  # (compileall could not write there either)
        return (f"{head} and {folder} is read-only). Set PYTHONPYCACHEPREFIX to a writable folder and leave "
                f"PYTHONDONTWRITEBYTECODE unset: the first run writes it there, the next ones read it")
    if not dont_write:
        return None  # this start writes it, the next ones read it
    return (f"{head} and PYTHONDONTWRITEBYTECODE is set). Write it once: python -m compileall -q "
            f"{os.path.dirname(module_file)} (pip install does; uv pip install with --compile-bytecode)")
