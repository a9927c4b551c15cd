"""How torch's OpenMP threads should wait: each libgomp setting, idle and beside busy processes.

    python -m bench.wait_policy [--rounds 3] [--busy 0 1 2] [--workloads unet cnn]

libgomp reads ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when torch loads it, so each
setting runs in a process of its own: a training step of the default run's network (NestedUNet,
standard widths, batch 4 of 64x64 images, float32) and of the tutorial's small CNN (batch 4 of 28x28,
thousands of tiny parallel regions, where waiting costs most). Beside 0, 1 and 2 CPU-bound
processes (``while True: pass``), in rounds that interleave the settings, so load and drift fall
on all of them alike. Prints, per workload, the median step time of each setting and its ratio to
the default (no variable set) under the same load, and the default's slowdown against its idle
time (on 2 cores beside one busy process the fair share is 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.recipe_runs import run_checkout
from tests.processes import checkout_env

#: name -> the environment variables of the setting (the default sets none).
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "SPINCOUNT=0": {"GOMP_SPINCOUNT": "0"},
    "SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "SPINCOUNT=30000": {"GOMP_SPINCOUNT": "30000"},
    "SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SECONDS = {"unet": 6.0, "cnn": 3.0}  # timed work per measurement


def worker(workload: str, seconds: float) -> None:
    """Train `workload` for about `seconds` after a warm-up; print the median step time (JSON)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if workload == "unet":
        from models import NestedUNet

        model: nn.Module = NestedUNet(num_classes=1, input_channels=3)
        inputs, targets = torch.randn(4, 3, 64, 64), torch.rand(4, 1, 64, 64).round()
        loss_fn: nn.Module = nn.BCEWithLogitsLoss()
    else:
        from models import FashionCNN

        model = FashionCNN()
        inputs, targets = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    for _ in range(3):
        step()
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 5:
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    print(json.dumps({"step": statistics.median(times), "steps": len(times)}))


def measure(workload: str, setting: str) -> float:
    """The median step time of `workload` in a fresh process with `setting`'s environment."""
    env = {key: value for key, value in checkout_env().items() if key not in WAIT_VARIABLES}
    output = run_checkout([sys.executable, "-m", "bench.wait_policy", "--worker", workload], env | SETTINGS[setting])
    return float(json.loads(output.strip().splitlines()[-1])["step"])


def busy_processes(count: int) -> list[subprocess.Popen[bytes]]:
    """`count` CPU-bound processes (a Python loop each)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    """Measure every setting under every load; print one table per workload."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=sorted(SECONDS), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside the run")
    parser.add_argument("--workloads", nargs="+", choices=sorted(SECONDS), default=["unet", "cnn"])
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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
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
