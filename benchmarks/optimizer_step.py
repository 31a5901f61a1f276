"""One optimizer step on the benchmark sheet's parameters, side by side in one process.

    python benchmarks/optimizer_step.py                  # N = 16,384 columns
    python benchmarks/optimizer_step.py --n 65536 --repeats 5

The parameters of ``benchmarks/scale.py``'s sheet (3,392 per column: untied q/k/MLP weights, norms, edge biases,
position embeddings) with random gradients; each optimizer takes one warm-up step (allocating its state), then the
median of ``--repeats`` timed steps is printed with its speed relative to ``torch.optim.AdamW``'s per-parameter loop:
that loop (``foreach=False``), torch's multi-tensor version (``foreach=True``), torch's fused kernel (``fused=True``:
what the trainer uses for ``optim.state_dtype=fp32``) and ``columnformer.optim.AdamW`` (bf16 moments,
``optim.state_dtype=bf16``; 8-bit moments, ``optim.state_dtype=8bit``). Also prints the largest difference of the fused step's weights from the loop's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from columnformer.optim import AdamW


def sheet_shapes(n: int) -> list[tuple[int, ...]]:
    """Parameter shapes of scale.py's sheet: width 32, q/k 16, MLP ratio 1, K = 64 edges, untied everything."""
    return [(n, 32), (n, 32), (n, 32), (n, 64), (n, 32, 16), (n, 16), (n, 32, 16), (n, 16), (n, 32), (n, 32),
            (n, 32, 32), (n, 32), (n, 32, 32), (n, 32)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="columns")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    shapes = sheet_shapes(a.n)
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    makers = {
        "torch AdamW, per-parameter loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        "torch AdamW, foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch AdamW, fused (the trainer, fp32)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "columnformer AdamW, bf16 moments": lambda ps: AdamW(ps, lr=1e-3),
        "columnformer AdamW, 8-bit moments": lambda ps: AdamW(ps, lr=1e-3, state_dtype="8bit"),
    }
    print(f"# N={a.n:,} columns, {sum(x.numel() for x in init) / a.n:,.0f} parameters per column, "
          f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()[0]:.2f}")
    times, weights = {}, {}
    for name, make in makers.items():
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        for prm, gr in zip(ps, grads):
            prm.grad = gr
        opt = make(ps)
        opt.step()  # allocates the state
        samples = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            opt.step()
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
        weights[name] = ps[-3].detach()
    base = next(iter(times.values()))
    print("| optimizer | step (ms) | vs per-parameter loop |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.1f} | {base / t:.2f}x |")
    diff = (weights["torch AdamW, fused (the trainer, fp32)"] - weights["torch AdamW, per-parameter loop"]).abs().max()
    print(f"fused vs loop after {a.repeats + 1} steps: largest weight difference {float(diff):.2e}")


if __name__ == "__main__":
    main()
