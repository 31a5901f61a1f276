"""The benchmark sheet of ``benchmarks/scale.py`` and training steps that alternate settings in one process.

Shared by ``column_ops.py``, ``fused_variants.py`` and ``kernel_ab.py``: a 2D grid sheet of N columns, untied
columns of width 32, one head with query/key dimension 16, MLP ratio 1, recurrent, 4 steps, ``Connectivity.local(k=64)``,
the fused attention kernel; batch 8 of random tokens written into every column; one training step = forward,
backward (loss = mean square output + 0.01 wiring) and torch's fused AdamW step, fp32.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from columnformer import Columnformer, SheetConfig, grid
from columnformer.connectivity import Connectivity


def sheet(n: int):
    """(geometry, connectivity) of the benchmark sheet: a grid of N columns (N a power of two), local K = 64."""
    h = 2 ** int(math.floor(math.log2(n) / 2))
    if n % h:
        raise SystemExit(f"N={n} is not a power-of-two-friendly grid size")
    geo = grid(h, n // h)
    return geo, Connectivity.local(geo, 64)


def sheet_model(n: int, checkpoint: bool = False) -> tuple[Columnformer, torch.Tensor]:
    """The benchmark sheet's model (seed 0) and its batch of 8 random tokens (8, N, 32)."""
    torch.manual_seed(0)
    geo, conn = sheet(n)
    cfg = SheetConfig(width=32, steps=4, recurrent=True, heads=1, qk_dim=16, mlp_ratio=1.0, untied_attn=True,
                      untied_mlp=True, untied_norm=True, sparse_kernel="fused", checkpoint=checkpoint)
    model = Columnformer(cfg, geo, conn, input_area="all", output_area="all")
    return model, torch.randn(8, n, 32)


def alternate_steps(n: int, settings: dict[str, Callable[[], object]], count: int, warmup: int = 3,
                    checkpoint: bool = False, after_warmup: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Train one benchmark sheet for ``warmup`` steps (in the first setting), then ``count`` rounds of one step per
    setting (each entered by calling its function just before its step); returns every timed step per setting
    (seconds). ``after_warmup`` is called once between the two."""
    model, tokens = sheet_model(n, checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step() -> float:
        t0 = time.perf_counter()
        out, trace = model(tokens)
        (out.square().mean() + 0.01 * trace.wiring_cost).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    first = next(iter(settings.values()))
    first()
    for _ in range(warmup):
        step()
    if after_warmup is not None:
        after_warmup()
    times: dict[str, list[float]] = {s: [] for s in settings}
    for _ in range(count):
        for name, enter in settings.items():
            enter()
            times[name].append(step())
    return times


def median_table(times: dict[str, list[float]], reference: str, title: str) -> None:
    """Print a markdown table of the settings' median step times and their speed-up over ``reference``."""
    print(f"\n## {title}")
    print(f"| setting | step (s), median | all steps (s) | vs {reference} |")
    print("|---|---:|---|---:|")
    ref = statistics.median(times[reference])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {' '.join(f'{t:.2f}' for t in ts)} | {ref / med:.2f}x |")
