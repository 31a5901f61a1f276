"""The C++ kernels for the CPU, built on first use: fused sparse attention (``csrc/fused_sparse.cpp``, used by
:mod:`columnformer.fused_sparse`), the per-column layers (``csrc/column_ops.cpp``, used by
:mod:`columnformer.layers`), a caching allocator for large host tensors (``csrc/host_cache.cpp``, used by
:func:`columnformer.runtime.cache_host_memory`) and AdamW's step with 8-bit moments (``csrc/optim_ops.cpp``, used by
:mod:`columnformer.optim`). One extension module from every source in ``csrc/`` (``bindings.cpp`` names its
functions).

It is compiled with torch's JIT extension loader (needs a C++ compiler and ``ninja``, a dependency) into
torch's extension cache (``TORCH_EXTENSIONS_DIR``), under a name that includes a hash of the sources, this
CPU's instruction-set flags (it is built with ``-march=native``) and the torch version. :func:`available` says
whether it loaded, :func:`load_error` why not; without it the library runs the same math in PyTorch
(``sparse_kernel='fused'`` alone refuses, naming the other kernels).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("fused_sparse.cpp", "column_ops.cpp", "host_cache.cpp", "optim_ops.cpp", "bindings.cpp")
HEADERS = ("vec.h",)
_EXT = None
_ERROR: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _announce_build(cpp_extension, name: str) -> None:
    """Say on stderr that the first build is starting (it takes about a minute). Only a message: the build
    directory is found through a private torch helper, so any failure here is ignored rather than blocking the
    kernels."""
    try:
        built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    except Exception:
        return
    if not built.exists():
        print(f"columnformer: building the C++ kernels (once per machine, ~1 minute) in {built.parent}",
              file=sys.stderr, flush=True)


def load():
    """The extension module, building it on first call (~1 minute); None if it cannot be built."""
    global _EXT, _ERROR
    if _EXT is not None or _ERROR is not None:
        return _EXT
    try:
        _EXT = build(CSRC)
    except Exception as e:  # no compiler, no ninja, a failed build: say why, the caller falls back or refuses
        _ERROR = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return _EXT


def build(csrc: Path, prefix: str = "columnformer_native", sources: tuple[str, ...] = SOURCES):
    """Build (or find already built) the extension from ``sources`` (and ``HEADERS``) in folder ``csrc``, named
    ``{prefix}_{hash}``; raises if the build fails. :func:`load` builds the installed sources;
    ``benchmarks/kernel_ab.py`` builds another revision's (whose list of sources may be shorter) next to them."""
    from torch.utils import cpp_extension

    csrc = Path(csrc)
    text = "".join((csrc / f).read_text() for f in sources + HEADERS)
    tag = hashlib.sha256((text + _cpu_flags() + torch.__version__).encode()).hexdigest()[:12]
    name = f"{prefix}_{tag}"
    _announce_build(cpp_extension, name)
    return cpp_extension.load(
        name=name, sources=[str(csrc / f) for f in sources], extra_include_paths=[str(csrc)],
        extra_cflags=["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"], extra_ldflags=["-fopenmp"],
        verbose=bool(os.environ.get("COLUMNFORMER_VERBOSE_BUILD")),
    )


def available() -> bool:
    """Whether the C++ kernels are built (building them now on first call, ~1 minute)."""
    return load() is not None


def load_error() -> str | None:
    """Why the C++ kernels could not be built (None if they were); tries the build first if it was not tried yet."""
    load()
    return _ERROR
