"""trainer.openmp: where torch's OpenMP threads run and how they wait, decided at the first
``import trainer``, before torch loads."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import trainer.openmp as openmp_module
from tests.processes import ROOT, checkout_env
from trainer import Callback, Trainer
from trainer.openmp import (
    PLACEMENT_MARK,
    WaitPolicy,
    busy_cpus,
    choose_placement,
    choose_wait_policy,
    late_import_warning,
    one_cpu_each,
)

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


@pytest.fixture
def before_torch(mocker):
    """As before torch is imported, on a machine without a CPU quota."""
    mocker.patch.dict(sys.modules)  # restored after the test
    sys.modules.pop("torch")
    mocker.patch.object(openmp_module, "cpu_quota", return_value=None)


def test_passive_only_when_other_work_leaves_too_few_cpus(mocker, before_torch):
    """Where threads cannot be bound (here: one CPU in the mask), they sleep (PASSIVE) only when
    other work leaves fewer free CPUs than this process's threads."""
    mocker.patch("os.cpu_count", return_value=2)
    environ: dict[str, str] = {}
    assert "spin" in choose_wait_policy(2, environ, measure=lambda: 0.1, cpus=[0]).summary and environ == {}
    policy = choose_wait_policy(2, environ, measure=lambda: 1.0, cpus=[0])
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"} and policy.summary == "OpenMP sleeps (busy)"
    assert "1.0 CPUs busy" in policy.reason and not policy.placed
    environ = {}
    assert "spin" in choose_wait_policy(1, environ, measure=lambda: 1.0, cpus=[0]).summary and environ == {}


def test_pinned_threads_spin_unless_other_work_keeps_every_cpu_busy(mocker, before_torch):
    """Threads that use every CPU of the process alone are bound one to a CPU, and keep OpenMP's
    spinning default beside busy processes while a CPU is free of them; when none is (another
    training run), they sleep while waiting, still pinned."""
    mocker.patch("os.cpu_count", return_value=4)
    environ: dict[str, str] = {}
    policy = choose_wait_policy(4, environ, measure=lambda: 3.0, cpus=[4, 5, 6, 7])
    assert policy.placed == (4, 5, 6, 7) and policy.summary == "OpenMP pinned"
    assert policy.reason == (
        "OpenMP threads spin while waiting: 3.0 CPUs busy with other work, one pinned to each of CPUs 4-7 "
        "(the main thread to the first during a fit)"
    )
    places = "{4,5,6,7},{5},{6},{7}"
    assert environ == {"OMP_PROC_BIND": "true", "OMP_PLACES": places, PLACEMENT_MARK: places}
    environ = {}
    policy = choose_wait_policy(4, environ, measure=lambda: 3.8, cpus=[4, 5, 6, 7])
    assert policy.placed == (4, 5, 6, 7) and policy.summary == "OpenMP pinned, sleeps"
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE" and environ["OMP_PLACES"] == places


def test_the_first_place_holds_every_cpu_and_each_next_one_cpu():
    """The main thread (bound to the first place) keeps all the CPUs; every other thread gets one
    of its own, in any mask."""
    assert one_cpu_each([1, 0]) == "{0,1},{1}"
    assert one_cpu_each([9, 2, 5]) == "{2,5,9},{5},{9}"


@pytest.mark.parametrize(
    ("environ", "cpus", "quota"),
    [
        ({}, [0], None),  # one CPU: nothing to bind
        ({}, [0, 1, 2, 3], 2.0),  # a container's quota below its CPUs: others may bind to the same ones
        ({"LOCAL_WORLD_SIZE": "2"}, [0, 1, 2, 3], None),  # torchrun's processes share the CPUs
        ({"OMP_NUM_THREADS": "2"}, [0, 1, 2, 3], None),  # fewer threads than CPUs
        ({"OMP_PROC_BIND": "false"}, [0, 1], None),  # the user's choice
        ({"GOMP_CPU_AFFINITY": "0-1"}, [0, 1], None),
        ({"OMP_PLACES": "cores"}, [0, 1], None),
    ],
)
def test_threads_are_bound_only_where_each_can_have_a_cpu_of_its_own(mocker, before_torch, environ, cpus, quota):
    mocker.patch.object(openmp_module, "cpu_quota", return_value=quota)
    given = dict(environ)
    assert choose_placement(environ, cpus) == () and environ == given


