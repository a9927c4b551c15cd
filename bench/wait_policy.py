"""How torch's OpenMP threads should wait and where they should run: each libgomp setting, idle
and beside busy processes.

    python -m bench.wait_policy [--rounds 2] [--busy 0 1 2] [--workloads unet-bf16 unet cnn]

libgomp reads ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``OMP_PROC_BIND`` and ``OMP_PLACES`` once,
when torch loads it, so each setting runs in a process of its own: a training step of the default
run's network (NestedUNet, standard widths, batch 4 of 64x64 images) in bf16 autocast and
channels-last (what the default run chooses on a CPU with native bf16) and in float32 (elsewhere),
and of the tutorial's small CNN (batch 4 of 28x28, thousands of tiny parallel regions, where
waiting costs most). ``OMP_PROC_BIND=true`` binds every thread, the main one included, to a CPU
of its own; "trainer" is what ``import trainer`` before torch decides on this machine, with the
steps run as a fit runs them (`trainer.pinning.threads_at_work`). Beside 0, 1 and 2 CPU-bound
processes (``while True: pass``), in rounds that interleave the settings, so load and drift fall
on all of them alike. Prints, per workload, the median step time of each setting and its ratio to
the default (no variable set) under the same load and to the default's idle time (on 2 cores
beside one busy process the fair share is 2x).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

from bench.recipe_runs import run_checkout
from tests.processes import checkout_env
from trainer.openmp import PLACEMENT_MARK, USER_PLACEMENT, USER_SETTINGS, affinity_cpus

#: Set in a worker that imports trainer before torch, as a recipe does.
TRAINER_FIRST = "BENCH_IMPORT_TRAINER_FIRST"
#: name -> the environment variables of the setting (the default sets none).
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "SPINCOUNT=0": {"GOMP_SPINCOUNT": "0"},
    "SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
    "OMP_PROC_BIND=true": {"OMP_PROC_BIND": "true"},
    "OMP_PROC_BIND=true PASSIVE": {"OMP_PROC_BIND": "true", "OMP_WAIT_POLICY": "PASSIVE"},
    "trainer": {TRAINER_FIRST: "1"},
}
SECONDS = {"unet-bf16": 4.0, "unet": 4.0, "cnn": 2.0}  # timed work per measurement


def worker(workload: str, seconds: float) -> None:
    """Train `workload` for about `seconds` after a warm-up; print the median step time (JSON)."""
    if os.environ.get(TRAINER_FIRST):
        import trainer  # noqa: F401 - decides the OpenMP settings before torch loads
    import torch
    from torch import nn

    torch.manual_seed(0)
    bf16 = workload == "unet-bf16"
    if workload.startswith("unet"):
        from models import NestedUNet

        model: nn.Module = NestedUNet(num_classes=1, input_channels=3)
        inputs, targets = torch.randn(4, 3, 64, 64), torch.rand(4, 1, 64, 64).round()
        if bf16:
            model = model.to(memory_format=torch.channels_last)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        loss_fn: nn.Module = nn.BCEWithLogitsLoss()
    else:
        from models import FashionCNN

        model = FashionCNN()
        inputs, targets = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()

    as_in_a_fit: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if os.environ.get(TRAINER_FIRST):
        from trainer.pinning import threads_at_work

        as_in_a_fit = threads_at_work(torch.get_num_threads())
    times: list[float] = []
    with as_in_a_fit:
        for _ in range(3):
            step()
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(times) < 5:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    print(json.dumps({"step": statistics.median(times), "steps": len(times)}))


def measure(workload: str, setting: str) -> float:
    """The median step time of `workload` in a fresh process with `setting`'s environment."""
    unset = (*USER_SETTINGS, *USER_PLACEMENT, PLACEMENT_MARK, TRAINER_FIRST)
    env = {key: value for key, value in checkout_env().items() if key not in unset}
    output = run_checkout([sys.executable, "-m", "bench.wait_policy", "--worker", workload], env | SETTINGS[setting])
    return float(json.loads(output.strip().splitlines()[-1])["step"])


def busy_processes(count: int) -> list[subprocess.Popen[bytes]]:
    """`count` CPU-bound processes (a Python loop each)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    """Measure every setting under every load; print one table per workload."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=sorted(SECONDS), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside the run")
    parser.add_argument("--workloads", nargs="+", choices=list(SECONDS), default=list(SECONDS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, SECONDS[args.worker])
        return 0
    if "default" not in args.settings:
        args.settings.insert(0, "default")
    results: dict[tuple[str, int, str], list[float]] = {}
    for busy in args.busy:
        others = busy_processes(busy)
        try:
            time.sleep(0.5)
            for round_ in range(args.rounds):
                for workload in args.workloads:
                    for setting in args.settings:
                        step = measure(workload, setting)
                        results.setdefault((workload, busy, setting), []).append(step)
                        print(
                            f"busy {busy} round {round_ + 1} {workload} {setting}: {step * 1000:.1f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            for process in others:
                process.kill()
                process.wait()
    cpus = affinity_cpus()
    print(f"`python -m bench.wait_policy --rounds {args.rounds}`: {cpus} CPUs; each cell: the median step time,")
    print("its ratio to the default under the same load and to the default with no busy process (lower is faster).\n")
    for workload in args.workloads:
        median = {key: statistics.median(values) for key, values in results.items() if key[0] == workload}
        header = " | ".join(f"{busy} busy" for busy in args.busy)
        print(f"**{workload}**\n\n| setting | {header} |\n|---|" + "---|" * len(args.busy))
        for setting in args.settings:
            cells = []
            idle = median[(workload, args.busy[0], "default")]
            for busy in args.busy:
                step, base = median[(workload, busy, setting)], median[(workload, busy, "default")]
                cells.append(f"{step * 1000:.1f} ms ({step / base:.2f}x; {step / idle:.2f}x idle default)")
            print(f"| {setting} | {' | '.join(cells)} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
