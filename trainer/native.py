"""What this machine computes natively: the CPU's features (`cpu_features`, `describe_cpu`) and
whether a device computes bf16 in hardware (`native_bf16`), as PyTorch's own checks report them."""

from __future__ import annotations

import platform

import torch


def cpu_features() -> dict[str, bool]:
    """What this CPU computes natively: ``avx2``, ``avx512``, ``avx512_bf16``, ``amx`` (x86) and
    ``arm_bf16`` (the BF16 extension of Armv8.6), as PyTorch's own checks report them.

    The AVX-512 features count only where PyTorch dispatches its kernels at AVX-512 or above: with
    its kernels held at AVX2 (``ATEN_CPU_CAPABILITY=avx2``, or a build or CPU it restricts) bf16
    is computed by conversion in AVX2 code, many times slower than float32."""
    cpu = getattr(torch, "cpu", None)

    def check(name: str) -> bool:
        probe = getattr(cpu, name, None)
        try:
            return bool(probe()) if callable(probe) else False
        except RuntimeError:
            return False

    features = {
        "avx2": check("_is_avx2_supported"),
        "avx512": check("_is_avx512_supported"),
        "avx512_bf16": check("_is_avx512_bf16_supported"),
        "amx": check("_is_amx_tile_supported"),
        "arm_bf16": False,
    }
    if platform.machine().lower() in ("aarch64", "arm64"):
        features["arm_bf16"] = "bf16" in _proc_cpuinfo_flags()
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if callable(capability) and capability() in ("AVX2", "DEFAULT", "NO AVX"):
        features.update(avx512=False, avx512_bf16=False, amx=False)
    return features


def describe_cpu(features: dict[str, bool] | None = None) -> str:
    """The CPU's native capabilities in a few words, e.g. ``"AVX2, AVX-512, AVX512-BF16, AMX"``."""
    features = cpu_features() if features is None else features
    names = {"avx2": "AVX2", "avx512": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx": "AMX", "arm_bf16": "Arm BF16"}
    found = [label for key, label in names.items() if features.get(key)]
    return ", ".join(found) if found else "no AVX2, AVX-512 or native bf16"


def cpu_has_native_bf16(features: dict[str, bool] | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16, AMX or Arm BF16)."""
    features = cpu_features() if features is None else features
    return features["avx512_bf16"] or features["amx"] or features["arm_bf16"]


def _proc_cpuinfo(keys: tuple[str, ...]) -> list[str]:
    """The values of the ``/proc/cpuinfo`` lines whose key (lower-cased) is in `keys`, in order;
    none where the file cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            text = file.read()
    except OSError:
        return []
    values = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in keys:
            values.append(value.strip())
    return values


def _proc_cpuinfo_flags() -> set[str]:
    return {flag for value in _proc_cpuinfo(("flags", "features")) for flag in value.split()}


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    names = _proc_cpuinfo(("model name",))
    return names[0] if names else platform.processor() or platform.machine()


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 in hardware: a CPU with AVX512-BF16, AMX or Arm BF16, or a
    CUDA GPU of compute capability 8.0 (Ampere) or later."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_native_bf16(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def cuda_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA `device` computes bf16 in hardware (not by emulation)."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation argument, and no emulation either
            return torch.cuda.is_bf16_supported()
