"""`RunLock`: one writer per folder, a holder named, a killed holder's lock taken over; the lock holds
the folder itself (not a file name), never writes through a planted link, notices a moved folder, and
never removes another holder's lock file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.processes import ROOT
from trainer.runs.lock import LockFileError, RunLock, RunLockedError, RunLockLostError
from trainer.runs.lock_file import LOCK_FILE

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock is POSIX")

# Another process that takes the folder's lock with `RunLock`, says so, and holds it until it is killed.
# The lock needs only the standard library: importing it loads no torch.
HOLDER = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, sys.argv[2])
    from trainer.runs.lock import RunLock
    assert "torch" not in sys.modules
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    threading.Event().wait(60)
""")


@pytest.fixture
def holder(tmp_path):
    """A live process holding `tmp_path`'s lock."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), str(ROOT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def test_a_second_process_is_refused_and_told_who_holds_the_folder(tmp_path, holder):
    """Another process's lock refuses this one, naming its pid and host, and its record stays."""
    with pytest.raises(RunLockedError) as refused:
        RunLock(tmp_path).acquire()
    assert refused.value.holder["pid"] == holder.pid and refused.value.holder["host"] == socket.gethostname()
    assert f"pid {holder.pid} on {socket.gethostname()}" in str(refused.value)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # the holder's record is kept


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, holder):
    """SIGKILL leaves the lock file but the kernel drops the lock: the next holder takes it over,
    records itself, and removes the file on release."""
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()  # SIGKILL left the file; the kernel dropped the lock
    with RunLock(tmp_path) as lock:
        assert lock.taken_over["pid"] == holder.pid
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_release_removes_the_file_and_frees_the_folder(tmp_path):
    """A second lock in one process is refused too; release removes the file and frees the folder."""
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError):  # another open of the file is refused, also in one process
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path) as second:
        assert second.held and second.taken_over is None


def test_a_folder_where_the_lock_cannot_be_written_raises_oserror(read_only_folder):
    """A folder where the lock file cannot be created is an OSError, not a held lock."""
    with pytest.raises(OSError):
        RunLock(read_only_folder()).acquire()


