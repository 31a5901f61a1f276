"""Regularisers of a sheet's activity and weights, and the activation-sparsity metrics.

Three penalties, each off by default (weight 0) and each with a schedule (``PenaltyConfig``):

- ``activity_l1``: mean over steps of ``mean |x|`` of the column states x (N, B, C) after each step: pushes
  activations toward zero (the seed's "promote sparsity over the column activations").
- ``response_smoothness`` (TDANN-style, Margalit et al. 2024, "SL_Rel"): for pairs of nearby columns (i, j),
  the response similarity ``r_ij`` is the mean over channels of the Pearson correlation over the batch of
  channel c of column i with channel c of column j (so it rewards neighbouring columns whose channel c means
  the same thing: a shared feature space); the loss is ``1 - corr_pairs(r_ij, 1 / (1 + d_ij))`` over the
  fixed set of pairs within ``radius`` (TDANN's relative spatial loss; 0 when the similarity is an increasing
  affine function of the inverse distance, up to 2 when it is a decreasing one). Averaged over steps.
- ``weight_smoothness`` (TopoLoss-style, Deb et al. 2025): every untied parameter (N, ...) of the sheet is read
  as one vector per column; its spatially smoothed version is the Gaussian-weighted mean of each column's
  ``neighbours`` nearest columns (by the geometry's coordinates, any geometry); the loss is
  ``1 - mean_i cos(P_i, smooth(P)_i)``, averaged over parameters: 0 when neighbouring columns have parallel
  weights (a constant field is perfectly smooth), positive otherwise.

The metrics of ``activation_sparsity`` read magnitudes ``a = |x|`` of the states over units = (column, channel):
fraction near zero (per stimulus, ``a < tol * rms`` of its units), Hoyer sparsity per stimulus, population sparseness per stimulus and
lifetime sparseness per unit (Vinje & Gallant 2000: ``(1 - mean(a)^2 / mean(a^2)) / (1 - 1/n)``); all in [0, 1],
higher is sparser. They are logged during training without any penalty (``train.log_sparsity``: measured on the
last batch of every logged step, mean over steps), so whether sparsity emerges on its own is measurable, and
``analyze`` reports them per step on the whole split.

The definitions are written from the papers; no code of TDANN (spacetorch) or TopoLoss is copied.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree

from .geometry import nearest_neighbour_spacing
from .layers import per_column_parameters

SPARSITY_METRICS = ("near_zero", "hoyer", "population_sparseness", "lifetime_sparseness")
PENALTIES = ("activity_l1", "response_smoothness", "weight_smoothness")


def schedule_factor(step: int, total_steps: int, start: float, ramp: float) -> float:
    """Weight multiplier at optimizer ``step``: 0 before ``start * total``, then linear to 1 over ``ramp * total``."""
    s0, r = start * total_steps, ramp * total_steps
    if step < s0:
        return 0.0
    return 1.0 if r <= 0 else min(1.0, (step - s0) / r)


# ---------------------------------------------------------------------------------------------- sparsity metrics


class SparsityStats:
    """Activation sparsity per step over many stimuli, streamed batch by batch (and summable across processes).

    ``add(states)`` takes one batch's states per step (each (N, B, C)). Near-zero fraction (per stimulus: units with
    ``|x| < tol * rms`` of that stimulus's units), Hoyer and population sparseness are per-stimulus means; lifetime
    sparseness uses every unit's first and second moments over all stimuli added. Every quantity is a sum over
    stimuli, so splitting a batch between processes and summing (``all_reduce``) gives the one-process values.
    """

    def __init__(self, tol: float = 0.1):
        self.tol, self.n, self.sums, self.m1, self.m2 = tol, None, None, None, None

    @torch.no_grad()
    def add(self, states: list[torch.Tensor]) -> None:
        for x in states:
            if x.ndim != 3:
                raise ValueError(f"states must be (N, B, C), got shape {tuple(x.shape)}")
        b = states[0].shape[1]
        u = states[0].shape[0] * states[0].shape[2]
        a = torch.stack([x.detach().double().abs().transpose(0, 1).reshape(b, u) for x in states]).cpu()  # (T, B, U)
        sq = a.pow(2).sum(-1)  # (T, B)
        rms, l1, l2 = (sq / u).sqrt(), a.sum(-1), sq.sqrt()
        near = (a < self.tol * rms.unsqueeze(-1)).double().mean(-1)  # (T, B)
        ok = l2 > 0
        hoyer = torch.where(ok, (math.sqrt(u) - l1 / l2.clamp_min(1e-300)) / max(math.sqrt(u) - 1, 1e-12), torch.zeros_like(l1))
        m1s, m2s = l1 / u, sq / u
        pop = torch.where(m2s > 0, (1 - m1s**2 / m2s.clamp_min(1e-300)) / max(1 - 1 / u, 1e-12), torch.zeros_like(m1s))
        near = torch.where(ok, near, torch.ones_like(near))  # a silent stimulus: every unit is near zero
        sums = torch.stack([near.sum(1), hoyer.sum(1), pop.sum(1)], 1)  # (T, 3)
        m1, m2 = a.sum(1), a.pow(2).sum(1)  # (T, U)
        if self.n is None:
            self.n, self.sums, self.m1, self.m2 = torch.zeros((), dtype=torch.float64), sums, m1, m2
        else:
            self.sums, self.m1, self.m2 = self.sums + sums, self.m1 + m1, self.m2 + m2
        self.n = self.n + b

    def all_reduce(self, reduce_sum) -> None:
        """Sum the statistics over processes with ``reduce_sum(tensor) -> tensor`` (every process must call it)."""
        self.n, self.sums, self.m1, self.m2 = (reduce_sum(t) for t in (self.n, self.sums, self.m1, self.m2))

    def result(self) -> dict[str, list[float]]:
        """Per step: each metric of ``SPARSITY_METRICS`` (lists of length T)."""
        n = float(self.n) if self.n is not None else 0.0
        if not n:
            raise ValueError("no stimuli were added")
        m1, m2 = self.m1 / n, self.m2 / n  # (T, U)
        lifetime = [
            float(((1 - m1[t][ok] ** 2 / m2[t][ok]) / (1 - 1 / n)).mean()) if n > 1 and ok.any() else 0.0
            for t, ok in enumerate(m2 > 0)
        ]
        mean = (self.sums / n).tolist()
        return {
            "near_zero": [r[0] for r in mean], "hoyer": [r[1] for r in mean],
            "population_sparseness": [r[2] for r in mean], "lifetime_sparseness": lifetime,
        }

    def mean(self) -> dict[str, float]:
        """Each metric averaged over steps."""
        return {k: float(np.mean(v)) for k, v in self.result().items()}


def activation_sparsity(states: torch.Tensor, tol: float = 0.1) -> dict[str, float]:
    """Sparsity of one step's states ``(N, B, C)`` (units = N*C, stimuli = B); see the module docstring."""
    stats = SparsityStats(tol)
    stats.add([states])
    return stats.mean()


