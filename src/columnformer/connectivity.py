"""Connectivity: which columns each column reads.

``Connectivity.dense(geometry)`` lists all pairs; sparse connectivities store, for each of the
N columns, a padded list of K incoming edges:

    index  (N, K) long   source column of each edge (padding points at the column itself)
    mask   (N, K) bool   which entries are real edges (padding is False)
    dist   (N, K) float  length of each edge in the geometry (0 on padding)

Dense connectivity keeps ``index = mask = None`` and ``dist`` as the (N, N) distance matrix.
The attention kernel is chosen from ``is_dense``; parameters (the learned per-edge bias) take
the shape of ``dist``.

Builders (none forms an N x N matrix except ``dense``)::

    Connectivity.dense(g)
    Connectivity.local(g, k)                                   # k nearest, itself first
    Connectivity.local_plus_long_range(g, k, k_long, scale=8.0, seed=0)
    conn.rewire(attn_mean, fraction, seed)                     # drop weakest edges, resample
    rewire_sheet(sheet, attn_mean, fraction, seed)             # the same, in place on a built sheet

**k nearest** uses a KD-tree (``scipy.spatial.cKDTree``) on the coordinates; on the sphere the
chord (Euclidean) distance has the same ordering as the great-circle distance, so the tree works
there too, and the stored ``dist`` is the geometry's own metric. Ties are broken
deterministically: the column itself first, then by distance (rounded to 1e-9), then by index.

**Long-range rule.** A long-range edge j -> i is drawn with probability proportional to
``exp(-d(i, j) / scale)`` over the columns not already connected to i (sampling without
replacement: each further edge is drawn from the rule restricted to the remaining columns).
Sampling is exact rejection sampling in O(N K) memory, never O(N^2), vectorised over columns:

* on a single 2D grid (``grid(h, w)``) the offset (dy, dx) to the source is proposed from a
  discrete Laplace law ``q ~ exp(-(|dy| + |dx|) / (sqrt(2) scale))`` (a difference of two geometric
  variables) and accepted with probability ``exp(-(d - (|dy| + |dx|) / sqrt(2)) / scale) <= 1``;
  proposals off the sheet, onto an existing edge or a duplicate are rejected. Acceptance is
  ~50%, independent of N, so the cost is O(N k_long).
* on any other geometry (stacks, sphere, user coordinates) sources are proposed uniformly over the
  N columns and accepted with probability ``exp(-(d - d0) / scale)``, ``d0`` a lower bound of the
  allowed distances (the k-th local distance). Expected cost per edge ~ N / (2 pi scale (d0 + scale)),
  fine up to ~10^5 columns; beyond that use a grid or a larger scale.

Everything is driven by one ``numpy.random.default_rng(seed)``: a seed reproduces the edges exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .geometry import GREAT_CIRCLE, Geometry

DEFAULT_LONG_RANGE_SCALE = 8.0
_KNN_ROWS = 1 << 16  # rows per KD-tree query chunk
_TIE_DECIMALS = 9


class ConnectivityError(ValueError):
    """Impossible connectivity request (k < 1, bad fraction, mismatched shapes)."""


@dataclass(eq=False)
class Connectivity:
    """Incoming edges of every column. See the module docstring for the layout."""

    geometry: Geometry
    dist: torch.Tensor  # (N, N) dense, or (N, K)
    index: torch.Tensor | None = None  # (N, K) long, None when dense
    mask: torch.Tensor | None = None  # (N, K) bool, None when dense
    kind: str = "dense"
    scale: float | None = None  # length scale of the long-range rule (used again by rewire)

    @property
    def n(self) -> int:
        return self.geometry.n

    @property
    def is_dense(self) -> bool:
        return self.index is None

    @property
    def k(self) -> int:
        """Edges per column (N for dense)."""
        return self.n if self.is_dense else self.index.shape[1]

    # ------------------------------------------------------------------ builders
    @classmethod
    def dense(cls, geometry: Geometry) -> "Connectivity":
        """All pairs: every column reads every column (itself included)."""
        return cls(geometry=geometry, dist=geometry.distances())

    @classmethod
    def local(cls, geometry: Geometry, k: int) -> "Connectivity":
        """Each column reads its ``k`` nearest columns, itself first (k is capped at N).

        Built with a KD-tree in chunks of rows: memory O(N k), buildable for N = 10^6.
        """
        if k < 1:
            raise ConnectivityError(f"local connectivity needs k >= 1 (edges per column), got k={k}")
        index = knn_index(geometry, k)
        return cls._from_index(geometry, index, np.ones(index.shape, dtype=bool), kind="local")

    @classmethod
    def local_plus_long_range(
        cls,
        geometry: Geometry,
        k: int,
        k_long: int,
        scale: float = DEFAULT_LONG_RANGE_SCALE,
        seed: int = 0,
    ) -> "Connectivity":
        """``k`` nearest columns plus ``k_long`` long-range edges drawn from ``p(j) ~ exp(-d/scale)``.

        Long-range sources exclude the local neighbours and each other. K = min(k, N) + k_long;
        when a column has fewer than ``k_long`` columns left to read (tiny sheets), the rest of its
        row is padding (mask False, index = itself, dist 0).
        """
        if k < 1 or k_long < 0:
            raise ConnectivityError(f"need k >= 1 and k_long >= 0, got k={k}, k_long={k_long}")
        if not scale > 0:
            raise ConnectivityError(f"long-range scale must be > 0, got {scale}")
        n = geometry.n
        local = knn_index(geometry, k)
        kl = local.shape[1]
        rows = np.arange(n, dtype=np.int64)
        d0 = geometry.pair_distances(rows, local[:, -1])  # every non-local column is at least this far
        rng = np.random.default_rng(seed)
        need = np.full(n, k_long, dtype=np.int64)
        extra = sample_rule_edges(geometry, rows, need, local, d0, scale, rng)  # (N, k_long), -1 unfilled
        mask = np.concatenate([np.ones((n, kl), dtype=bool), extra >= 0], axis=1)
        index = np.concatenate([local, np.where(extra >= 0, extra, rows[:, None])], axis=1)
        return cls._from_index(geometry, index, mask, kind="local_long_range", scale=float(scale))

    @classmethod
    def from_index(
        cls, geometry: Geometry, index, mask=None, kind: str = "sparse", scale: float | None = None
    ) -> "Connectivity":
        """A sparse connectivity from explicit (N, K) sources (and optional validity mask)."""
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        if index.ndim != 2 or index.shape[0] != geometry.n:
            raise ConnectivityError(f"index must be (N={geometry.n}, K), got {index.shape}")
        if index.size and (index.min() < 0 or index.max() >= geometry.n):
            raise ConnectivityError(f"index entries must lie in [0, {geometry.n})")
        mask = np.ones(index.shape, bool) if mask is None else np.asarray(
            mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool
        )
        if mask.shape != index.shape:
            raise ConnectivityError(f"mask shape {mask.shape} differs from index shape {index.shape}")
        if not mask.any(axis=1).all():
            raise ConnectivityError("every column needs at least one valid incoming edge")
        return cls._from_index(geometry, index, mask, kind=kind, scale=scale)

    @classmethod
    def _from_index(cls, geometry, index: np.ndarray, mask: np.ndarray, kind: str, scale=None) -> "Connectivity":
        rows = np.arange(geometry.n, dtype=np.int64)[:, None]
        index = np.where(mask, index, rows)  # padding points at the column itself
        dist = edge_lengths(geometry, index)
        dist[~mask] = 0.0
        return cls(
            geometry=geometry,
            dist=torch.from_numpy(dist),
            index=torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)),
            mask=torch.from_numpy(np.ascontiguousarray(mask)),
            kind=kind,
            scale=scale,
        )

    # ------------------------------------------------------------------ rewiring
    def rewire(
        self,
        attn_mean: torch.Tensor | np.ndarray,
        fraction: float,
        seed: int = 0,
        scale: float | None = None,
    ) -> "Connectivity":
        """Drop the weakest edges of every column and draw replacements from the long-range rule.

        Args:
            attn_mean: (N, K) mean attention weight of each edge (leading dims, e.g. (B, H, N, K)
                or (T, B, H, N, K), are averaged over).
            fraction: share of each column's droppable edges (valid, not the self-edge) to replace;
                per column ``round(fraction * n_droppable)`` edges with the lowest mean attention
                (ties: lower edge slot first).
            seed: seeds the replacement sampling.
            scale: length scale of the rule ``p ~ exp(-d/scale)``; default ``self.scale`` or 8.

        K, the mask and the self-edge are unchanged; replacements avoid every current source of
        the column (kept or dropped). If a column cannot find enough new sources, the rest of its
        dropped edges are kept. Returns a new Connectivity.
        """
        if self.is_dense:
            raise ConnectivityError("rewire() needs a sparse connectivity (local / local_long_range)")
        if not 0.0 <= fraction <= 1.0:
            raise ConnectivityError(f"rewire fraction must be in [0, 1], got {fraction}")
        scale = float(scale or self.scale or DEFAULT_LONG_RANGE_SCALE)
        attn = _as_edge_matrix(attn_mean, self.index.shape)
        index = self.index.cpu().numpy().copy()
        mask = self.mask.cpu().numpy()
        n, K = index.shape
        rows = np.arange(n, dtype=np.int64)
        droppable = mask & (index != rows[:, None])
        n_drop = np.floor(fraction * droppable.sum(1) + 0.5).astype(np.int64)
        key = np.where(droppable, attn, np.inf)
        order = np.argsort(key, axis=1, kind="stable")  # weakest droppable edges first
        todo = np.flatnonzero(n_drop > 0)
        if len(todo) == 0:
            return self._replace(index, mask, scale)
        rng = np.random.default_rng(seed)
        new = sample_rule_edges(
            self.geometry, todo, n_drop[todo], index[todo], np.zeros(len(todo)), scale, rng
        )  # (R, max_drop), -1 unfilled
        slots = order[todo, : new.shape[1]]  # (R, max_drop) edge slots to replace, weakest first
        ok = new >= 0
        r = np.repeat(todo[:, None], new.shape[1], axis=1)
        index[r[ok], slots[ok]] = new[ok]
        return self._replace(index, mask, scale)

    def _replace(self, index: np.ndarray, mask: np.ndarray, scale: float) -> "Connectivity":
        return Connectivity._from_index(self.geometry, index, mask.copy(), kind=self.kind, scale=scale)

    def num_edges(self) -> int:
        return self.n * self.n if self.is_dense else int(self.mask.sum())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "k": self.k, "edges": self.num_edges(), "scale": self.scale}


# ---------------------------------------------------------------------- helpers
def _as_edge_matrix(attn_mean, shape: tuple[int, int]) -> np.ndarray:
    a = attn_mean.detach().float().cpu() if isinstance(attn_mean, torch.Tensor) else torch.as_tensor(attn_mean)
    a = a.double()
    while a.dim() > 2:
        a = a.mean(0)
    if tuple(a.shape) != tuple(shape):
        raise ConnectivityError(f"attn_mean must be (N, K) = {tuple(shape)} (or have them as last dims), got {tuple(a.shape)}")
    return a.numpy()


def edge_lengths(
    geometry: Geometry, index: np.ndarray, rows_per_chunk: int = 1 << 15, dtype=np.float32
) -> np.ndarray:
    """(N, K) distances from each column to its sources ``index``, computed in chunks of rows."""
    n = index.shape[0]
    out = np.empty(index.shape, dtype=dtype)
    for s in range(0, n, rows_per_chunk):
        e = min(n, s + rows_per_chunk)
        out[s:e] = geometry.pair_distances(np.arange(s, e)[:, None], index[s:e])
    return out


def knn_index(geometry: Geometry, k: int) -> np.ndarray:
    """(N, min(k, N)) int64: the k nearest columns of every column, itself first.

    Ties: by distance rounded to 1e-9, then by column index. KD-tree queries in chunks of rows,
    with a margin of extra neighbours; rows whose k-th distance is tied with the last retrieved one
    are redone exactly with a ball query, so the result equals the brute-force sort.
    """
    from scipy.spatial import cKDTree

    n = geometry.n
    k = min(int(k), n)
    coords = geometry.coords  # chord distances on the sphere: same ordering as great-circle
    tree = cKDTree(coords)
    m = min(n, k + max(8, k // 4))
    out = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, _KNN_ROWS):
        e = min(n, s + _KNN_ROWS)
        rows = np.arange(s, e)
        d, j = tree.query(coords[s:e], k=m, workers=-1)
        d = np.asarray(d).reshape(e - s, m)
        j = np.asarray(j, dtype=np.int64).reshape(e - s, m)
        key = np.round(d, _TIE_DECIMALS)
        key[j == rows[:, None]] = -1.0  # itself first, even among coincident columns
        order = np.lexsort((j, key), axis=-1)
        key_sorted = np.take_along_axis(key, order, 1)
        out[s:e] = np.take_along_axis(j, order[:, :k], 1)
        if m < n:  # a tie at the k-th distance may continue past the retrieved margin
            redo = np.flatnonzero(key_sorted[:, k - 1] >= key_sorted[:, m - 1])
            for r in redo:
                row = s + r
                radius = float(key_sorted[r, k - 1]) + 10.0 ** -_TIE_DECIMALS
                cand = np.asarray(tree.query_ball_point(coords[row], radius), dtype=np.int64)
                cd = np.round(np.sqrt(((coords[cand] - coords[row]) ** 2).sum(-1)), _TIE_DECIMALS)
                cd[cand == row] = -1.0
                out[row] = cand[np.lexsort((cand, cd))[:k]]
    return out


def _grid_window(geometry: Geometry) -> tuple[int, int] | None:
    """(h, w) if the geometry is one plain row-major unit grid (window proposals apply)."""
    shapes = geometry.layer_shapes
    if geometry.metric == GREAT_CIRCLE or shapes is None or len(shapes) != 1 or not geometry.name.startswith("grid"):
        return None
    return shapes[0]


def sample_rule_edges(
    geometry: Geometry,
    rows: np.ndarray,
    need: np.ndarray,
    exclude: np.ndarray,
    d0: np.ndarray,
    scale: float,
    rng: np.random.Generator,
    rows_per_chunk: int = 4096,
    max_proposals: int = 1 << 22,
) -> np.ndarray:
    """Draw ``need[r]`` new sources for each column ``rows[r]``, ``p(j) ~ exp(-d/scale)``.

    ``exclude`` (R, E) lists sources each column must not get (current edges); ``d0`` (R,) is a lower
    bound of the distance of any allowed source (0 is always valid). Sampling without replacement by
    exact rejection (see the module docstring). Returns (R, max(need)) int64, -1 where a column ran
    out of allowed sources.
    """
    rows = np.asarray(rows, dtype=np.int64)
    need = np.asarray(need, dtype=np.int64)
    R = len(rows)
    width = int(need.max()) if R else 0
    out = np.full((R, width), -1, dtype=np.int64)
    if width == 0:
        return out
    n = geometry.n
    window = _grid_window(geometry)
    for s in range(0, R, rows_per_chunk):
        e = min(R, s + rows_per_chunk)
        out[s:e] = _sample_chunk(
            geometry, rows[s:e], need[s:e], exclude[s:e], np.asarray(d0, dtype=np.float64)[s:e],
            scale, rng, width, window, max_proposals, n,
        )
    return out


def _sample_chunk(geometry, rows, need, exclude, d0, scale, rng, width, window, max_proposals, n):
    R = len(rows)
    out = np.full((R, width), -1, dtype=np.int64)
    local = np.arange(R, dtype=np.int64)
    excl_keys = (local[:, None] * n + exclude)[exclude >= 0]
    taken = np.sort(np.concatenate([excl_keys, local * n + rows]))  # never itself
    taken = taken[np.r_[True, taken[1:] != taken[:-1]]]
    # a column cannot get more sources than there are columns it does not read yet
    n_excl = np.bincount(taken // n, minlength=R)
    need = np.minimum(need, n - n_excl)
    filled = np.zeros(R, dtype=np.int64)
    if window is not None:
        h, w = window
        yx = geometry.coords[rows].astype(np.int64)  # unit grid: coords are (row, col)
        # offsets dy, dx iid discrete Laplace, q ~ exp(-(|dy|+|dx|) / (sqrt2 * scale)): a difference of
        # two geometric variables. Since |dy|+|dx| <= sqrt2 * d, exp(-d/scale) / q <= 1 (up to constants).
        p_geo = 1.0 - math.exp(-1.0 / (math.sqrt(2.0) * scale))
        acc = 0.3
    else:
        # uniform proposals; expected acceptance for ~1 column per unit area (only sets the batch size)
        acc = min(1.0, 2 * math.pi * scale * (float(d0.mean()) + scale) / n)
    for _ in range(100_000):
        active = np.flatnonzero(filled < need)
        if len(active) == 0:
            break
        left = need[active] - filled[active]
        M = int(np.clip(math.ceil(1.5 * left.max() / max(acc, 1e-6)), 8, max(8, max_proposals // len(active))))
        if window is not None:
            off = rng.geometric(p_geo, size=(2, len(active), M, 2))
            off = off[0] - off[1]  # (A, M, 2)
            y = yx[active, None, 0] + off[..., 0]
            x = yx[active, None, 1] + off[..., 1]
            inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            src = np.where(inside, y * w + x, 0)
            shift = np.abs(off).sum(-1) / math.sqrt(2.0)  # log-ratio bound of the proposal
        else:
            src = rng.integers(0, n, size=(len(active), M))
            inside = np.ones(src.shape, dtype=bool)
            shift = d0[active, None]
        d = geometry.pair_distances(rows[active][:, None], src)
        u = rng.random(src.shape)
        accept = inside & (u < np.exp(-(d - shift) / scale))
        n_acc = int(accept.sum())
        acc = max(n_acc / accept.size, 1e-6)
        if n_acc == 0:
            continue
        a_row, a_col = np.nonzero(accept)  # row-major: proposal order within each column
        r_local = active[a_row]
        keys = r_local * n + src[a_row, a_col]
        pos = np.searchsorted(taken, keys)
        fresh = taken[np.minimum(pos, len(taken) - 1)] != keys
        keys, r_local = keys[fresh], r_local[fresh]
        if len(keys) == 0:
            continue
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        first = np.sort(order[np.r_[True, ks[1:] != ks[:-1]]])  # first proposal of each duplicate
        keys, r_local = keys[first], r_local[first]
        # rank of each accepted source within its column
        starts = np.flatnonzero(np.r_[True, r_local[1:] != r_local[:-1]])
        counts = np.diff(np.r_[starts, len(r_local)])
        rank = np.arange(len(r_local)) - np.repeat(starts, counts)
        keep = rank < (need[r_local] - filled[r_local])
        keys, r_local, rank = keys[keep], r_local[keep], rank[keep]
        out[r_local, filled[r_local] + rank] = keys % n
        filled += np.bincount(r_local, minlength=R)
        taken = np.sort(np.concatenate([taken, keys]))
    return out


# ---------------------------------------------------------------------- sheets
def rewire_sheet(
    sheet,
    attn_mean: torch.Tensor,
    fraction: float,
    seed: int = 0,
    scale: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Rewire a built sparse :class:`~columnformer.sheet.Columnformer` in place; returns edges replaced.

    Reads the current edges from the sheet's ``edge_index``/``edge_mask`` buffers (so it works after
    loading a checkpoint), calls :meth:`Connectivity.rewire`, then updates ``edge_index``,
    ``edge_mask`` and ``wiring_weight`` (same devices and dtypes), ``sheet.connectivity``, and
    re-initialises every block's attention bias on the replaced edges from their new distance
    (``clamp(-d^2 / 2 sigma^2, min)`` for ``attn_bias='local'``, 0 for ``'zero'``). If ``optimizer``
    is given, its per-parameter state (e.g. AdamW moments) of those bias entries is zeroed.

    ``attn_mean``: (N, K) mean attention per edge, or any tensor with (N, K) as last dims (e.g. the
    stacked ``trace.attn`` of shape (T, B, H, N, K)), averaged over the leading dims.
    """
    if getattr(sheet, "edge_index", None) is None:
        raise ConnectivityError("rewire_sheet() needs a sheet built with a sparse connectivity")
    old = Connectivity.from_index(
        sheet.geometry, sheet.edge_index, sheet.edge_mask, kind=sheet.connectivity.kind,
        scale=sheet.connectivity.scale,
    )
    new = old.rewire(attn_mean, fraction, seed=seed, scale=scale)
    changed = new.index != old.index  # (N, K)
    _install_edges(sheet, new, changed, optimizer)
    return int(changed.sum())


