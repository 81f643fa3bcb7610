"""Files that appear whole or not at all: written under a temporary name in the same folder, then renamed over the
real one, so a crash, a kill or a full disk leaves the old file as it was (or none), never a half-written one.

An existing `path` that is not a regular file (a FIFO, a device such as /dev/null, a directory) is refused before
anything is written (NotAFileError, an OSError): renaming over it would replace the device or pipe by a plain file
(as root, `--output /dev/null` would delete the real one), and writing through it would not be atomic.

Every temporary file of the project is named by `tmp_name`: `<name>.tmp.<host>.<pid>`. The host and pid keep two
writers apart (two trainers on one shared folder, say) and tell `remove_stale_tmp` whether the writer is gone.
"""
import errno
import os
import re
import socket
import stat

TMP = re.compile(r"\.tmp\.(?:(.+)\.)?(\d+)$")  # no host: a name from before hosts were added


def tmp_name(path):
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


class NotAFileError(OSError):
    pass


KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_target(path):
    """Raise NotAFileError when `path` exists and is not a regular file (a link is judged by what it points to)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # absent (the usual case), or unreachable: the write itself says what is wrong
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
        raise NotAFileError(errno.EEXIST, f"it is {kind}, not a regular file (refusing to replace it)", path)


class AtomicFile:
    """An open temporary file that becomes `path` on commit() and vanishes on discard().

    As a context manager it commits when the block ends normally and discards on any exception, so the old `path`
    survives a failed write. durable=False skips the fsync: for large outputs that are cheap to redo (a token cache
    is rebuilt, step 1 is rerun), where waiting for the disk costs seconds and power loss is the only risk."""

    def __init__(self, path, mode="wb", durable=True, **open_kwargs):
        check_target(path)
        self.path, self.tmp, self.durable = path, tmp_name(path), durable
        self.file = open(self.tmp, mode, **open_kwargs)

    def commit(self):
        try:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())  # the bytes reach the disk before the name does
            self.file.close()
            os.replace(self.tmp, self.path)
            if self.durable:
                sync_folder(os.path.dirname(self.path))  # and the new name reaches it too
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


def sync_folder(folder):
    """fsync a folder's entries: after a power cut a rename (or a removal) not yet synced there may be undone, and a
    checkpoint that was on disk would have no name. Where a folder cannot be synced (some filesystems), it is not."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