# ---------------------------------------------------------------------------------------------- penalties


def activity_l1(states: list[torch.Tensor]) -> torch.Tensor:
    """Mean over steps of mean |x| of the states (each (N, B, C))."""
    return torch.stack([s.float().abs().mean() for s in states]).mean()


def response_pairs(coords: np.ndarray, radius: float, max_pairs: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of columns within ``radius`` and their distances; at most ``max_pairs`` (a fixed random subset)."""
    pairs = np.array(sorted(cKDTree(coords).query_pairs(radius)), dtype=np.int64).reshape(-1, 2)
    if len(pairs) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False))
        pairs = pairs[keep]
    if len(pairs) < 3 or len(np.unique(np.round(_dist(coords, pairs), 9))) < 2:
        raise ValueError(
            f"response_smoothness needs pairs of columns at two or more distances within radius {radius}; "
            f"{len(pairs)} pair(s) found: raise train.penalties.radius"
        )
    return pairs, _dist(coords, pairs)


def _dist(coords: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return np.linalg.norm(coords[pairs[:, 0]] - coords[pairs[:, 1]], axis=1)


def response_similarity(states: torch.Tensor, pairs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """r_ij for ``pairs`` (P, 2): mean over channels of the batch correlation of channel c of i and j. states (N, B, C)."""
    x = states.float()
    z = (x - x.mean(1, keepdim=True)) / (x.std(1, unbiased=False, keepdim=True) + eps)  # (N, B, C)
    return (z[pairs[:, 0]] * z[pairs[:, 1]]).mean((1, 2))  # (P,)


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm() + eps)


def response_smoothness(states: list[torch.Tensor], pairs: torch.Tensor, inv_dist: torch.Tensor) -> torch.Tensor:
    """TDANN's relative spatial loss ``1 - corr(r_ij, 1/(1+d_ij))``, mean over steps."""
    return torch.stack([1 - _pearson(response_similarity(s, pairs), inv_dist) for s in states]).mean()


def neighbour_weights(coords: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each column's ``k`` nearest other columns (N, k) and normalised Gaussian weights (sigma: their mean distance)."""
    n = len(coords)
    if not 1 <= k < n:
        raise ValueError(f"weight_smoothness needs 1 <= train.penalties.neighbours < {n} columns, got {k}")
    dist, idx = cKDTree(coords).query(coords, k=k + 1)
    dist, idx = dist[:, 1:], idx[:, 1:]  # drop the column itself
    sigma = max(float(dist.mean()), 1e-12)
    w = np.exp(-(dist**2) / (2 * sigma**2))
    return idx.astype(np.int64), (w / w.sum(1, keepdims=True)).astype(np.float32)


def weight_smoothness(params: list[torch.Tensor], idx: torch.Tensor, w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """TopoLoss-style ``1 - mean_i cos(P_i, sum_j w_ij P_j)`` averaged over ``params`` (each (N, ...))."""
    losses = []
    for p in params:
        flat = p.float().reshape(p.shape[0], -1)  # (N, D)
        smooth = (flat[idx] * w.unsqueeze(-1)).sum(1)  # (N, D): neighbours' weighted mean
        losses.append(1 - torch.nn.functional.cosine_similarity(flat, smooth, dim=1, eps=eps).mean())
    return torch.stack(losses).mean()


class SheetRegularizer:
    """The configured penalties of one sheet, evaluated on a forward's trace.

    ``penalties`` is a :class:`~columnformer.config.PenaltiesConfig`; ``coords`` the columns' positions (N, dim).
    ``__call__(states, step, total_steps)`` returns the weighted sum to add to the loss and the unweighted values.
    """

    def __init__(self, penalties, sheet: torch.nn.Module, coords: np.ndarray):
        self.cfg, self.sheet = penalties, sheet
        self.active = [name for name in PENALTIES if getattr(penalties, name).weight > 0]
        dev = next(sheet.parameters()).device
        if "response_smoothness" in self.active:
            radius = penalties.radius if penalties.radius is not None else 3.0 * nearest_neighbour_spacing(coords)
            pairs, d = response_pairs(coords, radius, penalties.max_pairs)
            self.pairs = torch.from_numpy(pairs).to(dev)
            self.inv_dist = torch.from_numpy(1.0 / (1.0 + d)).float().to(dev)
        if "weight_smoothness" in self.active:
            self.params = per_column_parameters(sheet, biases=False)  # biases start at zero: weights only
            if not self.params:
                raise ValueError(
                    "train.penalties.weight_smoothness needs untied per-column weights (untied_attn / untied_mlp / "
                    "untied_norm); this sheet has none"
                )
            idx, w = neighbour_weights(coords, penalties.neighbours)
            self.idx, self.w = torch.from_numpy(idx).to(dev), torch.from_numpy(w).to(dev)

    @property
    def needs_states(self) -> bool:
        return bool({"activity_l1", "response_smoothness"} & set(self.active))

    def __call__(
        self, states: list[torch.Tensor] | None, step: int, total_steps: int
    ) -> tuple[torch.Tensor | float, dict[str, float]]:
        total: torch.Tensor | float = 0.0
        values = {}
        for name in self.active:
            pc = getattr(self.cfg, name)
            if name == "activity_l1":
                v = activity_l1(states)
            elif name == "response_smoothness":
                v = response_smoothness(states, self.pairs, self.inv_dist)
            else:
                v = weight_smoothness(self.params, self.idx, self.w)
            values[name] = float(v.detach())
            total = total + pc.weight * schedule_factor(step, total_steps, pc.start, pc.ramp) * v
        return total, values

