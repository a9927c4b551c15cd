"""Training-step throughput of NestedUNet on the CPU: every fixed setting vs the automatic choice.

    python -m bench.nested_unet [--image-size 64] [--batch-size 4] [--steps 4] [--repeats 3]

Prints the CPU's native capabilities (AVX2 / AVX-512 / AVX512-BF16 / AMX), then what
``precision="auto"`` with ``channels_last="auto"`` chooses on this machine (and how long its
probe took), then one row per setting: float32 eager (the reference loop of the widely used
pytorch-nested-unet code), channels-last, bf16 autocast, channels-last + bf16, float32 with
PyTorch's own convolution kernels instead of oneDNN's, and the automatic choice. All rows run
the same optimizer steps (Adam, BCEDiceLoss) on the same data, interleaved in one process; medians
of `--repeats` runs. The defaults are the recipe's own workload.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import add_threads_option, apply_threads, interleaved, print_ratios
from models import BCEDiceLoss, NestedUNet
from recipes.nested_unet_options import BUILTIN_IMAGE_SIZE, DEFAULT_BATCH_SIZE
from trainer.native import cpu_features, describe_cpu
from trainer.precision import convolution_kernels
from trainer.precision_probe import Setting, choose_precision

SETTINGS = {
    "fp32 eager": Setting("32", False),
    "channels_last": Setting("32", True),
    "bf16 autocast": Setting("bf16", False),
    "channels_last + bf16": Setting("bf16", True),
    "fp32 native conv": Setting("32", False, onednn=False),
}


def make_step(setting: Setting, images: torch.Tensor, masks: torch.Tensor, steps: int):
    """A function that runs `steps` training steps of a fresh NestedUNet with this setting."""
    torch.manual_seed(0)
    initial = NestedUNet().state_dict()
    loss_fn = BCEDiceLoss()
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    inputs = images.contiguous(memory_format=fmt)

    def run() -> None:
        model = NestedUNet()
        model.load_state_dict(initial)
        model = model.to(memory_format=fmt).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        with convolution_kernels(setting.onednn):
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.precision == "bf16"):
                    loss = loss_fn(model(inputs), masks)
                loss.backward()
                optimizer.step()

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=BUILTIN_IMAGE_SIZE)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per timed run")
    add_threads_option(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    apply_threads(args)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    masks = (torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=g) > 0.7).float()

    features = cpu_features()
    print(
        f"CPU: {describe_cpu(features)} ({', '.join(k for k, v in features.items() if v) or 'none'}); "
        f"{torch.get_num_threads()} threads"
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    choice = choose_precision(NestedUNet(), torch.device("cpu"), images)
    print(f"automatic choice (probe {time.perf_counter() - started:.2f} s): {choice}")

    variants = {name: make_step(setting, images, masks, args.steps) for name, setting in SETTINGS.items()}
    auto = Setting(choice.precision, choice.channels_last, choice.onednn)
    auto_name = f"auto ({auto})"
    variants[auto_name] = make_step(auto, images, masks, args.steps)
    medians = interleaved(variants, repeats=args.repeats)
    print(
        f"NestedUNet, {args.steps} steps of {args.batch_size}x3x{args.image_size}x{args.image_size}, "
        f"median of {args.repeats}"
    )
    print_ratios(medians, "fp32 eager", work=args.steps * args.batch_size)
    fastest = min(SETTINGS, key=lambda name: medians[name])
    gap = medians[auto_name] / medians[fastest]
    print(
        f"automatic choice vs the fastest fixed setting ({fastest}): {gap:.3f}x the time "
        f"({'within' if gap <= 1.03 else 'outside'} 3%)"
    )
    return medians


if __name__ == "__main__":
    main()
