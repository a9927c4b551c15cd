"""`RunLock`: one writer per folder, a holder named, a killed holder's lock taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.processes import ROOT
from trainer.run_lock import LOCK_FILE, RunLock, RunLockedError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock is POSIX")

# Another process that takes the folder's lock with `RunLock`, says so, and holds it until it is killed.
# It loads trainer/run_lock.py from its file: importing the `trainer` package would load torch, for
# seconds, and the lock needs only the standard library.
HOLDER = textwrap.dedent("""
    import importlib.util, sys, threading
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
    run_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_lock)
    run_lock.RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    threading.Event().wait(60)
""")


@pytest.fixture
def holder(tmp_path):
    """A live process holding `tmp_path`'s lock."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), str(ROOT / "trainer" / "run_lock.py")],
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
