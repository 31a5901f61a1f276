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
fraction near zero (``a < tol * rms(a)``), Hoyer sparsity per stimulus, population sparseness per stimulus and
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

from .layers import UntiedLayerNorm, UntiedLinear

SPARSITY_METRICS = ("near_zero", "hoyer", "population_sparseness", "lifetime_sparseness")
PENALTIES = ("activity_l1", "response_smoothness", "weight_smoothness")


def schedule_factor(step: int, total_steps: int, start: float, ramp: float) -> float:
    """Weight multiplier at optimizer ``step``: 0 before ``start * total``, then linear to 1 over ``ramp * total``."""
    s0, r = start * total_steps, ramp * total_steps
    if step < s0:
        return 0.0
    return 1.0 if r <= 0 else min(1.0, (step - s0) / r)


# ---------------------------------------------------------------------------------------------- sparsity metrics


@torch.no_grad()
def activation_sparsity(states: torch.Tensor, tol: float = 0.1) -> dict[str, float]:
    """Sparsity of one step's states ``(N, B, C)`` (units = N*C, stimuli = B); see the module docstring."""
    if states.ndim != 3:
        raise ValueError(f"states must be (N, B, C), got shape {tuple(states.shape)}")
    a = states.detach().float().abs().transpose(0, 1).reshape(states.shape[1], -1)  # (B, U)
    B, U = a.shape
    rms = a.pow(2).mean().sqrt()
    near_zero = (a < tol * rms).float().mean().item() if rms > 0 else 1.0
    l1, l2 = a.sum(1), a.pow(2).sum(1).sqrt()  # per stimulus
    ok = l2 > 0
    hoyer = ((math.sqrt(U) - l1[ok] / l2[ok]) / (math.sqrt(U) - 1)).mean().item() if ok.any() and U > 1 else 0.0
    return {
        "near_zero": near_zero,
        "hoyer": hoyer,
        "population_sparseness": _sparseness(a, dim=1),
        "lifetime_sparseness": _sparseness(a, dim=0) if B > 1 else 0.0,
    }


def _sparseness(a: torch.Tensor, dim: int) -> float:
    """Mean over the other dimension of ``(1 - mean(a)^2 / mean(a^2)) / (1 - 1/n)`` along ``dim`` (all-zero rows skipped)."""
    n = a.shape[dim]
    m1, m2 = a.mean(dim), a.pow(2).mean(dim)
    ok = m2 > 0
    if n < 2 or not ok.any():
        return 0.0
    return ((1 - m1[ok] ** 2 / m2[ok]) / (1 - 1 / n)).mean().item()


def mean_sparsity(states: list[torch.Tensor], tol: float = 0.1) -> dict[str, float]:
    """``activation_sparsity`` averaged over a list of step states."""
    per = [activation_sparsity(s, tol) for s in states]
    return {k: float(np.mean([p[k] for p in per])) for k in SPARSITY_METRICS}


class SparsityStats:
    """Activation sparsity per step over a whole data split, streamed batch by batch.

    ``add(states)`` takes one batch's states per step (each (N, B, C)). Near-zero fraction, Hoyer and
    population sparseness are per-stimulus means; lifetime sparseness uses every unit's first and second moments
    over all stimuli of the split (not per batch).
    """

    def __init__(self, tol: float = 0.1):
        self.tol, self.n, self.sums, self.m1, self.m2 = tol, 0, None, None, None

    @torch.no_grad()
    def add(self, states: list[torch.Tensor]) -> None:
        b = states[0].shape[1]
        per = [activation_sparsity(s, self.tol) for s in states]
        a = torch.stack([s.detach().double().abs().transpose(0, 1).reshape(b, -1) for s in states])  # (T, B, U)
        m1, m2 = a.sum(1).cpu(), a.pow(2).sum(1).cpu()
        if self.sums is None:
            self.sums = np.zeros((len(states), 3))
            self.m1, self.m2 = torch.zeros_like(m1), torch.zeros_like(m2)
        self.sums += b * np.array([[p["near_zero"], p["hoyer"], p["population_sparseness"]] for p in per])
        self.m1 += m1
        self.m2 += m2
        self.n += b

    def result(self) -> dict[str, list[float]]:
        """Per step: each metric of ``SPARSITY_METRICS`` (lists of length T)."""
        if not self.n:
            raise ValueError("no states were added")
        m1, m2 = self.m1 / self.n, self.m2 / self.n  # (T, U)
        lifetime = [
            float(((1 - m1[t][ok] ** 2 / m2[t][ok]) / (1 - 1 / self.n)).mean()) if self.n > 1 and ok.any() else 0.0
            for t, ok in enumerate(m2 > 0)
        ]
        mean = self.sums / self.n
        return {
            "near_zero": mean[:, 0].tolist(), "hoyer": mean[:, 1].tolist(),
            "population_sparseness": mean[:, 2].tolist(), "lifetime_sparseness": lifetime,
        }


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


def untied_weights(sheet: torch.nn.Module) -> list[torch.Tensor]:
    """The per-column weights (N, ...) of a sheet's untied linears and layer norms (biases, zero at start, left out)."""
    out = []
    for m in sheet.modules():
        if isinstance(m, (UntiedLinear, UntiedLayerNorm)):
            out.append(m.weight)
    return out


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
            radius = penalties.radius if penalties.radius is not None else 3.0 * _spacing(coords)
            pairs, d = response_pairs(coords, radius, penalties.max_pairs)
            self.pairs = torch.from_numpy(pairs).to(dev)
            self.inv_dist = torch.from_numpy(1.0 / (1.0 + d)).float().to(dev)
        if "weight_smoothness" in self.active:
            self.params = untied_weights(sheet)
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


def _spacing(coords: np.ndarray) -> float:
    """Median nearest-neighbour distance of the columns."""
    d, _ = cKDTree(coords).query(coords, k=2)
    return float(np.median(d[:, 1]))
