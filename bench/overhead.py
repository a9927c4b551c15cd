"""Overhead of the Trainer over a hand-written PyTorch loop on the same work.

    python -m bench.overhead [--steps 938] [--batch-size 64] [--repeats 5]

Variants, run interleaved in one process, medians of `--repeats` runs: a plain loop; the
Trainer without callbacks; with ProgressBar; with the four TensorBoard callbacks at their
default frequencies; with what a long run adds (`TensorBoardCallback`'s running loss and
throughput, a `CSVLogger` and `ModelCheckpoint(every_n_steps=500)`). Model: the tutorial CNN on
1x28x28 inputs (one Fashion-MNIST epoch is 938 batches of 64). Floors: Trainer within 1.03x of
the plain loop, with ProgressBar within 1.05x, with the TensorBoard callbacks and with the
long-run set each within 1.05x of the Trainer without callbacks.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn

from bench.common import add_threads_option, apply_threads, interleaved, print_ratios
from models.cnn import FashionCNN
from trainer import Trainer
from trainer.callbacks import (
    CSVLogger,
    GraphCallback,
    ImageGridCallback,
    ModelCheckpoint,
    PredictionFigureCallback,
    ProgressBar,
    TensorBoardCallback,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print times, throughput and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=938, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=64)
    add_threads_option(parser)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    apply_threads(args)

    torch.manual_seed(0)
    images = torch.randn(args.steps * args.batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (len(images),))
    batches = [(images[i:i + args.batch_size], labels[i:i + args.batch_size])
               for i in range(0, len(images), args.batch_size)]
    initial = FashionCNN().state_dict()
    loss_fn = nn.CrossEntropyLoss()
    device = torch.device("cpu")
    logs = tempfile.mkdtemp(prefix="bench-overhead-")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - kept open for the whole benchmark

    def fresh():
        model = FashionCNN()
        model.load_state_dict(initial)
        return model, torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def plain_loop():
        model, optimizer = fresh()
        model.train()
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()

    def with_trainer(make_callbacks):
        def run():
            model, optimizer = fresh()
            Trainer(model, optimizer, loss_fn, callbacks=make_callbacks(), device="cpu").fit(batches)
        return run

    run_count = iter(range(10**6))

    def tensorboard_callbacks():
        run_dir = os.path.join(logs, f"run{next(run_count)}")
        return [TensorBoardCallback(run_dir), ImageGridCallback(run_dir), GraphCallback(run_dir),
                PredictionFigureCallback(run_dir)]

    def long_run_callbacks():
        run_dir = os.path.join(logs, f"run{next(run_count)}")
        return [TensorBoardCallback(run_dir), CSVLogger(os.path.join(run_dir, "metrics.csv")),
                ModelCheckpoint(run_dir, monitor="loss", every_n_steps=500)]

    medians = interleaved({
        "plain loop": plain_loop,
        "Trainer": with_trainer(list),
        "Trainer + ProgressBar": with_trainer(lambda: [ProgressBar(file=devnull)]),
        "Trainer + TensorBoard x4": with_trainer(tensorboard_callbacks),
        "Trainer + throughput, CSV, step checkpoints": with_trainer(long_run_callbacks),
    }, repeats=args.repeats)
    print(f"{args.steps} steps of batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print_ratios(medians, "plain loop", work=len(images))
    tb_ratio = medians["Trainer + TensorBoard x4"] / medians["Trainer"]
    print(f"TensorBoard x4 vs Trainer without callbacks: {tb_ratio:.3f}x")
    long_ratio = medians["Trainer + throughput, CSV, step checkpoints"] / medians["Trainer"]
    print(f"throughput, CSV and step checkpoints every 500 vs Trainer without callbacks: {long_ratio:.3f}x")
    return medians


if __name__ == "__main__":
    main()
