"""Process-wide settings for speed: glibc's allocator.

glibc's ``malloc`` serves every block larger than its mmap threshold (dynamic, at most 32 MiB on
64-bit) with a fresh ``mmap`` and returns it to the kernel on ``free``; smaller freed blocks at
the top of the heap are also given back once they exceed the trim threshold. PyTorch on CPU
allocates and frees its activation and gradient tensors on every forward and backward, so the
kernel maps, zero-fills and unmaps the same memory over and over: about 100,000 page faults a
second in an evaluation at batch 500 on the small CNN (a conv activation is 43 MiB there), and a
large share of the time in the kernel.

:func:`tune_allocator` tells glibc (``mallopt``) to serve every block from the heap and to keep
freed memory (up to 2 GiB at the top of the heap) for reuse instead of trimming it. The
arithmetic is untouched (PyTorch aligns every CPU tensor to 64 bytes either way; results are
bitwise identical, checked by benchmarks/allocator.py); only the kernel's work goes away.
docs/PERFORMANCE.md has the measurement. The price: the process keeps its peak memory until it
exits instead of giving freed memory back.

The ``dorat`` command calls it at start (so ``train``, ``eval``, ``compare`` and its workers
all get it); Python users can call it themselves. It leaves the allocator alone when
``DORAT_MALLOC=system`` is set, on a C library that is not glibc, when another allocator is
preloaded (jemalloc, tcmalloc, mimalloc: those already cache), and when the user has set
glibc's own malloc variables (``MALLOC_*_``, ``GLIBC_TUNABLES=glibc.malloc...``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ENV = "DORAT_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_KEEP = 2**31 - 1  # trim threshold (mallopt takes an int): keep up to 2 GiB of freed memory
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_GLIBC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
               "MALLOC_TOP_PAD_")

_state: str | None = None  # what the first call did (later calls repeat it)


def _reason_to_skip(environ: Mapping[str, str]) -> str | None:
    setting = environ.get(ENV, "").strip().lower()
    if setting in ("system", "off", "0", "no", "false"):
        return f"left alone ({ENV}={environ[ENV]})"
    if setting not in ("", "auto", "on", "1", "yes", "true"):
        return f"left alone ({ENV}={environ[ENV]!r} is not one of auto, system)"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "left alone (not glibc)"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return "left alone (another allocator is preloaded)"
    if any(v in environ for v in _GLIBC_VARS) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "left alone (glibc malloc settings from the environment)"
    return None


def tune_allocator(environ: Mapping[str, str] | None = None) -> str:
    """Make glibc keep freed memory for reuse (see the module docstring). Returns what it did:
    ``"tuned"`` or ``"left alone (reason)"``. Safe to call more than once."""
    global _state
    if _state is not None:
        return _state
    reason = _reason_to_skip(os.environ if environ is None else environ)
    if reason is None:
        try:
            libc = ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt (no ldconfig run)
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1
        except (OSError, AttributeError):
            ok = False
        reason = "tuned" if ok else "left alone (mallopt failed)"
    _state = reason
    return reason


__all__ = ["ENV", "tune_allocator"]


def use_bf16(amp: str, device_type: str) -> bool:
    """``perf.amp`` on a device: bf16 when asked for, or when ``auto`` and the device computes
    bf16 natively."""
    return amp == "bf16" or (amp == "auto" and bf16_native(device_type) is True)


def bf16_native(device_type: str, cpuinfo: str | None = None) -> bool | None:
    """Whether the device computes bf16 natively: CUDA (compute capability 8+), a CPU with
    AVX512-BF16 or AMX-BF16; None when it cannot be told (a CPU that is not Linux's)."""
    if device_type == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device_type != "cpu":
        return None
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    if cpuinfo is None:
        return None
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def machine(device_type: str = "cpu", cpuinfo: str | None = None) -> dict[str, object]:
    """What computed a number: the CPU model (and the GPU's, on CUDA), the cores the system
    reports, the threads torch uses, and torch's version. Kernels and their summation order differ
    between machines, so runs and timings are compared on one machine only; each run's log and
    metrics carry this to tell them apart."""
    import os
    import platform

    import torch

    cpuinfo = (_cpuinfo() or "") if cpuinfo is None else cpuinfo
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.lower().startswith(("model name", "hardware", "cpu model"))), "")
    out: dict[str, object] = {"cpu": model or platform.processor() or platform.machine(),
                              "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__}
    if device_type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _cpuinfo() -> str | None:
    """Linux's /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def resolve_device(name: str) -> torch.device:
    """The device a config's ``device`` names ("auto": CUDA where present), refused when absent."""
    import torch

    from dorat.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu")
    return torch.device(name)
