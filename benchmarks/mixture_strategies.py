"""Static weight banks: mix the weights (materialise N per-column matrices) or mix the experts' outputs?

    python benchmarks/mixture_strategies.py            # ~1 min on 2 cores

For each shape (N columns, batch B, in, out, E experts) one forward + backward of ``MixtureLinear`` with static
coefficients, run both ways in the same process (the library's two code paths, chosen by patching
``mixture.mix_outputs``), alternated, median of 5 after a warm-up; prints both times, their ratio and which way
``mix_outputs`` picks. Multiply-adds: weights N*E*in*out (mixing) + N*B*in*out (the batched matmul); outputs
N*B*E*in*out. Shapes: the digits preset's layers, the addition sheet, the predecessor's tut-tiny MLP bank, the
wide sheet, at training batches and at batches of 1-2 (inference on single samples).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from columnformer import mixture

SHAPES = [  # (N, B, in, out, E)
    (48, 64, 64, 64, 4), (48, 64, 64, 64, 16), (13, 64, 64, 256, 4), (384, 32, 384, 384, 24),
    (4096, 32, 16, 16, 16), (48, 1, 64, 64, 4), (48, 2, 64, 64, 4), (384, 1, 384, 384, 24),
    (384, 2, 384, 384, 24), (4096, 1, 16, 16, 16),
]


def time_step(lin: mixture.MixtureLinear, x: torch.Tensor, outputs: bool, reps: int) -> float:
    original = mixture.mix_outputs
    mixture.mix_outputs = lambda batch, experts: outputs
    try:
        times = []
        for _ in range(reps + 1):
            lin.coef[0].update(None)
            start = time.perf_counter()
            lin(x).square().mean().backward()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])
    finally:
        mixture.mix_outputs = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; forward + backward of one static MixtureLinear")
    print("| N | B | in | out | E | mix weights (ms) | mix outputs (ms) | outputs / weights | mix_outputs picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, b, i, o, e in SHAPES:
        torch.manual_seed(0)
        coef = mixture.MixtureCoefficients(n, i, experts=e, mode="static")
        lin = coef.linear(i, o)
        x = torch.randn(n, b, i, requires_grad=True)
        t_w = time_step(lin, x, False, args.reps)
        t_o = time_step(lin, x, True, args.reps)
        pick = "outputs" if mixture.mix_outputs(b, e) else "weights"
        print(f"| {n} | {b} | {i} | {o} | {e} | {t_w * 1e3:.1f} | {t_o * 1e3:.1f} | {t_o / t_w:.2f} | {pick} |")


if __name__ == "__main__":
    main()
