"""recipes.openmp: the OpenMP wait policy decided at a command's start from the machine's load."""

from __future__ import annotations

import subprocess
import sys

from recipes.openmp import busy_cpus, choose_wait_policy
from tests.processes import ROOT, checkout_env


def test_busy_cpus_sees_another_process_keep_a_cpu_busy():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cpus(0.5)
    finally:
        burner.kill()
        burner.wait()
    assert busy is not None and busy >= 0.6


def test_busy_cpus_without_proc_stat_is_unknown(tmp_path):
    assert busy_cpus(0.0, stat=str(tmp_path / "missing")) is None


def test_passive_only_when_other_work_leaves_too_few_cpus(mocker):
    mocker.patch("os.cpu_count", return_value=2)
    mocker.patch.dict(sys.modules)  # restored after the test
    sys.modules.pop("torch")  # as before torch is imported
    environ: dict[str, str] = {}
    assert "spin" in choose_wait_policy(2, environ, measure=lambda: 0.1) and environ == {}
    words = choose_wait_policy(2, environ, measure=lambda: 1.0)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"} and "sleep" in words and "1.0 CPUs busy" in words
    environ = {}
    assert "spin" in choose_wait_policy(1, environ, measure=lambda: 1.0) and environ == {}  # one thread fits


def test_a_policy_the_user_set_is_kept(mocker):
    mocker.patch.dict(sys.modules)
    sys.modules.pop("torch")
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait_policy(2, environ, measure=lambda: 2.0) == "OpenMP waiting as set by OMP_WAIT_POLICY=ACTIVE"
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_too_late_once_torch_is_loaded():
    environ: dict[str, str] = {}
    assert choose_wait_policy(2, environ, measure=lambda: 2.0) == "OpenMP waiting left as loaded"
    assert environ == {}


def test_the_recipe_command_decides_before_torch_loads_and_prints_it(tmp_path):
    """A real recipe process beside a busy CPU: the policy is set before torch loads, and the
    line that reports the precision says so."""
    code = (
        "import sys, os, recipes; assert 'torch' not in sys.modules or os.environ.get('OMP_WAIT_POLICY'); "
        "import torch; print(recipes.WAIT_POLICY); print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = checkout_env()
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        env.pop(name, None)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert done.returncode == 0, done.stderr
    words, policy = done.stdout.splitlines()[-2:]
    assert words.startswith("OpenMP threads sleep while waiting") and policy == "PASSIVE"
