"""The per-column layers with and without their C++ kernels (``csrc/column_ops.cpp``), side by side in one process.

    python benchmarks/column_ops.py                      # ops at N = 65,536, then training steps alternating
    python benchmarks/column_ops.py --n 16384 --steps 10

Part 1, one layer at a time (batch 8, width 32, fp32, 2 threads): an untied linear's forward, its backward (input
gradient plus the weight gradient accumulated as inside an unrolled sheet) and an ``UntiedLayerNorm`` forward +
backward, each timed ``--repeats`` times with the C++ kernels (``layers.native_kernels(True)``) and with torch's ops
(``native_kernels(False)``) alternately; minimum and median of each. Part 2: the benchmark sheet of
``benchmarks/scale.py`` (grid, K = 64 local, fused attention kernel, 4 recurrent steps, batch 8) trains ``--steps``
steps per setting, alternating in the same process and model (after 3 warm-up steps); medians. Both
settings compute the same math (tests/test_column_ops.py); only the per-column layers differ.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bench_sheet import alternate_steps, median_table

from columnformer import native
from columnformer.layers import UntiedLayerNorm, UntiedLinear, native_kernels, untied_session
from columnformer.runtime import keep_host_memory


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ops(n: int, repeats: int) -> None:
    torch.manual_seed(0)
    lin, norm = UntiedLinear(n, 32, 32), UntiedLayerNorm(n, 32)
    x = torch.randn(n, 8, 32, requires_grad=True)
    g = torch.randn(n, 8, 32)

    def linear_forward():
        with torch.no_grad(), untied_session():
            lin(x)

    def linear_two_uses():  # two uses of one layer in a session: the second accumulates the weight gradient
        with untied_session():
            y = lin(lin(x))
        y.backward(g)

    def norm_forward_backward():
        norm(x).backward(g)

    print(f"| op (N = {n:,}, batch 8, 32 -> 32) | C++ min / median (ms) | torch min / median (ms) | torch / C++ (min) |")
    print("|---|---:|---:|---:|")
    for name, fn in [("untied linear, forward", linear_forward),
                     ("untied linear, 2 uses forward + backward", linear_two_uses),
                     ("UntiedLayerNorm, forward + backward", norm_forward_backward)]:
        times = {True: [], False: []}
        for setting in (True, False, True, False):  # warm-up, then alternate
            with native_kernels(setting):
                fn()
        for _ in range(repeats):
            for setting in (True, False):
                with native_kernels(setting):
                    times[setting] += _time(fn, 1)
        c, t = times[True], times[False]
        print(f"| {name} | {min(c)*1e3:.1f} / {statistics.median(c)*1e3:.1f} | {min(t)*1e3:.1f} / "
              f"{statistics.median(t)*1e3:.1f} | {min(t)/min(c):.2f}x |")


def steps(n: int, count: int) -> None:
    with contextlib.ExitStack() as stack:
        def use(enabled: bool) -> None:
            stack.close()
            stack.enter_context(native_kernels(enabled))

        times = alternate_steps(n, {"C++ layers": lambda: use(True), "torch layers": lambda: use(False)}, count)
    median_table(times, "torch layers", f"training steps of the benchmark sheet, N = {n:,} (fused attention), "
                 f"medians of {count} alternating steps")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536, help="columns")
    p.add_argument("--repeats", type=int, default=7, help="timings of each op and setting")
    p.add_argument("--steps", type=int, default=7, help="training steps per setting, alternating (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if not native.available():
        raise SystemExit(f"the C++ kernels could not be built: {native.load_error()}")
    torch.set_num_threads(a.threads)
    keep_host_memory()  # no page faults in the timed region: both settings reuse the same memory
    ops(a.n, a.repeats)
    if a.steps:
        steps(a.n, a.steps)


if __name__ == "__main__":
    main()
