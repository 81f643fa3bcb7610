"""trm/atomic.py: a file appears whole or not at all, the old one survives a failed write, and the temporary files
of writers that died are removed while a live writer's are not."""
import os
import socket
import subprocess
import sys

import pytest

from trm.atomic import AtomicFile, NotAFileError, remove_stale_tmp, tmp_name


def test_the_new_file_appears_only_when_the_block_ends(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with AtomicFile(str(path), "w") as f:
        f.write("new")
        f.flush()
        assert path.read_text() == "old" and os.path.exists(tmp_name(str(path)))
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(OSError):
        with AtomicFile(str(path), "w") as f:
            f.write("half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("durable", [True, False])
def test_a_durable_file_reaches_the_disk_before_its_name_and_its_name_after_the_rename(tmp_path, monkeypatch, durable):
    # what a power cut would test: the file's bytes synced before the rename, the folder's entry after it (else the
    # rename may be undone and a checkpoint left without a name); durable=False syncs neither
    path, synced = tmp_path / "out.txt", []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.path.realpath(f"/proc/self/fd/{fd}"), os.path.exists(path)))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with AtomicFile(str(path), "w", durable=durable) as f:
        f.write("new")
    tmp = os.path.realpath(tmp_name(str(path)))
    assert synced == ([(tmp, False), (os.path.realpath(tmp_path), True)] if durable else [])


def test_temporary_names_hold_host_and_pid():
    assert tmp_name("/d/step_3.pt") == f"/d/step_3.pt.tmp.{socket.gethostname()}.{os.getpid()}"


def test_only_temporary_files_of_dead_writers_on_this_host_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    stale = [f"a.bin.tmp.{host}.{dead}", f"step_3.pt.tmp.{dead}"]  # (no host: names from before hosts were added)
    kept = [f"a.bin.tmp.{host}.{os.getpid()}", f"a.bin.tmp.otherhost.{dead}", "step_3.pt", "notes.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(os.path.basename(p) for p in remove_stale_tmp(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    (tmp_path / f"b.txt.tmp.{host}.{dead}").write_bytes(b"x")
    assert remove_stale_tmp(str(tmp_path), prefix="a.") == []  # another output's leftovers are not this one's


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_an_output_that_is_not_a_regular_file_is_refused_before_anything_is_written(tmp_path, kind):
    path = tmp_path / "out.txt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path = tmp_path / "null"
        os.symlink("/dev/null", path)  # a link to a device is judged by the device
    with pytest.raises(NotAFileError, match="not a regular file") as e:
        AtomicFile(str(path), "w")
    assert isinstance(e.value, OSError) and e.value.filename == str(path)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file, and the FIFO/folder/link is left as it was
    assert os.stat("/dev/null").st_mode & 0o170000 == 0o020000