def test_a_placement_inherited_from_a_parent_is_decided_again(before_torch):
    """A child process inherits the parent's variables: one that imports trainer binds for its own
    CPUs, and keeps a placement the user set (it differs from the mark)."""
    parent: dict[str, str] = {}
    choose_placement(parent, [0, 1, 2, 3])
    child = dict(parent)
    assert choose_placement(child, [2, 3]) == (2, 3) and child["OMP_PLACES"] == "{2,3},{3}"
    child = dict(parent, OMP_NUM_THREADS="1")  # a data-loading worker, say
    assert choose_placement(child, [0, 1, 2, 3]) == () and child == {"OMP_NUM_THREADS": "1"}
    user = dict(parent, OMP_PLACES="cores")
    assert choose_placement(user, [0, 1]) == () and user == {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"}


def test_a_policy_the_user_set_is_kept(mocker, before_torch):
    """An OMP_WAIT_POLICY the user set is kept and named, whatever the load (threads are still
    bound where they can be)."""
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    policy = choose_wait_policy(2, environ, measure=lambda: 2.0, cpus=[0])
    assert policy.reason == "OpenMP waiting as set by OMP_WAIT_POLICY=ACTIVE"
    assert policy.summary == "OpenMP as set"
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}
    policy = choose_wait_policy(2, environ, measure=lambda: 2.0, cpus=[0, 1])
    assert policy.summary == "OpenMP as set, pinned" and environ["OMP_PLACES"] == "{0,1},{1}"


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
            seen.update({key: os.environ.get(key) for key in ("OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES")})
        return None
