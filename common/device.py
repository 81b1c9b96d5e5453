"""Device, dtype and CPU-thread resolution, one rule set for every engine.

`Dtype` is the single name services use for numeric precision (`--dtype`); each engine passes its own
rule for what "auto" means on a CPU and on CUDA.
"""

from __future__ import annotations

import math
import os
from enum import StrEnum
from pathlib import Path

import torch


class Dtype(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


_TORCH_DTYPES = {Dtype.FP32: torch.float32, Dtype.BF16: torch.bfloat16, Dtype.FP16: torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """"auto": the first CUDA device when there is one, else the CPU; otherwise torch's own names."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cuda_half_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_dtype(dtype: Dtype | str, device: torch.device, auto_cpu: torch.dtype = torch.float32,
                  auto_cuda: torch.dtype | None = None) -> torch.dtype:
    """A named dtype, or for "auto" the engine's own choice on this device (CUDA default: bf16 where
    supported, else fp16)."""
    try:
        named = Dtype(dtype)
    except ValueError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {[d.value for d in Dtype]}") from None
    if named is not Dtype.AUTO:
        return _TORCH_DTYPES[named]
    if device.type == "cuda":
        return auto_cuda or cuda_half_dtype()
    return auto_cpu


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpuinfo_field(lines: list[str], name: str) -> str:
    """The first core's value of one /proc/cpuinfo field ("" when absent)."""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), "")


def cpu_bf16_support(lines: list[str] | None = None) -> str:
    """The CPU's native bf16 matmul instructions: "amx_bf16", "avx512_bf16" or "" (none: bf16 is emulated)."""
    flags = _cpuinfo_field(_cpuinfo() if lines is None else lines, "flags").split()
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), "")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at 2x (AVX-512 on 256-bit units, e.g. AMD Zen 4) to over 4x (Zen 5's
    full-width AVX-512, or AMX) fp32's speed."""
    return bool(cpu_bf16_support())


def cpu_has_amx() -> bool:
    """AMX (Intel Xeon since Sapphire Rapids): bf16 matrix products fast enough that the element-wise work around
    them is a third of a bf16 rerank (reranker.rowops)."""
    return cpu_bf16_support() == "amx_bf16"


def cpu_inference_dtype() -> torch.dtype:
    """What "auto" means for inference on this CPU: bf16 where the CPU computes it natively (about twice fp32's
    speed), fp32 elsewhere (bf16 emulated in fp32 is slower than fp32 itself)."""
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# oneDNN (bf16 matmuls on the CPU) keeps the kernels it builds for each matmul shape in two LRU caches, oneDNN's
# primitive cache and ideep's, 1,024 entries each by default at about 0.5 MiB an entry. Rerank and embedding
# shapes vary with every request (rows = tokens), so with the defaults a bf16 process grows by up to ~1 GiB over
# its first thousands of requests. One 20-document rerank of SmolLM2 uses ~70 shapes: 128 entries hold a whole
# forward (as fast as 1,024: 0.74 s; 32 entries thrash within it, 0.78 s) and cap the caches at ~150 MiB.
CPU_KERNEL_CACHE_ENTRIES = 128
_KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_cpu_kernel_caches(entries: int = CPU_KERNEL_CACHE_ENTRIES) -> None:
    """Cap oneDNN's per-shape kernel caches (above) unless the environment sets them. Both are read when the
    process builds its first oneDNN kernel, so call this before the first bf16 matmul; later it changes nothing."""
    for variable in _KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(variable, str(entries))


# Where a container's CPU limit shows: cgroup v2's "QUOTA PERIOD" (or "max PERIOD"), v1's quota and period files.
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_CPU = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_limit(v2: Path = CGROUP_V2_CPU_MAX, v1: tuple[Path, Path] = CGROUP_V1_CPU) -> int | None:
    """The CPU limit of this process's cgroup in whole cores (rounded up), or None without one. A Kubernetes or
    Docker CPU limit is a quota, not an affinity: the process still sees every core of the node."""
    try:
        quota, period = v2.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = v1[0].read_text().strip(), v1[1].read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or not period.isdigit() or int(period) <= 0:
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def cpu_threads(requested: int = 0) -> int:
    """Threads for torch's CPU kernels: `requested` when above 0, else OMP_NUM_THREADS when set, else the cores this
    process may run on (its affinity) within its cgroup's CPU limit. Threads beyond the cores a process gets only
    wait for each other: under a quota the whole pool is throttled together."""
    if requested > 0:
        return requested
    variable = os.environ.get("OMP_NUM_THREADS", "").strip()
    if variable.isdigit() and int(variable) > 0:
        return int(variable)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def set_cpu_threads(requested: int = 0) -> int:
    """Size torch's CPU thread pool by `cpu_threads`; returns the count."""
    threads = cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads


def describe_device(device: torch.device) -> str:
    """What a benchmark ran on, for its JSON: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {describe_cpu(_cpuinfo())}, {torch.get_num_threads()} threads"


def describe_cpu(lines: list[str]) -> str:
    """The CPU's name, generation and bf16 instructions, from /proc/cpuinfo's lines. A virtual machine's name can
    hide the generation ("AMD EPYC"), and generations differ 2x in bf16 speed, so family and model are named."""
    name = _cpuinfo_field(lines, "model name") or "unknown"
    family, model = _cpuinfo_field(lines, "cpu family"), _cpuinfo_field(lines, "model")
    generation = f"family {family} model {model}; " if family and model else ""
    return f"{name} ({generation}{cpu_bf16_support(lines) or 'no native bf16'})"
