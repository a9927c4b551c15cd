"""What ``"auto"`` resolves to: the settings that fit the machine, from native-bf16 checks and a
measurement made once per machine and model, then kept (`trainer.probe_cache`); `resolve_choice`
is the one decision of every run (saved with the run, else rank 0's for all ranks; printed once).

``precision="auto"`` and ``channels_last="auto"`` (see `choose_precision`) never pick something
slower than float32 in the contiguous layout, and pick the same thing on every run of the same
command on the same machine, busy or idle:

- CPU: bf16 autocast is tried only where the CPU computes bf16 natively (AVX512-BF16 or AMX on
  x86, the BF16 extension on Arm); without it autocast falls back to emulation that is 10-25x
  slower than float32. The remaining settings (bf16 or float32, channels-last or contiguous, and
  for float32 convolutions oneDNN's kernels or PyTorch's own: oneDNN wins on large layers, its
  per-call overhead loses on small ones) are timed at the training batch's shape, several times
  round-robin, and a setting other than float32 contiguous is taken only with a clear margin; the
  result is kept (`trainer.probe_cache.cache_path`), so later runs read it instead of measuring again.
- CUDA: bf16 where the GPU computes it natively (Ampere and later), else float16 with a grad
  scaler; channels-last for convolutional models (tensor cores want NHWC). Nothing is timed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from trainer.batch import map_tensors, tensors
from trainer.native import cpu_features, cpu_has_native_bf16, cpu_model_name, cuda_native_bf16, describe_cpu
from trainer.precision import (
    PrecisionChoice,
    autocast,
    check_channels_last,
    check_device,
    convolution_kernels,
    normalize_precision,
)
from trainer.probe_cache import cache_path, cached_setting, locked, read_cache, write_cache

#: bf16 must beat float32 by this factor in the probe to be chosen: a smaller gain on one sample
#: may not hold at the training batch size.
MIN_GAIN = 1.10
#: Channels-last (or PyTorch's own convolution kernels) must beat the contiguous layout with
#: oneDNN by this factor in the probe to be chosen.
MIN_LAYOUT_GAIN = 1.05
#: Timed passes of each setting, round-robin; each setting's fastest counts, so a moment of load
#: on the machine does not decide.
REPEATS = 3
#: A setting whose fastest pass is this many times the fastest setting's is not timed again: no
#: margin above (`MIN_GAIN`, `MIN_LAYOUT_GAIN`) could make it the choice.
OUT_OF_RACE = 1.5


class Setting(NamedTuple):
    """One way to train: precision, memory format and, on the CPU, whether convolutions use
    oneDNN (``onednn=False``: PyTorch's own kernels)."""

    precision: str
    channels_last: bool
    onednn: bool = True

    def __str__(self) -> str:
        name = {"32": "float32", "16-mixed": "float16"}.get(self.precision, self.precision)
        return f"{name}{' + channels-last' if self.channels_last else ''}{'' if self.onednn else ' + native conv'}"


def is_convolutional(model: nn.Module) -> bool:
    """Whether `model` has 2-D convolutions (the layers channels-last speeds up)."""
    return any(isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) for module in model.modules())


