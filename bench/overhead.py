"""Overhead of the Trainer over a hand-written PyTorch loop on the same work.

    python -m bench.overhead [--samples 60032] [--batch-sizes 64 4] [--repeats 5] [--threads 1]

The tutorial CNN on 1x28x28 inputs, one epoch over a `DataLoader` (60032 samples: 938 batches of
64, or 15008 of 4, the tutorial's batch size), for each batch size in one run. Variants, run
interleaved in one process, medians of `--repeats` runs: a plain loop; the Trainer without
callbacks; the Trainer with the callbacks every recipe runs per batch (`TensorBoardCallback` at
the tutorial's 1000 steps, `ProgressBar` at 200, a `CSVLogger` and epoch `ModelCheckpoint`s).
At the first batch size also: with ProgressBar; with the four TensorBoard callbacks at their
default frequencies; with what a long run adds (`TensorBoardCallback`'s running loss and
throughput, a `CSVLogger` and `ModelCheckpoint(every_n_steps=500)`).

Floors: the Trainer, with and without the recipes' callbacks, within 1.02x of the plain loop at
every batch size; with ProgressBar within 1.05x; with the TensorBoard callbacks and with the
long-run set each within 1.05x of the Trainer without callbacks.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.common import add_threads_option, apply_threads, interleaved, print_ratios
from models.cnn import FashionCNN
from trainer import ResumableSampler, Trainer
from trainer.callbacks import (
    CSVLogger,
    GraphCallback,
    ImageGridCallback,
    ModelCheckpoint,
    PredictionFigureCallback,
    ProgressBar,
    TensorBoardCallback,
)

#: The floors: variant -> (baseline, largest ratio to it).
FLOORS = {
    "Trainer": ("plain loop", 1.02),
    "Trainer + recipes' callbacks": ("plain loop", 1.02),
    "Trainer + ProgressBar": ("plain loop", 1.05),
    "Trainer + TensorBoard x4": ("Trainer", 1.05),
    "Trainer + throughput, CSV, step checkpoints": ("Trainer", 1.05),
}


class _Setup:
    """The data, the model's initial weights and the folders of one benchmark."""

    def __init__(self, samples: int) -> None:
        torch.manual_seed(0)
        self.dataset = TensorDataset(torch.randn(samples, 1, 28, 28), torch.randint(0, 10, (samples,)))
        self.initial = FashionCNN().state_dict()
        self.loss_fn = nn.CrossEntropyLoss()
        self.logs = tempfile.mkdtemp(prefix="bench-overhead-")
        self.devnull = open(os.devnull, "w")  # noqa: SIM115 - kept open for the whole benchmark
        self._runs = iter(range(10**6))

    def fresh(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = FashionCNN()
        model.load_state_dict(self.initial)
        return model, torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def run_dir(self) -> str:
        return os.path.join(self.logs, f"run{next(self._runs)}")


def _variants(setup: _Setup, batch_size: int, extras: bool) -> dict[str, Callable[[], Any]]:
    # In the dataset's order; the sampler lets step checkpoints resume inside the epoch.
    loader = DataLoader(setup.dataset, batch_size=batch_size, sampler=ResumableSampler(setup.dataset, shuffle=False))
    device = torch.device("cpu")

    def plain_loop():
        model, optimizer = setup.fresh()
        model.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = setup.loss_fn(model(x), y)
            loss.backward()
            optimizer.step()

    def with_trainer(make_callbacks):
        def run():
            model, optimizer = setup.fresh()
            Trainer(model, optimizer, setup.loss_fn, callbacks=make_callbacks(), device="cpu").fit(loader)

        return run

    def recipe_callbacks():
        run_dir = setup.run_dir()
        return [
            TensorBoardCallback(run_dir, every_n_steps=1000),
            ProgressBar(every_n_steps=200, file=setup.devnull),
            CSVLogger(os.path.join(run_dir, "metrics.csv")),
            ModelCheckpoint(run_dir, monitor="loss"),
        ]

    variants = {
        "plain loop": plain_loop,
        "Trainer": with_trainer(list),
        "Trainer + recipes' callbacks": with_trainer(recipe_callbacks),
    }
    if extras:

        def tensorboard_callbacks():
            run_dir = setup.run_dir()
            return [
                TensorBoardCallback(run_dir),
                ImageGridCallback(run_dir),
                GraphCallback(run_dir),
                PredictionFigureCallback(run_dir),
            ]

        def long_run_callbacks():
            run_dir = setup.run_dir()
            return [
                TensorBoardCallback(run_dir),
                CSVLogger(os.path.join(run_dir, "metrics.csv")),
                ModelCheckpoint(run_dir, monitor="loss", every_n_steps=500),
            ]

        variants.update(
            {
                "Trainer + ProgressBar": with_trainer(lambda: [ProgressBar(file=setup.devnull)]),
                "Trainer + TensorBoard x4": with_trainer(tensorboard_callbacks),
                "Trainer + throughput, CSV, step checkpoints": with_trainer(long_run_callbacks),
            }
        )
    return variants


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    """Run the benchmark, print times, throughput and ratios per batch size and whether every
    floor holds; return the medians by batch size.

    Args:
        argv: the command line (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=60032, help="samples per epoch (one epoch per run)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 4])
    add_threads_option(parser)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    apply_threads(args)
    setup = _Setup(args.samples)
    results, failed = {}, []
    for index, batch_size in enumerate(args.batch_sizes):
        medians = interleaved(_variants(setup, batch_size, extras=index == 0), repeats=args.repeats)
        steps = -(-args.samples // batch_size)
        print(
            f"\n{steps} steps of batch {batch_size} over a DataLoader, {torch.get_num_threads()} threads, "
            f"median of {args.repeats}"
        )
        print_ratios(medians, "plain loop", work=args.samples)
        for name, (baseline, floor) in FLOORS.items():
            if name in medians:
                ratio = medians[name] / medians[baseline]
                verdict = "ok" if ratio <= floor else "OVER"
                print(f"  {name} / {baseline}: {ratio:.3f}x (floor {floor:.2f}x) {verdict}")
                if ratio > floor:
                    failed.append(f"{name} at batch {batch_size}")
        results[batch_size] = medians
    print("\nevery floor holds" if not failed else f"\nover the floor: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()
