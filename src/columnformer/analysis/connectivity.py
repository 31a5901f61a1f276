"""Connectivity measurements that stream over a dataset and never keep per-sample attention maps."""

from __future__ import annotations

import numpy as np
import torch


def edge_distances(sheet) -> np.ndarray:
    """Length of every edge the sheet's attention uses: (N, N) dense or (N, K) sparse (current wiring)."""
    geometry = sheet.geometry
    if sheet.edge_index is None:
        return sheet.connectivity.dist.double().numpy()
    src = sheet.edge_index.cpu().numpy()
    dst = np.broadcast_to(np.arange(geometry.n)[:, None], src.shape)
    return geometry.pair_distances(dst, src)


def edge_mask(sheet) -> np.ndarray:
    """Which entries of the edge arrays are real edges."""
    if sheet.edge_mask is None:
        return np.ones((sheet.n, sheet.n), dtype=bool)
    return sheet.edge_mask.cpu().numpy().astype(bool)


@torch.no_grad()
def mean_attention(model, loader, device="cpu", max_batches: int | None = None) -> torch.Tensor:
    """Mean attention weight per connection per step, averaged over samples and heads.

    Returns (T, N, N) for dense sheets or (T, N, K) for sparse ones. Only a running sum of that
    size is kept; each batch's maps are dropped after being added.
    """
    model.eval()
    total, count = None, 0
    for i, (images, _) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        _, trace = model(images.to(device), record=("attn",))
        maps = torch.stack([a.float().sum(dim=(0, 1)) for a in trace.attn])  # (T, N, N|K) summed over B, H
        total = maps.cpu().double() if total is None else total + maps.cpu().double()
        count += images.shape[0] * trace.attn[0].shape[1]
    if total is None:
        raise ValueError("the loader yielded no batches; nothing to average")
    return (total / count).float()


def attention_vs_distance(
    mean_attn: torch.Tensor, dist: np.ndarray, mask: np.ndarray | None = None, bins: int | np.ndarray = 12
) -> dict[str, np.ndarray]:
    """Mean attention weight of the edges in each distance bin, per step.

    Returns ``{"bin_centers": (nb,), "weight": (T, nb), "mass": (T, nb), "count": (nb,)}`` where
    ``weight`` is the mean attention weight of one edge in the bin and ``mass`` the share of all
    attention falling in the bin.
    """
    a = mean_attn.numpy()
    mask = np.ones(dist.shape, dtype=bool) if mask is None else mask
    d = dist[mask]
    edges = np.linspace(0.0, d.max() + 1e-9, bins + 1) if np.isscalar(bins) else np.asarray(bins)
    which = np.clip(np.digitize(d, edges) - 1, 0, len(edges) - 2)
    count = np.bincount(which, minlength=len(edges) - 1)
    weight, mass = [], []
    for t in range(a.shape[0]):
        w = a[t][mask]
        s = np.bincount(which, weights=w, minlength=len(edges) - 1)
        weight.append(np.divide(s, count, out=np.full(len(s), np.nan), where=count > 0))
        mass.append(s / max(w.sum(), 1e-12))
    return {
        "bin_centers": 0.5 * (edges[:-1] + edges[1:]),
        "weight": np.array(weight),
        "mass": np.array(mass),
        "count": count,
    }
