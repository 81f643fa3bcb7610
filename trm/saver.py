"""Checkpoints written off the training loop's critical path.

The training thread only copies the checkpoint's state into CPU buffers kept from one save to the next (pinned when
the state is on a GPU: non-blocking copies, then one sync). A background thread then checksums, writes, renames and
prunes that copy through RunDir.save, exactly as a save on the training thread would: each file whole or not at all,
best.pt and --keep_last as before. The weights keep changing while the thread writes, which is why the copy is taken
at the step and not by the thread.

At most one write is in flight: the next save waits for it first, so one set of buffers suffices; the end of the run
and a non-finite stop wait for it too, and any other exit waits at interpreter exit (atexit). A second Ctrl-C
abandons it (`abandon`): the rename has either happened or not, so the folder holds the old files or the new one.

The thread never prints. RunDir's lines ("saved ...", "removed ...") and a failure are handed to the training thread,
which passes them on between steps (`poll`): a line from another thread could land inside tqdm's redraw or between a
step's log line and its eval line, and the log keeps the order of the steps. A failed write is the same one-line
message as a failed save on the training thread always was, given at the next step, save or end of run.
"""
import atexit
import collections
import copy
import os
import sys
import threading

import torch

from trm.atomic import tmp_name
from trm.run_dir import SaveDirError


def _raise(message):
    raise SaveDirError(message)


class Saver:
    def __init__(self, run_dir, log, on_error=_raise):
        """run_dir: the RunDir that writes (its log is routed through this saver: see the module's note); log: the
        training thread's logger; on_error(message): what a failed write becomes there (raises SaveDirError unless
        told otherwise, e.g. the trainer's fail())."""
        self.run_dir, self.log, self.on_error = run_dir, log, on_error
        self.lines = collections.deque()  # append (writer) and popleft (trainer) are atomic: no lock needed
        run_dir.log = self.lines.append
        self.buffers = {}  # the state's path (("model", "embed.weight"), ...) -> its CPU copy, reused across saves
        self.thread = self.writing = None
        self.outcome = {}  # the write in flight's: {"error": exception}, set by the thread; a fresh dict per write
        atexit.register(self._at_exit)

    def save(self, state, name, val_loss=None, quiet=False):
        """Copy state now, write it as `name` in the background; returns the path it will have. The same arguments as
        RunDir.save."""
        self.wait()
        snapshot = self.snapshot(state)
        self.writing = os.path.join(self.run_dir.save_dir, name)
        self.outcome = {}
        self.thread = threading.Thread(target=self._write, args=(snapshot, name, val_loss, quiet, self.outcome),
                                       name="checkpoint-writer", daemon=True)  # daemon: a second Ctrl-C can leave it
        self.thread.start()
        return self.writing

    def _write(self, state, name, val_loss, quiet, outcome):
        try:
            self.run_dir.save(state, name, val_loss, quiet)
        except BaseException as e:  # noqa: BLE001 - whatever it is, the training thread must hear of it
            outcome["error"] = e  # (into this write's own dict: an abandoned write's failure is nobody's news)

    def snapshot(self, state):
        """state with every tensor copied into this saver's buffers and every container rebuilt, so that nothing the
        training goes on changing (weights, Adam moments, the args dict) is shared with what the thread writes."""
        copied = {}  # tensors sharing memory (tied embeddings) stay shared, as torch.save would store them
        devices = set()

        def walk(x, key):
            if isinstance(x, torch.Tensor):
                ident = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.dtype, x.shape, x.stride())
                if ident not in copied:
                    copied[ident] = self._copy(x.detach(), key)
                    if x.is_cuda:
                        devices.add(x.device)
                return copied[ident].view(x.shape)  # its own tensor object on the shared copy, as in the state
            if isinstance(x, dict):
                out = collections.OrderedDict() if isinstance(x, collections.OrderedDict) else {}
                for k, v in x.items():
                    out[k] = walk(v, key + (k,))
                if hasattr(x, "_metadata"):  # a state_dict's module versions, read by load_state_dict
                    out._metadata = copy.deepcopy(x._metadata)
                return out
            if type(x) in (list, tuple):
                return type(x)(walk(v, key + (i,)) for i, v in enumerate(x))
            if x is None or isinstance(x, (bool, int, float, str, bytes)):
                return x
            return copy.deepcopy(x)

        out = walk(state, ())
        for device in devices:  # the one wait for the device-to-host copies queued above
            torch.cuda.synchronize(device)
        return out

    def _copy(self, x, key):
        pin = x.is_cuda  # pinned memory makes the copy asynchronous and fast; it only pays from a GPU
        buf = self.buffers.get(key)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype or buf.is_pinned() != pin:
            buf = self.buffers[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)
        return buf.copy_(x, non_blocking=pin)

    def poll(self):
        """Between steps: pass on the writer's lines, and its failure once the write has ended."""
        if self.thread is not None and not self.thread.is_alive():
            self.thread = None
        self._report()

    def wait(self):
        """Until the write in flight is on disk (or has failed); then as poll."""
        if self.thread is not None:
            self.thread.join()  # a signal interrupts it: see abandon
            self.thread = None
        self._report()

    def _report(self):
        while self.lines:
            self.log(self.lines.popleft())
        if self.thread is None and "error" in self.outcome:
            e = self.outcome.pop("error")
            if not isinstance(e, SaveDirError):
                raise e  # a bug, not the disk: its traceback, as on the training thread before
            self.on_error(str(e))

    def abandon(self):
        """A second Ctrl-C: stop waiting for the write in flight. Its partial temporary file is removed (a kill -9
        leaves it to the next trainer, which removes temporary files of dead processes); the thread dies with the
        process, before or after its rename, never halfway."""
        if self.thread is None or not self.thread.is_alive():
            return
        self.thread, self.outcome = None, {}
        path = self.writing
        for tmp in (tmp_name(path), tmp_name(os.path.join(self.run_dir.save_dir, "best.pt"))):
            try:
                os.remove(tmp)
            except OSError:
                pass
        self.log(f"abandoned writing {path}; {self.run_dir.survivor()}")

    def abort(self, master, line):
        """A second Ctrl-C: give up the write in flight and end the process now, rank 0 saying `line`. Stopping by an
        exception instead could surface it anywhere, even inside torch.save ('RuntimeError: unexpected pos'), and
        interpreter shutdown would then wait for or tear down the writer thread."""
        self.abandon()
        if master:  # (torchrun passes the signal to every rank)
            print(line, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # no atexit: the abandoned write is not waited for

    def close(self):
        """Wait for the last write and let go of the buffers."""
        self.wait()
        self.buffers.clear()
        atexit.unregister(self._at_exit)

    def _at_exit(self):
        # the process is ending on some other error (that one was already reported): finish or abandon the write,
        # and say what became of it in one line rather than a traceback from inside atexit
        try:
            self.wait()
        except KeyboardInterrupt:
            self.abandon()
        except SystemExit:  # on_error told it already
            pass
        except BaseException as e:  # noqa: BLE001
            print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr, flush=True)
