"""Where and how computation runs: device choice, precision (autocast), global seeding, host-memory reuse.

A low layer: the training loop, the tasks and the analysis suite all use it, none of them owns it.
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; an explicit CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    return dev


def keep_host_memory() -> bool:
    """Keep freed host memory in this process for reuse (glibc malloc: no ``mmap`` for large blocks, trim only
    above 2 GiB of free top-of-heap). Returns whether it took effect (False off glibc).

    By default glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
    unmaps them on free, so every large CPU tensor of every step is page-faulted and zeroed again by the
    kernel: on the benchmark sheet at 65,536 columns ~10 GB of faults per step. Keeping the memory made
    steps 1.6-2.2x faster at 65,536-131,072 columns and raised the peak RSS by 30-60 % (BENCHMARKS.md); at
    4,096-16,384 columns the effect was within the VM's spread. Process-wide and irreversible for blocks already
    allocated; changes no result.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def cache_host_memory(min_bytes: int = 1 << 20, huge_pages: bool | None = None, max_mappings: int = 0) -> bool:
    """Reuse freed large host tensors: a caching allocator for CPU blocks of >= ``min_bytes`` (``csrc/host_cache.cpp``,
    built with the C++ kernels), installed process-wide (Linux). Returns whether it took effect (False where the C++
    kernels cannot be built, or off Linux). ``huge_pages``: advise its blocks to transparent huge pages; None: when
    this process was started with :data:`HUGE_PAGES_TUNABLE` (the setting that does the same for glibc's own large
    blocks). ``max_mappings``: above this many memory mappings in the process (counted every 16 misses; moving pages
    between blocks splits mappings) it gives back every cached block and stops moving pages, mapping fresh blocks,
    until the count is below half of it; 0: half of ``/proc/sys/vm/max_map_count``.

    Like :func:`keep_host_memory` it spares a training loop the page faults of re-mapping its large tensors every
    step, but it keeps each freed block whole for the next request of its size (rounded up to 2 MiB; a cached block
    up to 1.25 times the size also serves) instead of serving everything from one fragmenting heap. A request that no
    cached block fits gets a new block built from cached blocks' pages, moved with ``mremap`` (nothing copied or
    faulted), so the tensors alive plus the cache never exceed the most ever alive at once: the process holds no more
    than it would without the cache, and after a training loop's first step nothing is faulted in again. Changes no
    result.
    """
    import os

    from . import native

    ext = native.load()
    if huge_pages is None:
        huge_pages = HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")
    return bool(ext is not None and ext.host_cache_enable(int(min_bytes), bool(huge_pages), int(max_mappings)))


def host_cache_stats() -> dict[str, int] | None:
    """Counters of :func:`cache_host_memory`'s allocator (None where the C++ kernels cannot be built): requests
    served by a cached block (hits) or by a new block (misses), the bytes of new blocks moved from cached blocks
    (moved_bytes) and mapped afresh (fresh_bytes: faulted in when first written), the bytes now cached and alive in
    its blocks, and the process's memory mappings at the last count (mappings) and their limit (max_mappings)."""
    from . import native

    ext = native.load()
    if ext is None:
        return None
    keys = ("hits", "misses", "moved_bytes", "fresh_bytes", "cached_bytes", "live_bytes", "mappings", "max_mappings")
    return dict(zip(keys, ext.host_cache_stats()))


# glibc (>= 2.35) tunable: malloc advises the kernel to back its mmap-ed blocks with transparent huge pages
# (MADV_HUGEPAGE), so a large tensor faults in 2 MiB at a time instead of 4 KiB. Read at process start only:
# export it before Python starts (scripts/main.sh does). Older glibc ignores unknown tunables.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def with_huge_pages(env: dict) -> dict:
    """A copy of ``env`` whose ``GLIBC_TUNABLES`` includes :data:`HUGE_PAGES_TUNABLE` (for child processes).

    Measured on the benchmark sheet at 65,536 columns (fused kernel, default allocator): the step 1.4-1.7x
    faster at the same peak memory (BENCHMARKS.md). Changes no result. Needs the kernel's transparent huge
    pages in ``madvise`` or ``always`` mode (``/sys/kernel/mm/transparent_hugepage/enabled``).
    """
    env = dict(env)
    current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    env["GLIBC_TUNABLES"] = ":".join(current + [HUGE_PAGES_TUNABLE])
    return env


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(precision: str, device: torch.device | str):
    """fp32: nothing; bf16 / fp16: autocast on the device's type."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
