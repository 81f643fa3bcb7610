"""Files that appear whole or not at all: written under a temporary name in the same folder, then renamed over the
real one, so a crash, a kill or a full disk leaves the old file as it was (or none), never a half-written one.

Every temporary file of the project is named by `tmp_name`: `<name>.tmp.<host>.<pid>`. The host and pid keep two
writers apart (two trainers on one shared folder, say) and tell `remove_stale_tmp` whether the writer is gone.
"""
import os
import re
import socket

TMP = re.compile(r"\.tmp\.(?:(.+)\.)?(\d+)$")  # no host: a name from before hosts were added


def tmp_name(path):
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


class AtomicFile:
    """An open temporary file that becomes `path` on commit() and vanishes on discard().

    As a context manager it commits when the block ends normally and discards on any exception, so the old `path`
    survives a failed write. durable=False skips the fsync: for large outputs that are cheap to redo (a token cache
    is rebuilt, step 1 is rerun), where waiting for the disk costs seconds and power loss is the only risk."""

    def __init__(self, path, mode="wb", durable=True, **open_kwargs):
        self.path, self.tmp, self.durable = path, tmp_name(path), durable
        self.file = open(self.tmp, mode, **open_kwargs)

    def commit(self):
        try:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())  # the bytes reach the disk before the name does
            self.file.close()
            os.replace(self.tmp, self.path)
        finally:
            self.discard()

    def discard(self):
        try:
            self.file.close()  # (after a failed write, close retries the flush and fails again: it closes all the same)
        except OSError:
            pass
        try:
            os.remove(self.tmp)
        except OSError:  # renamed already
            pass

    def __enter__(self):
        return self.file

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.commit()
        else:
            self.discard()


def remove_stale_tmp(folder, prefix=""):
    """Delete the temporary files in `folder` (those whose name starts with `prefix`) of writers on this host that are
    gone (kill -9, the OOM killer, power loss); a live writer's file is left alone. Returns the removed paths."""
    try:
        names = os.listdir(folder)
    except OSError:  # no such folder (yet), or not one: nothing to clean, and the write that follows says what is wrong
        return []
    host, removed = socket.gethostname(), []
    for name in names:
        m = TMP.search(name)
        if m and name.startswith(prefix) and m.group(1) in (host, None) and not pid_alive(int(m.group(2))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except FileNotFoundError:  # another process cleaning up at the same time
                pass
    return removed


def pid_alive(pid):
    """Whether a process of this host has this pid (the owner of a temporary file, say)."""
    try:
        os.kill(pid, 0)  # signal 0: only the existence check
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True