def choose_precision(
    model: nn.Module,
    device: torch.device,
    example: Any = None,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    cache: str | os.PathLike | None | bool = True,
) -> PrecisionChoice:
    """Resolve ``"auto"`` precision and memory format for training `model` on `device`.

    Explicit values are kept as given. On the CPU, where more than one setting remains possible,
    `probe` times a training pass (forward and backward) of a copy of `model` on `example` (model
    inputs at the training batch's shape, as the loader yields them) in each setting, `REPEATS`
    times round-robin, keeping each setting's fastest pass: bf16 is taken only when it is at least
    `MIN_GAIN` faster than the fastest float32 setting (any layout or kernels), channels-last or
    PyTorch's own convolution kernels only when at least `MIN_LAYOUT_GAIN` faster than the
    contiguous layout with oneDNN. Without an `example`
    there is nothing to probe: float32, contiguous.

    The measurement is made once per machine and model: its result is kept in `cache_path` under
    a key of the CPU, torch's version and thread count, the model's class and parameter shapes,
    the input shape and the candidates, so every later run of the same command reads the same
    choice, however busy the machine is then. Delete the file to measure again.

    Args:
        model: the network to train (probed on a copy; it is not changed).
        device: where it trains.
        example: model inputs at the training batch's shape, for the probe.
        precision: ``"auto"``, or ``"32"``, ``"bf16"``, ``"16-mixed"`` to keep.
        channels_last: ``"auto"``, or True / False to keep.
        cache: True for `cache_path` (the default), another file path, or False / None to measure
            every time.
    """
    precision = normalize_precision(precision)
    layout = check_channels_last(channels_last)
    convolutional = is_convolutional(model)
    if device.type == "cuda":
        return _choose_cuda(device, precision, layout, convolutional)
    precisions, layouts, reasons, why = _cpu_candidates(precision, layout, convolutional)
    if len(precisions) * len(layouts) == 1:
        return PrecisionChoice(precisions[0], layouts[0], "; ".join(reasons), summary=", ".join(why))
    if example is None:
        reasons.append("no example batch to probe")
        why.append("nothing to probe")
        return PrecisionChoice(precisions[0], layouts[0], "; ".join(reasons), summary=", ".join(why))
    candidates = [Setting(p, layout) for p in precisions for layout in layouts]
    if precisions[0] == "32" and convolutional and False in layouts and torch.backends.mkldnn.is_available():
        candidates.append(Setting("32", False, onednn=False))
    path = cache_path() if cache is True else Path(cache) if cache else None
    with locked(path):
        pick = _kept_or_measured(model, device, example, candidates, (precisions, layouts), path, reasons, why)
    return PrecisionChoice(pick.precision, pick.channels_last, "; ".join(reasons), pick.onednn, ", ".join(why))


def _cpu_candidates(
    precision: str, layout: bool | Literal["auto"], convolutional: bool
) -> tuple[list[str], list[bool], list[str], list[str]]:
    """The precisions and layouts left to try on this CPU, and why, in full and in a few words."""
    reasons, why = [], []
    if precision == "auto":
        features = cpu_features()
        if cpu_has_native_bf16(features):
            precisions = ["32", "bf16"]
            reasons.append(f"native bf16: {describe_cpu(features)}")  # the probe decides: no word of it
        else:
            precisions = ["32"]
            reasons.append(f"this CPU has no native bf16: {describe_cpu(features)}")
            why.append("no native bf16")
    else:
        precisions = [precision]
        reasons.append(f"precision {precision} as asked")
        why.append("as asked")
    layouts = [layout] if layout != "auto" else [False, True] if convolutional else [False]
    if layout == "auto" and not convolutional:
        reasons.append("no convolutions")
        why.append("no convolutions")
    return precisions, layouts, reasons, why


def _kept_or_measured(
    model: nn.Module,
    device: torch.device,
    example: Any,
    candidates: list[Setting],
    choices: tuple[list[str], list[bool]],
    path: Path | None,
    reasons: list[str],
    why: list[str],
) -> Setting:
    """The setting the cache file at `path` keeps for this probe, else the one `probe` measures
    (then kept there); what was done goes in `reasons` and `why`."""
    key = probe_key(model, example, candidates)
    kept = cached_setting(read_cache(path).get(key)) if path is not None else None
    if kept is not None:
        reasons.append(
            f"measured once on this machine ({kept['measured']}), kept in {path}; delete it to measure again"
        )
        why.append("from cache")
        return Setting(kept["precision"], kept["channels_last"], kept["onednn"])
    timings = probe(model, device, example, candidates, repeats=REPEATS)
    pick, measured = _pick(timings, *choices)
    reasons.append(f"probe on {type(model).__name__}: {measured}")
    why.append("measured")
    if path is not None:
        entry = {"precision": pick.precision, "channels_last": pick.channels_last, "onednn": pick.onednn}
        saved = write_cache(path, key, {**entry, "measured": measured})
        reasons.append(f"kept in {path}" if saved is None else f"not kept: {saved}")
    return pick


