"""Category selectivity t-maps and contiguous selective patches on any sheet geometry.

t-map: for every class c and column, Welch's t of the column's response to class c against all other classes,
from the streamed per-class sums (``ResponseStats``: no per-sample arrays are kept). Patches (TDANN's category
patches, on any geometry): the t-map is smoothed with a Gaussian of ``sigma`` (in geometry units, over columns of
the same layer within 3 sigma; 0: no smoothing), thresholded at ``threshold``, and the supra-threshold columns are
joined into patches when they are neighbours — same layer and closer than ``link`` x the sheet's nearest-neighbour
spacing; patches of fewer than ``min_size`` columns are dropped. Each patch reports its size (columns), centroid
(coordinates) and peak t. Works on grids, stacks of grids (per layer), spheres (great-circle distances) and free
coordinates alike.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..geometry import nearest_neighbour_spacing


def welch_t_from_stats(count: np.ndarray, s: np.ndarray, ss: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Welch t (K, N) of each column for each class against all other classes, from per-class count / sum / sum of
    squares (unbiased variances); NaN where a group has fewer than 2 samples."""
    count = np.asarray(count, dtype=np.float64)[:, None]
    rest_n, rest_s, rest_ss = count.sum(0) - count, s.sum(0) - s, ss.sum(0) - ss
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_c, mu_r = s / count, rest_s / rest_n
        var_c = np.maximum(ss - count * mu_c**2, 0.0) / (count - 1)
        var_r = np.maximum(rest_ss - rest_n * mu_r**2, 0.0) / (rest_n - 1)
        t = (mu_c - mu_r) / np.sqrt(var_c / count + var_r / rest_n + eps)
    t[(count[:, 0] < 2) | (rest_n[:, 0] < 2)] = np.nan
    return t


def _positions(geometry) -> np.ndarray:
    """Coordinates in which euclidean distance ranks pairs as the geometry's metric does (a sphere's chords)."""
    return np.asarray(geometry.coords, dtype=np.float64)


def spacing(geometry) -> float:
    """Median nearest-neighbour distance of the columns (within layers)."""
    return nearest_neighbour_spacing(_positions(geometry), geometry.layer)


def smooth_map(values: np.ndarray, geometry, sigma: float) -> np.ndarray:
    """Gaussian-weighted mean of ``values`` (N,) over the columns of each column's layer within 3 sigma."""
    if sigma <= 0:
        return values.astype(np.float64)
    pos, out = _positions(geometry), np.empty(len(values))
    tree = cKDTree(pos)
    for q, nbrs in enumerate(tree.query_ball_point(pos, 3 * sigma)):
        nbrs = np.asarray(nbrs)
        nbrs = nbrs[geometry.layer[nbrs] == geometry.layer[q]]
        d = geometry.pair_distances(np.full(len(nbrs), q), nbrs, along_sheet=True)
        w = np.exp(-(d**2) / (2 * sigma**2)) * np.isfinite(values[nbrs])
        out[q] = np.nansum(w * values[nbrs]) / max(w.sum(), 1e-300)
    return out


def detect_patches(values: np.ndarray, geometry, threshold: float = 3.0, sigma: float = 1.0, link: float = 1.5,
                   min_size: int = 3) -> dict:
    """Contiguous patches of columns whose smoothed ``values`` exceed ``threshold`` (see the module docstring)."""
    sm = smooth_map(np.asarray(values, dtype=np.float64), geometry, sigma)
    above = np.flatnonzero(np.nan_to_num(sm, nan=-np.inf) > threshold)
    patches = []
    if len(above):
        pos = _positions(geometry)[above]
        pairs = cKDTree(pos).query_pairs(link * spacing(geometry), output_type="ndarray")
        if len(pairs):
            pairs = pairs[geometry.layer[above[pairs[:, 0]]] == geometry.layer[above[pairs[:, 1]]]]
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(above), len(above)))
        _, labels = connected_components(graph, directed=False)
        for lab in np.unique(labels):
            cols = above[labels == lab]
            if len(cols) >= min_size:
                patches.append({
                    "size": int(len(cols)), "layer": int(geometry.layer[cols[0]]),
                    "centroid": _positions(geometry)[cols].mean(0).tolist(), "peak": float(sm[cols].max()),
                    "columns": cols.tolist(),
                })
    patches.sort(key=lambda p: -p["size"])
    return {"count": len(patches), "sizes": [p["size"] for p in patches], "patches": patches,
            "threshold": threshold, "sigma": sigma, "link": link, "min_size": min_size, "smoothed": sm}


def category_patches(count, s, ss, geometry, class_names=None, **kw) -> tuple[dict, np.ndarray]:
    """t-maps (K, N) of every class and the patches of each; returns (JSON-ready summary, t-maps)."""
    t = welch_t_from_stats(count, s, ss)
    out = {}
    for c in range(t.shape[0]):
        res = detect_patches(t[c], geometry, **kw)
        name = class_names[c] if class_names else str(c)
        out[name] = {k: v for k, v in res.items() if k not in ("smoothed",)}
        for p in out[name]["patches"]:
            if len(p["columns"]) > 64:
                p["columns"] = p["columns"][:64] + ["..."]
    return out, t
