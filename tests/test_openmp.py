"""trainer.openmp: the OpenMP wait policy decided at the first ``import trainer`` from the machine's load."""

from __future__ import annotations

import contextlib
import subprocess
import sys

from tests.processes import ROOT, checkout_env
from trainer.openmp import WaitPolicy, busy_cpus, choose_wait_policy, late_import_warning

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
    policy = choose_wait_policy(2, environ, measure=lambda: 2.0)
    assert policy.reason == "OpenMP waiting left as loaded: torch was imported before trainer" and policy.too_late
    assert environ == {}


#: Records the OpenMP variables at the moment torch is first imported, then runs the code given.
AT_TORCH_IMPORT = """
import importlib.abc, os, sys
seen = {}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update({key: os.environ.get(key) for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")})
        return None
sys.meta_path.insert(0, Watch())
exec(sys.argv[1])
print("at torch import:", seen)
"""


def run_beside_busy_cpus(code: str) -> subprocess.CompletedProcess:
    """Run `code` (after `AT_TORCH_IMPORT`'s watch) in a fresh process beside two busy CPUs, with no
    OpenMP variable set."""
    env = checkout_env()
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        env.pop(name, None)
    with spinning(2):
        done = subprocess.run(
            [sys.executable, "-c", AT_TORCH_IMPORT, code],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    return done


def test_importing_trainer_decides_before_torch_loads():
    """Beside two busy CPUs, ``import trainer`` (which ``import recipes`` and every recipe command
    do first) sets the policy before torch is imported, so torch's OpenMP runtime reads it."""
    done = run_beside_busy_cpus("import trainer; import torch; print(trainer.WAIT_POLICY.reason)")
    words, seen = done.stdout.splitlines()[-2:]
    assert words.startswith("OpenMP threads sleep while waiting")
    assert seen == "at torch import: {'OMP_WAIT_POLICY': 'PASSIVE', 'GOMP_SPINCOUNT': None}"


#: A user's script that imports torch before trainer and trains on the CPU.
TORCH_FIRST = """
import torch
from torch import nn
from trainer import Trainer
model = nn.Linear(4, 1)
data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(2)]
Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), max_epochs=1, device="cpu").fit(data)
"""


def test_a_fit_after_torch_was_imported_first_on_a_busy_machine_says_why_and_how_to_fix_it():
    """torch imported before trainer keeps OpenMP's spinning default: too late to change; beside
    busy CPUs the fit says so in one warning with the fix."""
    done = run_beside_busy_cpus(TORCH_FIRST)
    lines = [line for line in done.stderr.splitlines() if "torch was imported before trainer" in line]
    assert len(lines) == 1 and "import trainer (or recipes) before torch" in lines[0], done.stderr
    assert "OMP_WAIT_POLICY=PASSIVE" in lines[0]


def test_the_late_import_warning_only_when_too_late_and_busy(mocker):
    mocker.patch("os.cpu_count", return_value=2)
    late = WaitPolicy("OpenMP as loaded", "left as loaded", too_late=True)
    assert late_import_warning(late, 2, measure=lambda: 1.8) is not None
    assert late_import_warning(late, 2, measure=lambda: 0.2) is None  # idle: spinning is the fastest
    assert late_import_warning(late, 2, measure=lambda: None) is None  # load unknown
    decided = WaitPolicy("OpenMP spins (idle)", "decided before torch")
    assert late_import_warning(decided, 2, measure=lambda: 1.8) is None