def _pick(timings: dict[Setting, float], precisions: list[str], layouts: list[bool]) -> tuple[Setting, str]:
    """The setting the timings favour (float32 contiguous unless another wins by its margin) and
    the timings in words."""
    plain = Setting(precisions[0], layouts[0])
    measured = ", ".join(f"{c} {t * 1000:.0f} ms" if math.isfinite(t) else f"{c} failed" for c, t in timings.items())
    if math.isinf(timings[plain]):
        return plain, f"{measured}; {plain} could not train, kept anyway"
    chosen = precisions[0]
    fastest_first = min(t for setting, t in timings.items() if setting.precision == precisions[0])
    for p in precisions[1:]:
        if fastest_first / min(timings[Setting(p, layout)] for layout in layouts) >= MIN_GAIN:
            chosen = p
    pick = Setting(chosen, layouts[0])
    for other in [Setting(chosen, layout) for layout in layouts[1:]] + [Setting("32", False, onednn=False)]:
        if other in timings and other.precision == chosen and timings[pick] / timings[other] >= MIN_LAYOUT_GAIN:
            pick = other
    gain = f"; {timings[plain] / timings[pick]:.2f}x {plain}" if pick != plain else ""
    return pick, measured + gain


def probe_key(model: nn.Module, example: Any, candidates: list[Setting]) -> str:
    """What a measurement depends on, as a short hash: this CPU (its model name and native
    features), torch's version and thread count, the model's class and parameter shapes, the
    example's shapes and dtypes, and the candidates."""
    shapes = [[list(t.shape), str(t.dtype)] for t in tensors(example)]
    described = {
        "cpu": cpu_model_name(),
        "features": cpu_features(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": [[name, list(p.shape)] for name, p in model.named_parameters()],
        "inputs": shapes,
        "candidates": [list(c) for c in candidates],
        "version": 1,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def resolve_choice(
    module: nn.Module,
    device: torch.device,
    example: Callable[[], Any],
    precision: str,
    channels_last: bool | str,
    saved: PrecisionChoice | None = None,
    announce: Callable[[PrecisionChoice], None] | None = None,
) -> PrecisionChoice:
    """The choice ``"auto"`` precision or memory format resolve to: `saved` (the run's, from its
    checkpoint or configuration), else the machine's (`choose_precision` on rank 0, on
    ``example()``; every rank applies the same); explicit values win. Announced once, on rank 0
    (default: ``Trainer: <choice>``).

    Args:
        module: the model (unwrapped).
        device: where it trains.
        example: returns model inputs at the training batch's shape, for the probe (called on rank 0 only).
        precision: ``"auto"`` or an explicit precision.
        channels_last: ``"auto"``, True or False.
        saved: the choice the run made before, or None.
        announce: prints the choice (called on rank 0 only).
    """
    from trainer.distributed import broadcast_object, is_rank_zero

    choice = saved
    if choice is None:
        local = choose_precision(module, device, example(), precision, channels_last) if is_rank_zero() else None
        choice = broadcast_object(local)
    if precision != "auto" and choice.precision != precision:
        choice = dataclasses.replace(choice, precision=precision)
    if channels_last != "auto" and choice.channels_last != channels_last:
        choice = dataclasses.replace(choice, channels_last=channels_last)
    check_device(choice.precision, device)
    if is_rank_zero():
        if announce is None:
            print(f"Trainer: {choice}")
        else:
            announce(choice)
    return choice


def _choose_cuda(
    device: torch.device, precision: str, channels_last: bool | Literal["auto"], convolutional: bool
) -> PrecisionChoice:
    reasons, why = [], []  # in full, and in a few words
    if precision == "auto":
        major, minor = torch.cuda.get_device_capability(device)
        if cuda_native_bf16(device):
            precision = "bf16"
            reasons.append(f"this GPU computes bf16 natively (compute capability {major}.{minor})")
            why.append("native bf16")
        else:
            precision = "16-mixed"
            reasons.append(
                f"this GPU has no native bf16 (compute capability {major}.{minor}): float16 with a grad scaler"
            )
            why.append("no native bf16")
    else:
        reasons.append(f"precision {precision} as asked")
        why.append("as asked")
    if channels_last == "auto":
        channels_last = convolutional
        reasons.append("convolutional model" if convolutional else "no convolutions")
        why.append(reasons[-1])
    return PrecisionChoice(precision, channels_last, "; ".join(reasons), summary=", ".join(why))


def probe(
    model: nn.Module,
    device: torch.device,
    example: Any,
    candidates: list[Setting],
    samples: int | None = None,
    repeats: int = 1,
) -> dict[Setting, float]:
    """Seconds of one training pass (forward and backward, train mode) of a copy of `model` on
    `example` (its first `samples` samples, if given), for the settings in `candidates`: the
    best of up to `repeats` passes, run round-robin across the candidates after one warm-up pass
    each, so a moment of load on the machine does not decide.

    Settings out of the race are not timed again: one whose warm-up takes over five times the
    first candidate's (e.g. bf16 emulated in software) keeps its warm-up time, one whose fastest
    pass is `OUT_OF_RACE` times the fastest setting's keeps its fastest so far. PyTorch's own
    convolution kernels (``onednn=False``) are timed only while a setting of their precision is in
    the race after the first timed round; otherwise (and with one repeat) they are left out of
    the result. A candidate whose pass raises (an operation without a kernel for that precision,
    say) gets an infinite time.

    The copies are thrown away, so `model`'s weights, gradients and batch-norm statistics are left
    untouched; torch's random generator is restored.
    """
    inputs = example if samples is None else map_tensors(example, lambda t: t[:samples] if t.dim() > 0 else t)
    runs = _runs(model, device, inputs, list(map(Setting._make, candidates)))
    later = [setting for setting in runs if not setting.onednn]
    timings: dict[Setting, float] = {}
    rng = torch.random.get_rng_state()
    try:
        racing = _warm_up(runs, [setting for setting in runs if setting not in later], timings)
        for round_ in range(repeats):
            if round_ > 0:  # warm-up times alone are too rough to leave a setting out
                best = min((timings[setting] for setting in racing), default=math.inf)
                racing = [setting for setting in racing if timings[setting] <= OUT_OF_RACE * best]
            if round_ == 1 and later:
                precisions = {setting.precision for setting in racing}
                racing += _warm_up(runs, [s for s in later if s.precision in precisions], timings)
            for setting in racing:
                timings[setting] = min(timings[setting], _timed(runs[setting]))
    finally:
        torch.random.set_rng_state(rng)
    return timings


def _runs(
    model: nn.Module, device: torch.device, inputs: Any, settings: list[Setting]
) -> dict[Setting, Callable[[], None]]:
    """A training pass of a copy of `model` for each setting (one copy per memory format)."""
    replicas: dict[bool, tuple[nn.Module, Any]] = {}
    runs: dict[Setting, Callable[[], None]] = {}
    for setting in settings:
        if setting.channels_last not in replicas:
            fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
            replicas[setting.channels_last] = (
                copy.deepcopy(model).to(memory_format=fmt).train(),
                map_tensors(inputs, functools.partial(_to, device=device, fmt=fmt)),
            )
        runs[setting] = _pass(*replicas[setting.channels_last], setting, device)
    return runs


def _warm_up(
    runs: dict[Setting, Callable[[], None]], settings: list[Setting], timings: dict[Setting, float]
) -> list[Setting]:
    """Run each of `settings` once, recording its time in `timings`; return those to time again:
    those that trained, in at most five times the first warm-up's time."""
    kept = []
    for setting in settings:
        timings[setting] = _timed(runs[setting])
        if math.isfinite(timings[setting]) and timings[setting] <= 5 * timings[settings[0]]:
            kept.append(setting)
    return kept


def _pass(model: nn.Module, inputs: Any, setting: Setting, device: torch.device) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        with convolution_kernels(setting.onednn):
            with torch.enable_grad(), autocast(setting.precision, device.type):
                output = model(inputs)
            total = sum(t.float().sum() for t in tensors(output))
            if params and isinstance(total, torch.Tensor) and total.requires_grad:
                torch.autograd.grad(total, params, allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def _timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    try:
        run()
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return math.inf
    return time.perf_counter() - start


def _to(tensor: torch.Tensor, device: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    if tensor.dim() == 4:
        return tensor.to(device, memory_format=fmt)
    return tensor.to(device)
