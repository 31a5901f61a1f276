"""Connectivity measurements that stream over a dataset and never keep per-sample attention maps."""

from __future__ import annotations

import numpy as np
import torch


def edge_distances(sheet) -> np.ndarray:
    """Length of every edge the sheet's attention uses: (N, N) dense or (N, K) sparse (current wiring)."""
    geometry = sheet.geometry
    if sheet.edge_index is None:
        return sheet.connectivity.dist.double().numpy()
    from ..connectivity import edge_lengths

    return edge_lengths(geometry, sheet.edge_index.cpu().numpy(), dtype=np.float64)


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
    for i, batch in enumerate(loader):  # the model's input first: (images, labels), (tokens, target, ...)
        if max_batches is not None and i >= max_batches:
            break
        images = batch[0]
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


# ---------------------------------------------------------------------- edge-level metrics
# All functions below take the mean attention of :func:`mean_attention` (or of
# :func:`columnformer.analysis.stream.collect`): ``(T, N, E)`` with E = N (dense) or K (sparse),
# rows summing to 1 over the real edges, plus the matching edge distances / mask / sources.


def edge_sources(sheet) -> np.ndarray:
    """Source column of every edge: (N, N) (``src[i, j] = j``) when dense, the (N, K) edge index when sparse."""
    if sheet.edge_index is None:
        return np.broadcast_to(np.arange(sheet.n)[None, :], (sheet.n, sheet.n))
    return sheet.edge_index.cpu().numpy()


def _as_numpy(a) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)


def _masked(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return a if mask is None else np.where(mask, a, 0.0)


def wiring_length(mean_attn, dist: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean wiring length per step: mean over query columns of ``sum_k A[q, k] * d(q, k)``.

    With rows of A summing to 1 this is the average distance a unit of attention travels
    (geometry units, un-normalised). Returns (T,).
    """
    a = _masked(_as_numpy(mean_attn), mask)
    return (a * dist[None]).sum(-1).mean(-1)


def column_wiring_length(mean_attn, dist: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per query column ``sum_k A[q, k] * d(q, k)``: (T, N)."""
    a = _masked(_as_numpy(mean_attn), mask)
    return (a * dist[None]).sum(-1)


def locality_index(mean_attn, dist: np.ndarray, radius: float = 1.5, mask: np.ndarray | None = None) -> np.ndarray:
    """Fraction of attention mass on edges no longer than ``radius`` (self-edges count as local), per step: (T,).

    A connectivity that attends only to neighbours within ``radius`` has locality 1.
    """
    a = _masked(_as_numpy(mean_attn), mask)
    near = (dist <= radius + 1e-9)[None]
    total = a.sum(axis=(-1, -2))
    return (a * near).sum(axis=(-1, -2)) / np.maximum(total, 1e-300)


def layer_flow(mean_attn, layer: np.ndarray, sources: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Attention mass between layers of a stacked sheet, per step.

    A query column in layer Lq reading a key column in layer Lk is **feed-forward** when Lk < Lq
    (information moves up), **lateral** when Lk == Lq and **feedback** when Lk > Lq.

    Returns ``matrix`` (T, L, L) with ``matrix[t, Lq, Lk]`` the share of all attention mass of
    step t (so each step's matrix sums to 1), ``row_normalised`` (T, L, L) where each query layer's
    row sums to 1, and ``feedforward``/``lateral``/``feedback`` (T,) shares.
    """
    a = _masked(_as_numpy(mean_attn), mask)
    layer = np.asarray(layer, dtype=np.int64)
    num_layers = int(layer.max()) + 1
    lq = np.broadcast_to(layer[:, None], sources.shape)
    lk = layer[np.asarray(sources)]
    cell = (lq * num_layers + lk).ravel()
    T = a.shape[0]
    matrix = np.zeros((T, num_layers, num_layers))
    for t in range(T):
        matrix[t] = np.bincount(cell, weights=a[t].ravel(), minlength=num_layers**2).reshape(num_layers, num_layers)
    total = matrix.sum(axis=(1, 2), keepdims=True)
    matrix = matrix / np.maximum(total, 1e-300)
    rows = matrix.sum(-1, keepdims=True)
    row_norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    iq, ik = np.meshgrid(np.arange(num_layers), np.arange(num_layers), indexing="ij")
    return {
        "matrix": matrix,
        "row_normalised": row_norm,
        "feedforward": (matrix * (ik < iq)).sum(axis=(1, 2)),
        "lateral": (matrix * (ik == iq)).sum(axis=(1, 2)),
        "feedback": (matrix * (ik > iq)).sum(axis=(1, 2)),
    }


def top_incoming(mean_attn, sources: np.ndarray, m: int = 16, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` strongest incoming edges of every column at every step.

    Returns ``(src, weight)``, each (T, N, m'), m' = min(m, E), sorted by weight (descending);
    missing entries (fewer than m real edges) have src = -1 and weight = 0. Works chunk-wise
    over columns so a (T, N, N) dense map is never copied.
    """
    a = mean_attn.detach().cpu().float() if isinstance(mean_attn, torch.Tensor) else torch.as_tensor(mean_attn).float()
    T, N, E = a.shape
    m = min(m, E)
    src_t = torch.as_tensor(np.ascontiguousarray(sources), dtype=torch.long)
    mask_t = None if mask is None else torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.bool)
    out_src = np.empty((T, N, m), dtype=np.int64)
    out_w = np.empty((T, N, m), dtype=np.float32)
    rows = max(1, (1 << 22) // max(E, 1))
    for t in range(T):
        for r0 in range(0, N, rows):
            block = a[t, r0 : r0 + rows]
            if mask_t is not None:
                block = block.masked_fill(~mask_t[r0 : r0 + rows], float("-inf"))
            w, slot = block.topk(m, dim=-1)
            s = torch.gather(src_t[r0 : r0 + rows], 1, slot)
            bad = ~torch.isfinite(w)
            out_src[t, r0 : r0 + rows] = s.masked_fill(bad, -1).numpy()
            out_w[t, r0 : r0 + rows] = w.masked_fill(bad, 0.0).numpy()
    return out_src, out_w
