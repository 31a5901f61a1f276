"""One attention call (forward + backward) of each sparse kernel, side by side in one process.

    python benchmarks/attention_kernels.py                 # N = 16,384 (a 128 x 128 grid), K = 64
    python benchmarks/attention_kernels.py --side 256 --repeats 3

The benchmark sheet's attention shapes (``benchmarks/scale.py``): batch 8, one head, q/k 16, values 32, fp32,
``Connectivity.local(k)`` on a square grid; loss = mean square output + wiring. Prints the median time of
``--repeats`` calls (after one warm-up call) per kernel and each kernel's speed relative to the gather kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from columnformer import grid
from columnformer.block_sparse import block_sparse_attention, build_block_plan
from columnformer.connectivity import Connectivity
from columnformer.fused_sparse import available, fused_sparse_attention, load_error, visit_order
from columnformer.sparse_attention import sparse_attention


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=128, help="grid side: N = side^2 columns")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--qk-dim", type=int, default=16)
    p.add_argument("--v-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not available():
        p.error(f"the fused kernel could not be built: {load_error()}")
    geo = grid(a.side, a.side)
    conn = Connectivity.local(geo, a.k)
    n = geo.n
    plan = build_block_plan(np.asarray(geo.coords), conn.index, conn.mask)
    order = visit_order(geo.coords)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(n, a.batch, 1, a.qk_dim, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(n, a.batch, 1, a.v_dim, generator=g).requires_grad_()
    bias = torch.zeros(n, a.k, requires_grad=True)
    w = torch.rand(n, a.k, generator=g)
    kernels = {
        "gather": lambda: (lambda o, s: (o, s.wiring))(*sparse_attention(q, k, v, bias, w, conn.index, conn.mask)),
        "block": lambda: block_sparse_attention(q, k, v, bias, w, plan)[:2],
        "fused": lambda: (lambda o, s: (o, s.wiring))(*fused_sparse_attention(q, k, v, bias, w, conn.index, conn.mask,
                                                                               order=order)),
    }
    print(f"# N={n:,}, K={a.k}, batch {a.batch}, q/k {a.qk_dim}, v {a.v_dim}, fp32, {torch.get_num_threads()} threads; "
          f"load average before: {os.getloadavg()[0]:.2f}; block plan: {plan.describe()}")
    times = {}
    for name, run in kernels.items():
        samples = []
        for i in range(a.repeats + 1):
            t0 = time.perf_counter()
            out, wiring = run()
            (out.square().mean() + wiring).backward()
            if i:
                samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
    print("| kernel | forward + backward (s) | vs gather |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {times['gather'] / t:.2f}x |")


if __name__ == "__main__":
    main()
