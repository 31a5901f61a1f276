"""Topography: what each column responds to, and whether that varies smoothly over the sheet.

* :class:`ResponseStats` streams per-class sums of a scalar response per column (never storing
  per-sample features): count, sum and sum of squares per (class, column).
* :func:`dprime` — selectivity of each column for each class,
  ``d' = (mu_class - mu_rest) / sqrt((var_class + var_rest) / 2)``.
* :func:`sample_pairs` — all pairs of columns, or a seeded sample when there are too many
  (optionally only pairs inside the same layer); the sample size is recorded by callers.
* :func:`similarity_vs_distance` / :func:`smoothness` — correlation of the columns' tuning
  profiles as a function of cortical distance, and a smoothness index (mean similarity of near
  pairs minus far pairs) compared with a control that shuffles the columns' positions.
* :func:`weight_similarity` — cosine similarity of untied columns' (centred) flattened weights
  for sampled pairs.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..layers import per_column_parameters


def feature_response(features: torch.Tensor, kind: str = "norm") -> torch.Tensor:
    """Reduce column features (B, N, C) to one scalar response per column (B, N).

    ``norm``: L2 norm of the column's state; ``mean``: mean over channels.
    """
    if kind == "norm":
        return features.float().norm(dim=-1)
    if kind == "mean":
        return features.float().mean(dim=-1)
    raise ValueError(f"response must be 'norm' or 'mean', got {kind!r}")


class ResponseStats:
    """Streaming per-class count / sum / sum-of-squares of a (B, N) response."""

    def __init__(self, num_classes: int, n: int):
        self.count = np.zeros(num_classes, dtype=np.float64)
        self.sum = np.zeros((num_classes, n), dtype=np.float64)
        self.sumsq = np.zeros((num_classes, n), dtype=np.float64)

    def add(self, response: torch.Tensor, labels: torch.Tensor) -> None:
        r = response.detach().cpu().double()
        y = labels.detach().cpu().long()
        k = self.count.shape[0]
        self.count += np.bincount(y.numpy(), minlength=k)[:k]
        self.sum += torch.zeros(k, r.shape[1], dtype=torch.float64).index_add_(0, y, r).numpy()
        self.sumsq += torch.zeros(k, r.shape[1], dtype=torch.float64).index_add_(0, y, r * r).numpy()

    @classmethod
    def from_arrays(cls, responses: np.ndarray, labels: np.ndarray, num_classes: int) -> "ResponseStats":
        s = cls(num_classes, responses.shape[1])
        s.add(torch.as_tensor(responses), torch.as_tensor(labels))
        return s

    @property
    def class_means(self) -> np.ndarray:
        """(K, N) mean response per class (NaN for classes never seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum / self.count[:, None]

    def dprime(self) -> np.ndarray:
        return dprime_from_stats(self.count, self.sum, self.sumsq)


def dprime_from_stats(count: np.ndarray, s: np.ndarray, ss: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """d' (K, N) of each column for each class against all other classes, from per-class sums.

    Variances are population variances of each group; classes with no samples (or no rest) give NaN.
    """
    count = np.asarray(count, dtype=np.float64)[:, None]
    tot_n, tot_s, tot_ss = count.sum(0), s.sum(0), ss.sum(0)
    rest_n, rest_s, rest_ss = tot_n - count, tot_s - s, tot_ss - ss
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_c, mu_r = s / count, rest_s / rest_n
        var_c = np.maximum(ss / count - mu_c**2, 0.0)
        var_r = np.maximum(rest_ss / rest_n - mu_r**2, 0.0)
        d = (mu_c - mu_r) / np.sqrt((var_c + var_r) / 2 + eps)
    d[(count[:, 0] == 0) | (rest_n[:, 0] == 0)] = np.nan
    return d


def dprime(responses: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """d' (K, N) from responses (B, N) and labels (B,) held in memory (small cases, tests)."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    return ResponseStats.from_arrays(np.asarray(responses, dtype=np.float64), labels, k).dprime()


# ---------------------------------------------------------------------- pairs
def sample_pairs(
    n: int, max_pairs: int = 20_000, seed: int = 0, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pairs (i, j), i != j, of columns: all unordered pairs when there are at most ``max_pairs``,
    else ``max_pairs`` pairs drawn uniformly (seeded, with replacement over pairs).

    ``groups`` (N,) restricts pairs to columns with the same label (e.g. the same layer).
    Returns ``(i, j, info)`` with ``info = {"pairs", "exhaustive", "seed", "total_pairs"}``.
    """
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    per_group = sizes * (sizes - 1) / 2
    total = float(per_group.sum())
    if total == 0:
        return np.zeros(0, int), np.zeros(0, int), {"pairs": 0, "exhaustive": True, "seed": seed, "total_pairs": 0}
    if total <= max_pairs:
        ii, jj = [], []
        for m in members:
            if len(m) < 2:
                continue
            a, b = np.triu_indices(len(m), k=1)
            ii.append(m[a])
            jj.append(m[b])
        i, j = np.concatenate(ii), np.concatenate(jj)
        return i, j, {"pairs": int(len(i)), "exhaustive": True, "seed": seed, "total_pairs": int(total)}
    rng = np.random.default_rng(seed)
    which = rng.choice(len(members), size=max_pairs, p=per_group / total)
    i = np.empty(max_pairs, dtype=np.int64)
    j = np.empty(max_pairs, dtype=np.int64)
    for g in np.unique(which):
        sel = np.flatnonzero(which == g)
        m = members[g]
        a = rng.integers(0, len(m), len(sel))
        b = rng.integers(0, len(m) - 1, len(sel))
        b = b + (b >= a)  # distinct from a, uniform over the others
        i[sel], j[sel] = m[a], m[b]
    return i, j, {"pairs": int(max_pairs), "exhaustive": False, "seed": seed, "total_pairs": int(total)}


def profile_correlation(profiles: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Pearson correlation between the rows ``profiles[i]`` and ``profiles[j]`` (profiles: (N, P)).

    Rows with zero variance give correlation 0.
    """
    p = np.nan_to_num(np.asarray(profiles, dtype=np.float64))
    p = p - p.mean(1, keepdims=True)
    norm = np.linalg.norm(p, axis=1)
    p = np.divide(p, norm[:, None], out=np.zeros_like(p), where=norm[:, None] > 1e-12)
    out = np.empty(len(i))
    for s in range(0, len(i), chunk):
        out[s : s + chunk] = (p[i[s : s + chunk]] * p[j[s : s + chunk]]).sum(1)
    return out


def binned(dist: np.ndarray, values: np.ndarray, bins: int | np.ndarray = 12) -> dict:
    """Mean of ``values`` in distance bins: ``{"bin_centers", "mean", "count"}``."""
    edges = np.linspace(0.0, float(dist.max()) + 1e-9, bins + 1) if np.isscalar(bins) else np.asarray(bins)
    which = np.clip(np.digitize(dist, edges) - 1, 0, len(edges) - 2)
    count = np.bincount(which, minlength=len(edges) - 1)
    s = np.bincount(which, weights=values, minlength=len(edges) - 1)
    mean = np.divide(s, count, out=np.full(len(s), np.nan), where=count > 0)
    return {"bin_centers": 0.5 * (edges[:-1] + edges[1:]), "mean": mean, "count": count}


def smoothness_index(dist: np.ndarray, sim: np.ndarray, near: float, far: float) -> float:
    """Mean similarity of pairs within ``near`` minus that of pairs beyond ``far`` (NaN if a side is empty)."""
    n_mask, f_mask = dist <= near + 1e-9, dist > far
    if not n_mask.any() or not f_mask.any():
        return float("nan")
    return float(sim[n_mask].mean() - sim[f_mask].mean())


def _slope(dist: np.ndarray, sim: np.ndarray) -> float:
    if len(dist) < 2 or np.ptp(dist) == 0:
        return float("nan")
    return float(np.polyfit(dist, sim, 1)[0])


def similarity_vs_distance(
    sim_fn,
    geometry,
    max_pairs: int = 20_000,
    seed: int = 0,
    near: float = 1.5,
    within_layer: bool = True,
    n_shuffles: int = 20,
    bins: int = 12,
) -> dict:
    """Similarity of column pairs vs their distance, with a shuffled-position control.

    ``sim_fn(i, j) -> (P,)`` gives the similarity of pairs. The distances come from ``geometry``;
    the control recomputes the smoothness index after randomly permuting which column sits where
    (within each layer when ``within_layer``), ``n_shuffles`` times (seeded).
    """
    groups = geometry.layer if within_layer else None
    i, j, info = sample_pairs(geometry.n, max_pairs, seed, groups)
    if len(i) == 0:
        return {"pairs": info, "smoothness": float("nan"), "note": "fewer than two columns per layer"}
    sim = np.asarray(sim_fn(i, j), dtype=np.float64)
    d = geometry.pair_distances(i, j, along_sheet=True)
    far = float(np.median(d))
    index = smoothness_index(d, sim, near, far)
    rng = np.random.default_rng(seed + 7919)
    layer = geometry.layer if within_layer else np.zeros(geometry.n, dtype=np.int64)
    shuffled, shuffled_curves = [], []
    profile = binned(d, sim, bins)
    edges = np.linspace(0.0, float(d.max()) + 1e-9, bins + 1)  # the profile's bins, reused for the null curves
    for _ in range(n_shuffles):
        perm = np.arange(geometry.n)
        for g in np.unique(layer):
            idx = np.flatnonzero(layer == g)
            perm[idx] = rng.permutation(idx)
        ds = geometry.pair_distances(perm[i], perm[j], along_sheet=True)  # same similarities, shuffled positions
        shuffled.append(smoothness_index(ds, sim, near, far))
        shuffled_curves.append(binned(ds, sim, edges)["mean"])
    shuffled = np.array(shuffled, dtype=np.float64)
    ok = shuffled[np.isfinite(shuffled)]
    sd = float(ok.std()) if len(ok) > 1 else float("nan")
    return {
        "pairs": info,
        "within_layer": within_layer,
        "near_radius": near,
        "far_distance": far,
        "smoothness": index,
        "slope": _slope(d, sim),
        "mean_similarity": float(sim.mean()),
        "shuffled_mean": float(ok.mean()) if len(ok) else float("nan"),
        "shuffled_std": sd,
        "shuffled_z": float((index - ok.mean()) / sd) if len(ok) > 1 and sd > 0 else float("nan"),
        "shuffled_p": float((1 + (ok >= index).sum()) / (1 + len(ok))) if len(ok) else float("nan"),
        "n_shuffles": n_shuffles,
        "profile": profile,
        # the null as a curve: similarity vs distance after shuffling positions (mean and 2.5 / 97.5 % per bin)
        "shuffled_profile": _null_curve(shuffled_curves),
    }


def _null_curve(curves: list[np.ndarray]) -> dict:
    if not curves:
        return {"mean": [], "lo": [], "hi": []}
    c = np.array(curves, dtype=np.float64)
    with warnings.catch_warnings():  # bins empty in every shuffle stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"mean": np.nanmean(c, 0), "lo": np.nanpercentile(c, 2.5, 0), "hi": np.nanpercentile(c, 97.5, 0)}


def smoothness(profiles: np.ndarray, geometry, **kw) -> dict:
    """Tuning smoothness: correlation of the columns' response profiles (N, P) vs distance (see above)."""
    return similarity_vs_distance(lambda i, j: profile_correlation(profiles, i, j), geometry, **kw)


# ---------------------------------------------------------------------- weights
def untied_parameters(sheet) -> list[torch.Tensor]:
    """Every per-column parameter (N, ...) of the sheet's blocks' untied linears and layer norms, weights and
    biases (attention biases, per edge and set by the geometry at init, are not among them). Empty for tied sheets."""
    return [p.detach() for block in sheet.blocks for p in per_column_parameters(block)]


def weight_similarity_fn(sheet, chunk: int = 8192):
    """``sim(i, j)``: cosine similarity of columns' flattened per-column weights, each parameter centred
    over columns (so a component shared by all columns does not count). None for tied sheets."""
    params = untied_parameters(sheet)
    if not params:
        return None
    flat = [p.reshape(p.shape[0], -1).double() for p in params]
    means = [f.mean(0, keepdim=True) for f in flat]
    sq = sum(((f - m) ** 2).sum(1) for f, m in zip(flat, means))
    norm = sq.sqrt().numpy()

    def sim(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        out = np.empty(len(i))
        for s in range(0, len(i), chunk):
            ii = torch.as_tensor(i[s : s + chunk])
            jj = torch.as_tensor(j[s : s + chunk])
            dot = sum(((f[ii] - m) * (f[jj] - m)).sum(1) for f, m in zip(flat, means)).numpy()
            den = norm[i[s : s + chunk]] * norm[j[s : s + chunk]]
            out[s : s + chunk] = np.divide(dot, den, out=np.zeros_like(dot), where=den > 1e-300)
        return out

    return sim


def weight_similarity(sheet, **kw) -> dict | None:
    fn = weight_similarity_fn(sheet)
    if fn is None:
        return None
    return similarity_vs_distance(fn, sheet.geometry, **kw)
