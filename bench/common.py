"""Benchmark helpers: interleaved repeats, medians, ratios against a baseline in the same process."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from recipes.nested_unet_options import ARCHITECTURES


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads`` (torch threads; 0 keeps torch's default)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 keeps timings stable on a busy machine",
    )


def add_arch_option(parser: argparse.ArgumentParser, trained: str = "network") -> None:
    """Add ``--arch``: the ``recipes.nested_unet`` network of the benchmark's runs (default UNet,
    the faster one); `trained` says what it picks."""
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, default="UNet", help=f"{trained} (default: %(default)s, the faster one)"
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count from ``--threads`` when it is not 0."""
    if args.threads:
        torch.set_num_threads(args.threads)


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Time each variant `repeats` times, interleaved (a, b, c, a, b, c...), after `warmup`
    untimed rounds; return the median seconds of each."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_ratios(medians: dict[str, float], baseline: str, work: int, unit: str = "samples") -> None:
    """Print each variant's median time, throughput and ratio to `baseline` (time / baseline time)."""
    base = medians[baseline]
    width = max(len(name) for name in medians)
    for name, seconds in medians.items():
        print(f"{name:<{width}}  {seconds:8.3f} s  {work / seconds:10.1f} {unit}/s  ratio {seconds / base:.3f}x")
