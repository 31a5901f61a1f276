"""Two revisions of the C++ kernels (``src/columnformer/csrc``) side by side in one process.

    python benchmarks/kernel_ab.py --base 38ad1b5                # that commit's kernels vs the working tree's
    python benchmarks/kernel_ab.py --base HEAD~1 --new HEAD --n 16384 --steps 6

Each revision's sources (``git show REV:src/columnformer/csrc/...``; ``--new tree``: the files on disk) are built
with :func:`columnformer.native.build` (the same flags as the installed kernels) and loaded side by side. The
benchmark sheet of ``benchmarks/bench_sheet.py`` (N columns, fused attention, 4 recurrent steps, batch 8, kept host
memory) first runs one forward + backward with each build from the same weights and prints the largest difference
of the outputs and gradients (the revisions are meant to compute the same math); then trains, the builds
alternating step by step after 3 warm-up steps (``--steps`` per build), and prints the median step per build and,
per kernel entry point, its median time per call and its total per step. Only ratios from one run are comparable
(this VM's speed drifts between runs). Start it with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` to match the
``+keep+thp`` rows of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_sheet import alternate_steps, median_table, sheet_model

from columnformer import native
from columnformer.runtime import keep_host_memory

REPO = Path(__file__).resolve().parents[1]
TIMED = ("sparse_forward", "sparse_backward", "linear_forward", "linear_backward", "norm_forward", "norm_backward")


def sources(rev: str, into: Path) -> tuple[Path, tuple[str, ...]]:
    """A folder with the kernel sources of git revision ``rev`` (``tree``: the installed sources themselves) and the
    sources it has (an older revision may lack some of today's, e.g. ``host_cache.cpp``)."""
    if rev == "tree":
        return native.CSRC, native.SOURCES
    into.mkdir(parents=True)
    present = []
    for f in native.SOURCES + native.HEADERS:
        path = (native.CSRC / f).resolve().relative_to(REPO)
        out = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True)
        if out.returncode != 0:
            if f in native.HEADERS or f == "bindings.cpp":
                raise SystemExit(f"revision {rev!r} has no {path}: {out.stderr.strip()}")
            continue
        (into / f).write_text(out.stdout)
        present.append(f)
    return into, tuple(f for f in native.SOURCES if f in present)


class Timed:
    """A build whose kernel entry points record their wall time per call into ``log[name]``."""

    def __init__(self, ext, log: dict[str, list[float]]):
        self._ext, self._log = ext, log

    def __getattr__(self, name: str):
        fn = getattr(self._ext, name)
        if name not in TIMED:
            return fn

        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self._log[name].append(time.perf_counter() - t0)
            return out

        return timed


def same_math(n: int, builds: dict) -> None:
    """One forward + backward per build from the same weights and input: the largest differences."""
    model, tokens = sheet_model(n)
    results = {}
    for name, ext in builds.items():
        native._EXT = ext
        out, trace = model(tokens)
        (out.square().mean() + 0.01 * trace.wiring_cost).backward()
        results[name] = (out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    (a_out, a_grads), (b_out, b_grads) = results.values()
    d_out = (a_out - b_out).abs().max().item()
    d_grad = max((a_grads[k] - b_grads[k]).abs().max().item() / max(a_grads[k].abs().max().item(), 1e-30) for k in a_grads)
    print(f"same math: max |output difference| {d_out:.3g} (outputs up to {a_out.abs().max().item():.3g}); "
          f"max gradient difference relative to that gradient's largest value {d_grad:.3g}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision of the reference kernels")
    p.add_argument("--new", default="tree", help="git revision of the other kernels (default: the working tree)")
    p.add_argument("--n", type=int, default=65536, help="columns (a power-of-two-friendly grid)")
    p.add_argument("--steps", type=int, default=8, help="training steps per build, alternating")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kept = keep_host_memory()
    print(f"# kept host memory: {kept}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; "
          f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()[0]:.2f}")
    logs: dict[str, dict[str, list[float]]] = {}
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, rev in enumerate((a.base, a.new)):
            label = f"{'base' if i == 0 else 'new'} ({rev})"
            folder, files = sources(rev, Path(tmp) / f"rev{i}")
            ext = native.build(folder, prefix=f"columnformer_ab{i}", sources=files)
            logs[label] = defaultdict(list)
            builds[label] = Timed(ext, logs[label])
        same_math(min(a.n, 4096), builds)

        def use(label: str):
            return lambda: setattr(native, "_EXT", builds[label])

        def clear() -> None:
            for log in logs.values():
                log.clear()

        times = alternate_steps(a.n, {label: use(label) for label in builds}, a.steps, after_warmup=clear)
    native._EXT = None
    base = next(iter(builds))
    median_table(times, base, f"training steps of the benchmark sheet, N = {a.n:,}, medians of {a.steps} alternating steps")
    print("\n| kernel entry point | " + " | ".join(f"{label}: median per call (ms), per step (s)" for label in builds) + " |")
    print("|---|" + "---:|" * len(builds))
    for name in TIMED:
        cells = []
        for label, log in logs.items():
            timed_calls = log.get(name, [])
            cells.append(f"{statistics.median(timed_calls) * 1e3:.1f}, {sum(timed_calls) / len(times[label]):.3f}"
                         if timed_calls else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
