"""The prepared GPU check: everything on CUDA in one command, in under 5 minutes on one GPU.

    python -m bench.gpu_check [--skip-compile] [--steps 20]

1. the test suite's CUDA tests (``pytest -m cuda``): bf16 and 16-mixed training, the automatic
   choice, resume, and a training loop run under ``torch.cuda.set_sync_debug_mode("error")``
   between log points (no host sync per step);
2. both recipes, briefly, on ``cuda`` (Fashion-MNIST on small IDX files written here);
3. NestedUNet training throughput at 96x96, batch 16: float32 eager vs the automatic choice,
   each with and without ``torch.compile`` (compile time reported apart from steady throughput).

Each part prints its own result; the exit code is 1 when any part failed. Needs a CUDA GPU and
the project's dependencies (run it from the repository root, e.g. ``PYTHONPATH=.:datasets python3
-m bench.gpu_check`` where the project is not installed: datasets/ holds `trainer_datasets`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch

from tests.processes import ROOT, checkout_env


def run(command: list[str], timeout: float) -> tuple[int, str]:
    """Run a subprocess from the repository root; its exit code and combined output."""
    try:
        done = subprocess.run(command, cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return done.returncode, done.stdout + done.stderr


def cuda_tests() -> bool:
    """Part 1: the CUDA tests of the suite."""
    # The GPU machine's packages may deprecate things this project's pinned versions do not: this part
    # checks the CUDA behaviour, so deprecations are reported there instead of failing it.
    code, output = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            "-W",
            "default::DeprecationWarning",
            "-W",
            "default::FutureWarning",
            "tests/test_cuda.py",
        ],
        timeout=150,
    )
    print("\n".join(output.strip().splitlines()[-15:]))
    return code == 0


def recipes() -> bool:
    """Part 2: both recipes, one short epoch each, on cuda."""
    from trainer_datasets import make_learnable_fashion_like, write_fashion_mnist_idx

    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for train, count in ((True, 2048), (False, 512)):
            images, labels = make_learnable_fashion_like(count, seed=int(train))
            write_fashion_mnist_idx(tmp, images, labels, train=train)
        commands = {
            "nested_unet": [
                sys.executable,
                "-m",
                "recipes.nested_unet",
                "--device",
                "cuda",
                "--epochs",
                "2",
                "--train-samples",
                "128",
                "--val-samples",
                "32",
                "--log-dir",
                f"{tmp}/nested_unet",
            ],
            "fashion_mnist": [
                sys.executable,
                "-m",
                "recipes.fashion_mnist",
                "--device",
                "cuda",
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--log-every",
                "8",
                "--data-dir",
                tmp,
                "--log-dir",
                f"{tmp}/fashion_mnist",
            ],
        }
        for name, command in commands.items():
            started = time.perf_counter()
            code, output = run(command, timeout=150)
            lines = [
                line
                for line in output.replace("\r", "\n").splitlines()
                if line.startswith(("precision:", "best validation", "test accuracy", "error"))
            ]
            print(f"{name}: exit {code} in {time.perf_counter() - started:.1f} s; " + " | ".join(lines))
            if code != 0:
                print(output[-3000:])
                ok = False
    return ok


def throughput(steps: int, compile_too: bool) -> bool:
    """Part 3: NestedUNet training steps per second at 96x96, batch 16."""
    from models import BCEDiceLoss, NestedUNet
    from trainer.precision_probe import choose_precision

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 96, 96, generator=g).to(device)
    masks = (torch.rand(16, 1, 96, 96, generator=g) > 0.7).float().to(device)
    torch.manual_seed(0)
    initial = NestedUNet().state_dict()
    choice = choose_precision(NestedUNet().to(device), device, images)
    print(f"automatic choice: {choice}")
    settings = {
        "fp32 eager": ("32", False),
        f"auto ({choice.precision}, {'channels-last' if choice.channels_last else 'contiguous'})": (
            choice.precision,
            choice.channels_last,
        ),
    }
    results: dict[str, float] = {}
    for compiled in [False, True] if compile_too else [False]:
        for name, (precision, channels_last) in settings.items():
            label = f"{name}{' + compile' if compiled else ''}"
            try:
                compile_s, per_step = time_steps(
                    initial, images, masks, precision, channels_last, compiled, steps, NestedUNet, BCEDiceLoss
                )
            except Exception as exc:  # noqa: BLE001 - report and go on with the other settings
                print(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
                continue
            results[label] = per_step
            extra = f", first steps incl. compile {compile_s:.1f} s" if compiled else ""
            print(f"{label:<42} {16 / per_step:8.1f} samples/s  {per_step * 1000:7.1f} ms/step{extra}")
    base = results.get("fp32 eager")
    if base:
        for label, per_step in results.items():
            print(f"  {label}: {base / per_step:.2f}x fp32 eager")
    return "fp32 eager" in results and len(results) >= 2


def time_steps(
    initial, images, masks, precision: str, channels_last: bool, compiled: bool, steps: int, model_class, loss_class
) -> tuple[float, float]:
    """(seconds of the first three steps, seconds per step after them) for one setting."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model_class().cuda()
    model.load_state_dict(initial)
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
    forward = torch.compile(model) if compiled else model
    loss_fn = loss_class()
    inputs = images.contiguous(memory_format=fmt)
    dtype = {"bf16": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(forward(inputs), masks)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    started = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return warm, (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    """Run the three parts; 0 when all passed."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per throughput setting")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here; the GPU check needs one", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(
        f"torch {torch.__version__}, {props.name}, compute capability {props.major}.{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB"
    )
    parts: dict[str, Callable[[], bool]] = {
        "CUDA tests": cuda_tests,
        "recipes on cuda": recipes,
        "NestedUNet throughput": lambda: throughput(args.steps, not args.skip_compile),
    }
    failed = []
    began = time.perf_counter()
    for name, part in parts.items():
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            ok = part()
        except Exception:  # noqa: BLE001 - one broken part must not hide the others' results
            traceback.print_exc()
            ok = False
        print(f"== {name}: {'passed' if ok else 'FAILED'} ({time.perf_counter() - started:.1f} s)", flush=True)
        if not ok:
            failed.append(name)
    print(
        f"GPU check {'passed' if not failed else 'FAILED: ' + ', '.join(failed)} in {time.perf_counter() - began:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