def _install_edges(sheet, new: "Connectivity", changed: torch.Tensor, optimizer=None) -> None:
    """Put ``new``'s edges into the sheet's buffers and ``connectivity``; re-initialise the attention bias of the
    ``changed`` (N, K) edges from their length and zero their optimizer state (if ``optimizer``)."""
    device = sheet.edge_index.device
    changed = changed.to(device)
    with torch.no_grad():
        sheet.edge_index.copy_(new.index.to(device))
        sheet.edge_mask.copy_(new.mask.to(device))
        sheet.wiring_weight.copy_(sheet.wiring_weights(new.dist).to(sheet.wiring_weight))
        init = sheet.bias_init(new.dist)
        for block in sheet.blocks:
            bias = block.attn.bias
            if bias is None:
                continue
            bias[changed] = init.to(bias)[changed]
            if hasattr(optimizer, "zero_moments_"):  # optim.AdamW (bf16 / 8-bit moments; 8-bit ones are stored flat)
                optimizer.zero_moments_(bias, changed)
            elif optimizer is not None:
                for value in optimizer.state.get(bias, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == bias.shape:
                        value[changed] = 0
    sheet.connectivity = new


def reconnect_sheet(sheet, k: int, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Rebuild the local edges of a sparse sheet with learned positions from where its columns are now.

    Slots ``0..k-1`` of every column are its local edges (the layout of ``local`` / ``local_plus_long_range``);
    the sheet's geometry is first synced to its positions (``Columnformer.sync_geometry``). A column keeps the
    local edges that are still among its ``k`` nearest columns, in their slots (their attention bias and optimizer
    state stay); the other local slots take the new nearest columns, with the bias re-initialised from their
    length as ``rewire_sheet`` does (and, given ``optimizer``, zeroed optimizer state). Long-range slots are kept;
    a new local edge never repeats a column's long-range source. Returns the number of edges replaced.
    """
    if getattr(sheet, "edge_index", None) is None or getattr(sheet, "positions", None) is None:
        raise ConnectivityError("reconnect_sheet() needs a sparse sheet with learned positions")
    sheet.sync_geometry()
    geometry = sheet.geometry
    index = sheet.edge_index.cpu().numpy().copy()  # (N, K)
    mask = sheet.edge_mask.cpu().numpy()
    n, K = index.shape
    k = min(k, K, n)
    nearest = knn_index(geometry, min(n, K))  # (N, >= k): candidates nearest first, itself first
    changed = np.zeros(index.shape, dtype=bool)
    for q in range(n):
        want = [c for c in nearest[q] if c not in set(index[q, k:][mask[q, k:]])][:k]
        keep = set(want) & set(index[q, :k])
        fresh = iter(c for c in want if c not in keep)
        for slot in range(k):
            if index[q, slot] not in keep:
                index[q, slot] = next(fresh)
                changed[q, slot] = True
    new = Connectivity.from_index(geometry, index, mask, kind=sheet.connectivity.kind, scale=sheet.connectivity.scale)
    _install_edges(sheet, new, torch.from_numpy(changed), optimizer)
    return int(changed.sum())
