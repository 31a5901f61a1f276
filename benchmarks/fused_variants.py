"""The fused attention kernel's backward and grouping variants, side by side in one process.

    python benchmarks/fused_variants.py                  # attention at N = 65,536, then training steps alternating
    python benchmarks/fused_variants.py --n 16384 --steps 10

Three settings of ``columnformer.fused_sparse`` compute the same math (tests/test_fused_sparse.py runs every test on
each): ``two_pass`` (backward over reading columns, then over source columns through the inverted edge table,
recomputing the scores), ``one_pass`` (one backward pass over colour phases of column blocks that share no source;
one column at a time) and ``one_pass+groups`` (the one pass, and the forward, on groups of 4 neighbouring columns
against the union of their sources). Part 1: the benchmark sheet's attention alone (grid, K = 64 local, batch 8,
one head, q/k 16, v 32, fp32, 2 threads): forward and backward timed ``--repeats`` times per setting, the settings
alternating; medians. Part 2: the benchmark sheet of ``benchmarks/scale.py`` (untied, 4 recurrent steps,
``sparse_kernel=fused``, kept host memory) trains ``--steps`` steps per setting alternating in one model (after 3
warm-up steps); medians. Start it with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` to match the ``+keep+thp`` rows of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench_sheet import alternate_steps, median_table, sheet

import columnformer.fused_sparse as fused_sparse
from columnformer.fused_sparse import fused_sparse_attention, visit_order
from columnformer.runtime import keep_host_memory

SETTINGS = {"two_pass": ("two_pass", "off"), "one_pass": ("one_pass", "off"), "one_pass+groups": ("one_pass", "on")}


def _set(name: str) -> None:
    fused_sparse.BACKWARD, fused_sparse.GROUPS = SETTINGS[name]


def attention(n: int, repeats: int) -> None:
    torch.manual_seed(0)
    geo, conn = sheet(n)
    order = visit_order(geo.coords)
    q, k = torch.randn(n, 8, 1, 16), torch.randn(n, 8, 1, 16)
    v, g = torch.randn(n, 8, 1, 32), torch.randn(n, 8, 1, 32)
    w = conn.dist.float()
    bias = (-0.1 * w).requires_grad_()
    index = conn.index.long().contiguous()
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in SETTINGS}
    for _ in range(repeats):
        for name in SETTINGS:
            _set(name)
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            t0 = time.perf_counter()
            out, st = fused_sparse_attention(qq, kk, vv, bias, w, index, conn.mask, order=order)
            t1 = time.perf_counter()
            (out * g).sum().add(st.wiring).backward()
            times[name].append((t1 - t0, time.perf_counter() - t1))
            bias.grad = None
    print(f"## attention alone, N = {n:,}, K = 64, batch 8, {torch.get_num_threads()} threads, medians of {repeats}")
    print("| setting | forward (s) | backward (s) | backward vs two_pass |")
    print("|---|---:|---:|---:|")
    ref = statistics.median(b for _, b in times["two_pass"])
    for name, ts in times.items():
        f, b = statistics.median(x for x, _ in ts), statistics.median(y for _, y in ts)
        print(f"| {name} | {f:.3f} | {b:.3f} | {ref / b:.2f}x |")


def steps(n: int, count: int) -> None:
    times = alternate_steps(n, {name: (lambda name=name: _set(name)) for name in SETTINGS}, count)
    median_table(times, "two_pass", f"training steps of the benchmark sheet, N = {n:,}, medians of {count} alternating steps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536, help="columns (a power-of-two-friendly grid)")
    p.add_argument("--repeats", type=int, default=8, help="attention timings per setting")
    p.add_argument("--steps", type=int, default=5, help="training steps per setting")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if not fused_sparse.available():
        raise SystemExit(f"the C++ kernels could not be built: {fused_sparse.load_error()}")
    torch.set_num_threads(a.threads)
    kept = keep_host_memory()
    print(f"# kept host memory: {kept}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    attention(a.n, a.repeats)
    steps(a.n, a.steps)
    print(f"\n# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
