"""recipes.openmp: the OpenMP wait policy decided at a command's start from the machine's load."""

from __future__ import annotations

import contextlib
import subprocess
import sys

from recipes.openmp import busy_cpus, choose_wait_policy
from tests.processes import ROOT, checkout_env

# A process that keeps one CPU busy; it says so once it runs its loop.
SPIN = "print('spinning', flush=True)\nwhile True: pass"


@contextlib.contextmanager
def spinning(count: int):
    """`count` processes keeping a CPU busy each, already spinning inside the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        for spinner in spinners:
            assert spinner.stdout.readline() == "spinning\n"
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_busy_cpus_sees_another_process_keep_a_cpu_busy():
    """Another process's busy loop shows in the CPUs counted busy (the test's own work does not)."""
    with spinning(1):
        busy = busy_cpus(0.5)
    assert busy is not None and busy >= 0.6


def test_busy_cpus_without_proc_stat_is_unknown(tmp_path):
    """Without /proc/stat the load is unknown (None), not zero."""
    assert busy_cpus(0.0, stat=str(tmp_path / "missing")) is None


def test_passive_only_when_other_work_leaves_too_few_cpus(mocker):
    """Threads sleep (PASSIVE) only when other work leaves fewer free CPUs than this process's threads."""
    mocker.patch("os.cpu_count", return_value=2)
    mocker.patch.dict(sys.modules)  # restored after the test
    sys.modules.pop("torch")  # as before torch is imported
    environ: dict[str, str] = {}
    assert "spin" in choose_wait_policy(2, environ, measure=lambda: 0.1).summary and environ == {}
    policy = choose_wait_policy(2, environ, measure=lambda: 1.0)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"} and policy.summary == "OpenMP sleeps (busy)"
    assert "1.0 CPUs busy" in policy.reason
    environ = {}
    assert "spin" in choose_wait_policy(1, environ, measure=lambda: 1.0).summary and environ == {}  # one thread fits


def test_a_policy_the_user_set_is_kept(mocker):
    """An OMP_WAIT_POLICY the user set is kept and named, whatever the load."""
    mocker.patch.dict(sys.modules)
    sys.modules.pop("torch")
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    policy = choose_wait_policy(2, environ, measure=lambda: 2.0)
    assert policy.reason == "OpenMP waiting as set by OMP_WAIT_POLICY=ACTIVE"
    assert policy.summary == "OpenMP as set"
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_too_late_once_torch_is_loaded():
    """Once torch is loaded its OpenMP runtime has read the policy: nothing is changed."""
    environ: dict[str, str] = {}
    assert choose_wait_policy(2, environ, measure=lambda: 2.0).reason == "OpenMP waiting left as loaded"
    assert environ == {}


def test_importing_the_recipes_decides_before_torch_loads():
    """A real process beside two busy CPUs: importing `recipes`, as every recipe command does first,
    sets the policy without loading torch, so torch's OpenMP runtime reads it when it loads; the
    words the precision line reports say so."""
    code = (
        "import os, sys, recipes; assert 'torch' not in sys.modules, 'recipes loaded torch'; "
        "print(recipes.WAIT_POLICY.reason); print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = checkout_env()
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        env.pop(name, None)
    with spinning(2):
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr
    words, policy = done.stdout.splitlines()[-2:]
    assert words.startswith("OpenMP threads sleep while waiting") and policy == "PASSIVE"