sys.meta_path.insert(0, Watch())
exec(sys.argv[1])
print("at torch import:", seen)
"""


def run_beside_busy_cpus(code: str, busy: int = 2, **variables: str) -> subprocess.CompletedProcess:
    """Run `code` (after `AT_TORCH_IMPORT`'s watch) in a fresh process beside `busy` busy CPUs,
    with no OpenMP variable set but `variables`."""
    env = checkout_env()
    for name in (*openmp_module.USER_SETTINGS, *openmp_module.USER_PLACEMENT, PLACEMENT_MARK):
        env.pop(name, None)
    env.update(variables)
    with spinning(busy):
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
    """With every CPU busy, ``import trainer`` (which ``import recipes`` and every recipe command
    do first) sets the variables before torch is imported, so torch's OpenMP runtime reads them:
    threads bound one to a CPU where each has one of its own, and sleeping while they wait; where
    the user chose not to bind, sleeping while they wait."""
    busy = os.cpu_count() or 1
    done = run_beside_busy_cpus("import trainer; import torch; print(trainer.WAIT_POLICY.reason)", busy)
    words, seen = done.stdout.splitlines()[-2:]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 and (openmp_module.cpu_quota() or math.inf) > len(cpus) - 1:  # a CPU for each thread
        assert words.startswith("OpenMP threads sleep while waiting") and "one pinned to each of CPUs" in words
        places = one_cpu_each(cpus)
        expected = f"{{'OMP_WAIT_POLICY': 'PASSIVE', 'OMP_PROC_BIND': 'true', 'OMP_PLACES': '{places}'}}"
        assert seen == f"at torch import: {expected}"
    done = run_beside_busy_cpus(
        "import trainer; import torch; print(trainer.WAIT_POLICY.reason)", busy, OMP_PROC_BIND="false"
    )
    words, seen = done.stdout.splitlines()[-2:]
    assert words.startswith("OpenMP threads sleep while waiting")
    assert seen == "at torch import: {'OMP_WAIT_POLICY': 'PASSIVE', 'OMP_PROC_BIND': 'false', 'OMP_PLACES': None}"


#: Trains nothing: starts torch's threads, reads where each may run, starts a child process, forks
#: one inside a fit's `threads_at_work`, then drops to one thread as ``--threads 1`` does.
WHERE_THREADS_RUN = """
import json, os, subprocess, sys
import trainer
import torch
from trainer.pinning import threads_at_work

def masks():
    return sorted(sorted(os.sched_getaffinity(int(task))) for task in os.listdir("/proc/self/task"))

def forked():
    read, write = os.pipe()
    if os.fork() == 0:
        os.write(write, json.dumps(sorted(os.sched_getaffinity(0))).encode())
        os._exit(0)
    os.wait()
    return json.loads(os.read(read, 4096))

cpus = sorted(os.sched_getaffinity(0))
torch.set_num_threads(len(cpus))
torch.empty(len(cpus) * 65536).fill_(1.0)  # a parallel region: every thread starts
seen = dict(cpus=cpus, placed=trainer.WAIT_POLICY.placed, bound=masks(), main=sorted(os.sched_getaffinity(0)))
seen["child"] = json.loads(subprocess.run(
    [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"], capture_output=True, text=True
).stdout)
with threads_at_work(len(cpus)):
    seen["fit"], seen["forked"] = sorted(os.sched_getaffinity(0)), forked()
seen["after"] = sorted(os.sched_getaffinity(0))
torch.set_num_threads(1)
with threads_at_work(1):
    seen["released"] = masks()
print(json.dumps(seen))
"""


def test_bound_threads_take_one_cpu_each_and_leave_the_main_thread_and_children_every_cpu():
    """In a real process: each OpenMP thread but the first runs on a CPU of its own; the main
    thread, and a process it starts, keep every CPU; during a fit the main thread keeps to the
    first CPU, a process forked then gets every CPU, and the main thread gets them back after;
    a fit that runs fewer threads gives every thread all the CPUs back. Where threads cannot be
    bound (one CPU), none is."""
    done = run_beside_busy_cpus(WHERE_THREADS_RUN, busy=0)
    seen = json.loads(done.stdout.splitlines()[-2])  # the last: what AT_TORCH_IMPORT saw
    cpus = seen["cpus"]
    assert seen["main"] == seen["child"] == seen["forked"] == seen["after"] == cpus
    assert all(mask == cpus for mask in seen["released"])
    if len(cpus) < 2:
        assert seen["placed"] == [] and seen["fit"] == cpus and all(mask == cpus for mask in seen["bound"])
        return
    assert seen["placed"] == cpus and seen["fit"] == cpus[:1]
    assert [mask for mask in seen["bound"] if mask != cpus] == [[cpu] for cpu in cpus[1:]]


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
    """torch imported before trainer keeps OpenMP's defaults: too late to change; beside busy
    CPUs the fit says so in one warning with the fix, at the script's line that called fit."""
    done = run_beside_busy_cpus(TORCH_FIRST)
    lines = [line for line in done.stderr.splitlines() if "torch was imported before trainer" in line]
    assert len(lines) == 1 and "import trainer (or recipes) before torch" in lines[0], done.stderr
    assert "OMP_WAIT_POLICY=PASSIVE" in lines[0] and "not pinned to CPUs" in lines[0]
    fit_line = next(n for n, line in enumerate(TORCH_FIRST.splitlines(), 1) if ".fit(" in line)
    assert lines[0].startswith(f"<string>:{fit_line}: RuntimeWarning"), lines[0]


def test_the_late_import_warning_only_when_too_late_and_busy(mocker):
    mocker.patch("os.cpu_count", return_value=2)
    late = WaitPolicy("OpenMP as loaded", "left as loaded", too_late=True)
    assert late_import_warning(late, 2, measure=lambda: 1.8) is not None
    assert late_import_warning(late, 2, measure=lambda: 0.2) is None  # idle: spinning is the fastest
    assert late_import_warning(late, 2, measure=lambda: None) is None  # load unknown
    decided = WaitPolicy("OpenMP spins (idle)", "decided before torch")
    assert late_import_warning(decided, 2, measure=lambda: 1.8) is None


class CPUsOfTheWorker(torch.utils.data.Dataset):
    """Samples that hold how many CPUs the data-loading worker that made them may use."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.tensor([float(len(os.sched_getaffinity(0)))]), torch.zeros(1)


def test_a_fit_keeps_its_thread_on_one_cpu_and_its_data_loading_workers_on_every_cpu():
    """During a fit with pinned threads, the fit's thread keeps to the first CPU, while the
    DataLoader workers it starts (training and validation) may use every CPU, and the DataLoader
    sees them all (no advice to start fewer workers than CPUs); the thread gets every CPU back
    after the fit."""
    cpus = sorted(os.sched_getaffinity(0))
    seen: dict[str, list] = {"thread": [], "workers": []}

    class Spy(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            seen["thread"].append(sorted(os.sched_getaffinity(0)))
            seen["workers"] += batch[0].flatten().tolist()

    loader = torch.utils.data.DataLoader(CPUsOfTheWorker(), batch_size=4, num_workers=len(cpus))
    model = nn.Linear(1, 1)
    fit = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.0), nn.MSELoss(), max_epochs=1, device="cpu", callbacks=[Spy()]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*worker processes in total")
        fit.fit(loader, loader)
    pinned = openmp_module.WAIT_POLICY.placed and torch.get_num_threads() == len(cpus)
    assert seen["thread"] == [cpus[:1] if pinned else cpus] * 2
    assert seen["workers"] == [float(len(cpus))] * 8
    assert sorted(os.sched_getaffinity(0)) == cpus
