"""The PyTorch TensorBoard tutorial's own training loop against this framework's recipe path.

    python -m bench.tutorial [--steps 3000] [--repeats 3] [--data-dir DIR] [--threads 1]

Both sides read the same Fashion-MNIST-format IDX files: 60,000 training and 10,000 test
images made by `make_learnable_fashion_like` and written by `write_fashion_mnist_idx` into
``--data-dir`` (default: a folder in the system's temporary directory, reused by later runs;
files already there are reused, real Fashion-MNIST included).

A, the tutorial, as written there: `torchvision.datasets.FashionMNIST` with
``Compose([ToTensor(), Normalize((0.5,), (0.5,))])``, ``DataLoader(batch_size=4, shuffle=True,
num_workers=2)``, the tutorial CNN (`models.FashionCNN`), `CrossEntropyLoss`, ``SGD(lr=0.001,
momentum=0.9)``, ``running_loss += loss.item()`` every batch and, every 1000 mini-batches,
``add_scalar('training loss', ...)`` and ``add_figure('predictions vs. actuals',
plot_classes_preds(...))`` with the tutorial's pyplot helpers (Agg backend).

B, the recipe path (`recipes.fashion_mnist`): `load_fashion_mnist`, the recipe's `make_loader`
(a `TensorBatchLoader` of batch 4, shuffled), the same model, loss and optimizer, and a
`Trainer` with the recipe's tutorial-tag TensorBoard callbacks at ``every_n_steps=1000``:
`TensorBoardCallback` ('training loss'), `ImageGridCallback` ('four_fashion_mnist_images'),
`GraphCallback` and `PredictionFigureCallback` (every 1000 steps, with `CLASSES`), and the
recipe's default automatic precision choice (`choose_precision`, probe included in the time). The recipe's
epoch-end extras (validation, PR curves, embedding, progress bar, checkpoint) are left out: side
A has none of them. The training loader is cut to ``--steps`` batches, so `Trainer.fit` runs one
short epoch.

C, the ceiling: a bare loop over tensors normalised before the clock starts, with the same
model, loss and optimizer, and PyTorch's default kernels: no loader, no trainer, no logging.

All sides run the same number of optimizer steps on the CPU, from the same initial weights,
with the same number of torch intra-op threads in this process (``--threads``, default 1: at
batch 4 a second thread gains next to nothing, and on a small machine shared with other work
its barrier waits can make every step tens of times slower; ``--threads 0`` keeps torch's
default). A timed run covers everything from opening the dataset to the last step and closing
the writer (for A this includes starting and stopping the DataLoader's worker processes). Runs
are interleaved (A, B, A, B...) after one untimed round; the medians of ``--repeats`` runs are
compared. The test accuracy of each side's last run (same evaluation for both) shows that both
learn.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms as transforms  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from bench.common import interleaved, print_ratios  # noqa: E402
from models import FashionCNN, accuracy  # noqa: E402
from recipes.fashion_mnist import FashionMNISTConfig, make_loader, normalized, tutorial_callbacks  # noqa: E402
from trainer import Trainer, choose_precision  # noqa: E402
from trainer_datasets import (  # noqa: E402
    CLASSES,
    DataNotFoundError,
    load_fashion_mnist,
    make_learnable_fashion_like,
    write_fashion_mnist_idx,
)
from trainer_datasets.fashion_mnist import raw_folder  # noqa: E402

TRAIN_SAMPLES, TEST_SAMPLES = 60_000, 10_000
BATCH_SIZE = 4  # the tutorial's
LOG_EVERY = 1000  # the tutorial's "every 1000 mini-batches"
SEED = 0
DEFAULT_DATA_DIR = os.path.join(tempfile.gettempdir(), "bench-tutorial-fashion-mnist")
CHOICES: list[str] = []  # the recipe path's automatic choice in each run


# --------------------------------------------------------------------------------- data
def prepare_data(data_dir: str | os.PathLike) -> str:
    """Make sure `data_dir` holds full-size Fashion-MNIST IDX files, uncompressed (as
    torchvision's `FashionMNIST` reads them); write look-alikes when none are there.

    Returns "reused" or "written". Files of the wrong size are an error, never overwritten.
    """
    try:
        sizes = [len(load_fashion_mnist(data_dir, train=train)[1]) for train in (True, False)]
    except DataNotFoundError:
        sizes = None
    if sizes is not None:
        if sizes != [TRAIN_SAMPLES, TEST_SAMPLES]:
            raise SystemExit(
                f"{raw_folder(data_dir)} holds {sizes[0]} training and {sizes[1]} test images, not "
                f"{TRAIN_SAMPLES} and {TEST_SAMPLES}; pass another --data-dir or remove the files"
            )
        return "reused"
    for train, count, seed in ((True, TRAIN_SAMPLES, SEED), (False, TEST_SAMPLES, SEED + 1)):
        images, labels = make_learnable_fashion_like(count, seed=seed)
        write_fashion_mnist_idx(data_dir, images, labels, train=train)
    for train in (True, False):  # decompresses the .gz files next to themselves
        load_fashion_mnist(data_dir, train=train)
    return "written"


def test_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy on uint8 (N, 28, 28) images normalised as both sides train."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 1000):
            inputs = normalized(images[start : start + 1000])
            correct += int((model(inputs).argmax(dim=1) == labels[start : start + 1000]).sum())
    model.train()
    return correct / len(images)


# --------------------------------------------------------------------------------- side A: the tutorial
def matplotlib_imshow(img: torch.Tensor, one_channel: bool = False) -> None:
    """The tutorial's helper: show an image normalised with mean 0.5 and std 0.5."""
    if one_channel:
        img = img.mean(dim=0)
    img = img / 2 + 0.5  # unnormalize
    npimg = img.numpy()
    if one_channel:
        plt.imshow(npimg, cmap="Greys")
    else:
        plt.imshow(np.transpose(npimg, (1, 2, 0)))


def images_to_probs(net: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """The tutorial's helper: predicted classes and their probabilities."""
    output = net(images)
    # convert output probabilities to predicted class
    _, preds_tensor = torch.max(output, 1)
    preds = np.squeeze(preds_tensor.numpy())
    return preds, [F.softmax(el, dim=0)[i].item() for i, el in zip(preds, output)]


def plot_classes_preds(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> plt.Figure:
    """The tutorial's "predictions vs. actuals" figure (pyplot, one subplot per image)."""
    preds, probs = images_to_probs(net, images)
    # plot the images in the batch, along with predicted and true labels
    fig = plt.figure(figsize=(12, 48))
    for idx in range(4):
        ax = fig.add_subplot(1, 4, idx + 1, xticks=[], yticks=[])
        matplotlib_imshow(images[idx], one_channel=True)
        ax.set_title(
            f"{CLASSES[preds[idx]]}, {probs[idx] * 100.0:.1f}%\n(label: {CLASSES[labels[idx]]})",
            color=("green" if preds[idx] == labels[idx].item() else "red"),
        )
    return fig


def run_tutorial(data_dir: str, log_dir: str, steps: int, initial: dict[str, torch.Tensor]) -> tuple[nn.Module, float]:
    """Side A: `steps` steps of the tutorial's loop. Returns the net and the seconds to the first batch."""
    start = time.perf_counter()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    trainset = torchvision.datasets.FashionMNIST(data_dir, download=False, train=True, transform=transform)
    trainloader = DataLoader(trainset, batch_size=BATCH_SIZE, shuffle=True, num_workers=2)
    writer = SummaryWriter(log_dir)
    net = FashionCNN()
    net.load_state_dict(initial)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)

    first_batch = 0.0
    running_loss = 0.0
    epoch = 0
    for i, data in enumerate(trainloader, 0):
        if i == 0:
            first_batch = time.perf_counter() - start
        # get the inputs; data is a list of [inputs, labels]
        inputs, labels = data
        # zero the parameter gradients
        optimizer.zero_grad()
        # forward + backward + optimize
        outputs = net(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()

        running_loss += loss.item()
        if i % 1000 == 999:  # every 1000 mini-batches...
            # ...log the running loss
            writer.add_scalar("training loss", running_loss / 1000, epoch * len(trainloader) + i)
            # ...log a Matplotlib Figure showing the model's predictions on a random mini-batch
            writer.add_figure(
                "predictions vs. actuals",
                plot_classes_preds(net, inputs, labels),
                global_step=epoch * len(trainloader) + i,
            )
            running_loss = 0.0
        if i + 1 == steps:
            break  # leaving the loop drops its iterator, which shuts the worker processes down
    writer.close()
    return net, first_batch


# --------------------------------------------------------------------------------- side B: the recipe
class FirstBatches:
    """The first `steps` batches of `loader`, with a length (the trainer reads it) and the
    loader's `set_epoch` passed through. `first_batch_at` is the `time.perf_counter()` value
    when the first batch of the latest pass was ready."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps = loader, steps
        self.first_batch_at = 0.0

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def __iter__(self) -> Iterator[Any]:
        batches = itertools.islice(iter(self.loader), self.steps)
        for batch in batches:
            self.first_batch_at = time.perf_counter()
            yield batch
            break
        yield from batches

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the wrapped loader (a `TensorBatchLoader` orders each epoch by it)."""
        self.loader.set_epoch(epoch)


def run_recipe(data_dir: str, log_dir: str, steps: int, initial: dict[str, torch.Tensor]) -> tuple[nn.Module, float]:
    """Side B: `steps` steps through the recipe's loader, `Trainer` and callbacks. Returns the
    model and the seconds to the first batch."""
    start = time.perf_counter()
    train_images, train_labels = load_fashion_mnist(data_dir, train=True)
    # The recipe reads the test split for its fixed figure batch; its images are not trained on.
    test_images, test_labels = load_fashion_mnist(data_dir, train=False)
    config = FashionMNISTConfig(
        epochs=1,
        batch_size=BATCH_SIZE,
        lr=0.001,
        momentum=0.9,
        log_every=LOG_EVERY,
        data_dir=data_dir,
        workers=0,
        seed=SEED,
    )
    loader = FirstBatches(make_loader(train_images, train_labels, BATCH_SIZE, True, config, pin_memory=False), steps)
    model = FashionCNN()
    model.load_state_dict(initial)
    # The recipe's default --precision auto: the same probe, on the same first images.
    choice = choose_precision(model, torch.device("cpu"), normalized(train_images[:BATCH_SIZE]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    callbacks = tutorial_callbacks(Path(log_dir), LOG_EVERY, train_images, train_labels, test_images, test_labels)
    trainer = Trainer(
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        callbacks=callbacks,
        max_epochs=1,
        device="cpu",
        metrics={"acc": accuracy},
        seed=SEED,
        precision=choice,
    )
    CHOICES.append(str(choice))
    trainer.fit(loader)
    if trainer.global_step != steps:
        raise RuntimeError(f"the recipe path ran {trainer.global_step} steps, not {steps}")
    return model, loader.first_batch_at - start


# --------------------------------------------------------------------------------- side C: bare loop
def run_bare(data_dir: str, log_dir: str, steps: int, initial: dict[str, torch.Tensor]) -> tuple[nn.Module, float]:
    """Side C: `steps` steps over batches cut from a tensor normalised beforehand (not timed)."""
    inputs, labels = BARE_DATA[data_dir]
    start = time.perf_counter()
    model = FashionCNN()
    model.load_state_dict(initial)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    for i in range(steps):
        batch = slice(i * BATCH_SIZE, (i + 1) * BATCH_SIZE)
        optimizer.zero_grad()
        loss = criterion(model(inputs[batch]), labels[batch])
        loss.backward()
        optimizer.step()
    return model, time.perf_counter() - start


BARE_DATA: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


# --------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print times, throughput, the B/A ratio and test accuracies."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.tutorial", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=3000,
        help=f"optimizer steps of batch {BATCH_SIZE} per run, at most one epoch "
        f"({TRAIN_SAMPLES // BATCH_SIZE}) (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (default: %(default)s)")
    parser.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help="folder for FashionMNIST/raw/ (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of this process, both sides; 0: torch's default "
        f"({torch.get_num_threads()} here) (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= TRAIN_SAMPLES // BATCH_SIZE:
        parser.error(f"--steps must be in 1..{TRAIN_SAMPLES // BATCH_SIZE} (one epoch), got {args.steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    data_dir = args.data_dir
    status = prepare_data(data_dir)
    print(f"data: {raw_folder(data_dir)} ({status}; {TRAIN_SAMPLES} training, {TEST_SAMPLES} test images)")
    test_images, test_labels = load_fashion_mnist(data_dir, train=False)

    torch.manual_seed(SEED)
    initial = FashionCNN().state_dict()
    logs = tempfile.mkdtemp(prefix="bench-tutorial-runs-")
    run_count = itertools.count()
    first_batch: dict[str, list[float]] = {"A tutorial": [], "B recipe": [], "C bare loop": []}  # C: unused
    train_images, train_labels = load_fashion_mnist(data_dir, train=True)
    order = torch.randperm(TRAIN_SAMPLES, generator=torch.Generator().manual_seed(SEED))[: args.steps * BATCH_SIZE]
    BARE_DATA[data_dir] = (normalized(train_images[order]), train_labels[order])
    models: dict[str, nn.Module] = {}

    def side(
        name: str, run: Callable[[str, str, int, dict[str, torch.Tensor]], tuple[nn.Module, float]]
    ) -> Callable[[], None]:
        def timed() -> None:
            model, seconds = run(data_dir, os.path.join(logs, f"run{next(run_count)}"), args.steps, initial)
            models[name] = model
            first_batch[name].append(seconds)

        return timed

    medians = interleaved(
        {
            "A tutorial": side("A tutorial", run_tutorial),
            "B recipe": side("B recipe", run_recipe),
            "C bare loop": side("C bare loop", run_bare),
        },
        repeats=args.repeats,
    )
    samples = args.steps * BATCH_SIZE
    print(
        f"{args.steps} steps of batch {BATCH_SIZE} ({samples} samples) per run, CPU, "
        f"torch threads {torch.get_num_threads()}, median of {args.repeats} interleaved runs after 1 untimed round"
    )
    print_ratios(medians, "A tutorial", work=samples)
    print(f"B recipe's automatic choice (last run): {CHOICES[-1]}")
    for name, seconds in first_batch.items():
        if name.startswith("C"):
            continue
        timed = seconds[1:]  # the first value is the untimed round's
        print(
            f"{name}: time to first batch (dataset, loader{', workers' if name.startswith('A') else ''}) "
            f"median {statistics.median(timed):.3f} s"
        )
    speedup = medians["A tutorial"] / medians["B recipe"]
    verdict = "meets" if speedup >= 2.7 else "is below"
    print(
        f"throughput B/A: {speedup:.2f}x ({verdict} the 2.7x floor); the bare loop C/A: "
        f"{medians['A tutorial'] / medians['C bare loop']:.2f}x"
    )
    for name, model in models.items():
        print(
            f"{name}: test accuracy after {args.steps} steps {test_accuracy(model, test_images, test_labels):.4f} "
            f"(last run, {TEST_SAMPLES} test images)"
        )
    print(f"total {time.perf_counter() - began:.1f} s; TensorBoard logs in {logs}")
    return medians


if __name__ == "__main__":
    main()