def test_live_holder_names_a_live_holder_only(tmp_path, holder):
    """`live_holder` names a live holder, None once it was killed, and its peek leaves the lock free."""
    assert RunLock(tmp_path).live_holder()["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert RunLock(tmp_path).live_holder() is None
    assert RunLock(tmp_path).acquire().taken_over["pid"] == holder.pid  # the peek left the lock free


def test_removing_the_lock_file_does_not_free_the_folder(tmp_path, holder):
    """The lock holds the folder itself: with the live holder's lock file removed, a second process
    is still refused, naming the holder (on Linux the kernel's lock table names it), and writes nothing."""
    (tmp_path / LOCK_FILE).unlink()
    with pytest.raises(RunLockedError) as refused:
        RunLock(tmp_path).acquire()
    assert RunLock(tmp_path).live_holder() is not None
    if os.path.exists("/proc/locks"):
        assert refused.value.holder == {"pid": holder.pid, "host": socket.gethostname()}
        assert f"pid {holder.pid} on {socket.gethostname()})" in str(refused.value)
    assert not list(tmp_path.iterdir())  # the refused process created no lock file


@pytest.mark.parametrize("planted", ["symlink", "dangling symlink", "hard link", "folder", "fifo"])
def test_a_lock_path_that_is_not_a_plain_file_is_refused_and_never_written(tmp_path, planted):
    """A ``.lock`` planted as a link (to a file elsewhere, or to none), a hard link, a folder or a FIFO
    is refused in one line naming it; the file it leads to is unchanged (or not created), and the
    folder is free again once it is removed."""
    folder, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    target, path = elsewhere / "notes.txt", folder / LOCK_FILE
    if planted != "dangling symlink":
        target.write_text("someone's notes")
    {
        "symlink": lambda: path.symlink_to(target),
        "dangling symlink": lambda: path.symlink_to(target),
        "hard link": lambda: os.link(target, path),
        "folder": path.mkdir,
        "fifo": lambda: os.mkfifo(path),
    }[planted]()
    with pytest.raises(LockFileError) as refused:
        RunLock(folder).acquire()
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{path} is ") and "remove it, or use another folder" in line
    kind = {"symlink": "symbolic link", "hard link": "2 hard links", "folder": "a folder", "fifo": "a FIFO"}
    assert kind.get(planted, "symbolic link") in line
    if planted == "dangling symlink":
        assert not target.exists()
    else:
        assert target.read_text() == "someone's notes"
    assert RunLock(folder).holder() == {}
    path.rmdir() if planted == "folder" else path.unlink()
    with RunLock(folder) as lock:  # the refusal left the folder free
        assert lock.held


def test_release_never_removes_a_lock_file_it_does_not_own(tmp_path):
    """A holder whose lock file was removed notices it (`check`); once another process wrote a lock
    file there, `check` names that process, and the holder's release leaves that file in place."""
    lock = RunLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).unlink()
    with pytest.raises(RunLockLostError, match=r"the lock file .*\.lock was removed$") as lost:
        lock.check()
    assert lost.value.lock_file and not lost.value.removed
    record = {"pid": 4242, "host": "elsewhere", "started": "2026-11-27 10:15:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(RunLockLostError, match=r"was replaced by one of pid 4242 on elsewhere, started 2026"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == record


def test_a_moved_folder_is_noticed_and_its_lock_released_where_it_went(tmp_path):
    """A holder whose folder was renamed learns where it went (`check`); a new folder at the old
    name is another folder, locked by another holder, whose lock file the first one's release
    leaves alone while removing its own in the moved folder. A removed folder is told apart."""
    folder, moved = tmp_path / "run", tmp_path / "moved"
    folder.mkdir()
    lock = RunLock(folder).acquire()
    folder.rename(moved)
    with pytest.raises(RunLockLostError) as lost:
        lock.check()
    assert str(lost.value) == f"the folder {folder} was moved to {moved}" and lost.value.moved_to == moved
    folder.mkdir()
    with RunLock(folder) as newer:  # a new run at the old name
        lock.release()
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid() and newer.held
        assert not (moved / LOCK_FILE).exists()  # released where the folder went

    gone = RunLock(moved).acquire()
    shutil.rmtree(moved)
    with pytest.raises(RunLockLostError) as lost:
        gone.check()
    assert lost.value.removed and str(lost.value) == f"the folder {moved} was removed"
    gone.release()


def test_without_locks_on_folders_the_lock_file_still_guards(tmp_path, monkeypatch):
    """On a file system that refuses flock on a folder, the lock file's flock alone guards it: the
    lock is taken, a second one refused, and the folder free after release."""
    real = fcntl.flock

    def flock(fd, operation):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    assert not list(tmp_path.iterdir())
    RunLock(tmp_path).acquire().release()


# Another user's process (uid 65533, which owns no file) trying to lock folders whose lock file a
# dead run of uid 65534 left behind: one that lets it remove the file, one with the sticky bit that
# does not. It prints, per folder, what it took over or the error's type and message.
OTHER_USER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from trainer.runs.lock import RunLock
    os.setgid(65533)
    os.setuid(65533)
    for folder in sys.argv[2:]:
        try:
            lock = RunLock(folder).acquire()
            print(json.dumps({"taken_over": lock.taken_over, "owner": os.stat(lock.path).st_uid}))
            lock.release()
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
""")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changes owners and users: needs root")
def test_another_users_stale_lock_is_taken_over_or_named_in_one_line(tmp_path):
    """A stale lock file of another user (uid 65534, mode 0644) is taken over where this user may
    remove it, also by root; in a sticky folder, where it may not, the refusal says so in one line
    naming the file's owner, its dead holder and what to do: not that the folder is not writable."""
    record = {"pid": 999999, "host": "gpu-7", "started": "2026-11-27 10:15:00"}

    def stale(folder: Path, mode: int) -> Path:
        folder.mkdir()
        folder.chmod(mode)
        (folder / LOCK_FILE).write_text(json.dumps(record))
        os.chown(folder / LOCK_FILE, 65534, 65534)
        return folder

    with RunLock(stale(tmp_path / "root's", 0o755)) as lock:  # root opens it: taken over in place
        assert lock.taken_over == record and json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()

    shared = Path(tempfile.mkdtemp(prefix="shared-", dir="/tmp"))  # tmp_path's parents let no other user in
    try:
        shared.chmod(0o755)
        open_folder, sticky = stale(shared / "open", 0o777), stale(shared / "sticky", 0o1777)
        result = subprocess.run(
            [sys.executable, "-c", OTHER_USER, str(ROOT), str(open_folder), str(sticky)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        taken, refused = map(json.loads, result.stdout.splitlines())
        assert taken == {"taken_over": record, "owner": 65533}, result.stderr
        assert not (open_folder / LOCK_FILE).exists()  # released
        assert refused["error"] == "LockFileError", refused
        path = sticky / LOCK_FILE
        assert refused["message"] == (
            f"{path} is a stale lock file of another user, nobody (uid 65534), left by pid 999999 on gpu-7, started "
            "2026-11-27 10:15:00, which no longer runs; this user may not remove it (the folder has the sticky bit: "
            "only the file's owner may): ask nobody or an administrator to remove it, or use another folder"
        )
        assert json.loads(path.read_text()) == record
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=True)
