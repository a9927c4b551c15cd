"""Training-step throughput of NestedUNet on the CPU: the usual float32 loop vs this recipe's settings.

    python -m bench.nested_unet [--image-size 64] [--batch-size 16] [--steps 4] [--repeats 3]

Both variants run the same optimizer steps (Adam, BCEDiceLoss) on the same data, interleaved in
one process; medians of `--repeats` runs. "fp32 eager" is the reference loop of the widely used
pytorch-nested-unet code; "recipe" adds what `recipes.nested_unet` uses by default:
channels-last memory format and bf16 autocast. Prints samples/s and the speed-up.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import add_threads_option, apply_threads, interleaved, print_ratios
from models import BCEDiceLoss, NestedUNet


def make_step(channels_last: bool, bf16: bool, images: torch.Tensor, masks: torch.Tensor, steps: int):
    """A function that runs `steps` training steps of a fresh NestedUNet with these settings."""
    torch.manual_seed(0)
    initial = NestedUNet().state_dict()
    loss_fn = BCEDiceLoss()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = images.contiguous(memory_format=fmt)

    def run() -> None:
        model = NestedUNet()
        model.load_state_dict(initial)
        model = model.to(memory_format=fmt).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(inputs), masks)
            loss.backward()
            optimizer.step()

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per timed run")
    add_threads_option(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    apply_threads(args)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    masks = (torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=g) > 0.7).float()
    medians = interleaved({
        "fp32 eager": make_step(False, False, images, masks, args.steps),
        "channels_last": make_step(True, False, images, masks, args.steps),
        "bf16 autocast": make_step(False, True, images, masks, args.steps),
        "recipe (channels_last + bf16)": make_step(True, True, images, masks, args.steps),
    }, repeats=args.repeats)
    print(f"NestedUNet, {args.steps} steps of {args.batch_size}x3x{args.image_size}x{args.image_size}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print_ratios(medians, "fp32 eager", work=args.steps * args.batch_size)
    speedup = medians["fp32 eager"] / medians["recipe (channels_last + bf16)"]
    print(f"recipe settings vs fp32 eager: {speedup:.2f}x the samples/s")
    return medians


if __name__ == "__main__":
    main()
