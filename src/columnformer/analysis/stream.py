"""One streaming pass over a data split: mean attention per edge per step + per-class column responses.

Only running sums are kept: a (T, N, E) sum of attention (E = N dense, K sparse), and per-class
count / sum / sum-of-squares of each column's scalar response at the final step. Each batch's
attention maps and features are dropped after being added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..regularizers import SparsityStats
from .topography import ResponseStats, feature_response


@dataclass
class Collected:
    mean_attn: torch.Tensor  # (T, N, E) float32, averaged over samples and heads
    responses: ResponseStats  # final-step response per class per column
    samples: int
    batches: int
    accuracy: float | None
    response_kind: str
    halt_steps: np.ndarray | None = None  # (N,) mean steps each column ran before halting (halting sheets)
    expert_coef: np.ndarray | None = None  # (N, E) mean mixing coefficients of the last block's bank (mixtures)
    sparsity: dict | None = None  # per step activation sparsity of the column states (regularizers.SparsityStats)


def _batch_labels(batch):
    return batch[1]


@torch.no_grad()
def collect(
    model, loader, num_classes: int, device: str = "cpu", max_batches: int | None = None, response: str = "norm",
    labels_of=_batch_labels,
) -> Collected:
    """``labels_of(batch)``: the (B,) class of each sample for the per-class responses (default: ``batch[1]``)."""
    model.eval()
    n = model.sheet.n
    total, count, correct, batches = None, 0, 0, 0
    halt_sum, coef_sum = None, None
    bank = model.sheet.blocks[-1].coef
    stats = ResponseStats(num_classes, n)
    sparsity = SparsityStats()
    # float64 sums while they are small; float32 above ~64M entries (a 4-step 4096^2 dense map)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images, labels = batch[0], labels_of(batch)
        logits, trace = model(images.to(device), record=("attn", "features"))
        if trace.halt_steps is not None:
            steps = trace.halt_steps.double().sum(0).cpu()  # (N,)
            halt_sum = steps if halt_sum is None else halt_sum + steps
        if bank is not None:
            c = bank.last.double()  # (N, E) static or (N, B, E) dynamic: the last step's coefficients
            c = (c.sum(1) if c.ndim == 3 else c * images.shape[0]).cpu()
            coef_sum = c if coef_sum is None else coef_sum + c
        maps = torch.stack([a.float().sum(dim=(0, 1)) for a in trace.attn]).cpu()  # (T, N, E)
        if total is None:
            dtype = torch.float64 if maps.numel() <= (1 << 26) else torch.float32
            total = torch.zeros(maps.shape, dtype=dtype)
        total += maps.to(total.dtype)
        count += images.shape[0] * trace.attn[0].shape[1]
        stats.add(feature_response(trace.features[-1].cpu(), response), labels)
        sparsity.add([f.transpose(0, 1) for f in trace.features])  # each (N, B, C)
        if logits.ndim == 2:  # a classifier; other heads (e.g. MIM's patch decoder) have no accuracy
            correct += int((logits.argmax(-1).cpu() == labels).sum())
        else:
            correct = None
        batches += 1
        del trace, maps
    if total is None:
        raise ValueError("the data loader yielded no batches; nothing to analyse")
    samples = int(stats.count.sum())
    return Collected(
        (total / count).float(), stats, samples, batches, None if correct is None else correct / max(samples, 1), response,
        None if halt_sum is None else (halt_sum / samples).numpy(), None if coef_sum is None else (coef_sum / samples).numpy(),
        sparsity.result(),
    )


def to_builtin(x):
    """numpy / torch values -> JSON-ready Python (NaN/inf -> None)."""
    if isinstance(x, dict):
        return {str(k): to_builtin(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_builtin(v) for v in x]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "fc":
            return to_builtin(x.astype(np.float64).tolist())
        return x.tolist()
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if np.isfinite(v) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x
