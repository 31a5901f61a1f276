"""Batched associative memories that read with (approximations of) SDM.

Patterns are rows of an (m, n) tensor.  Binary patterns may be given as {0,1} or
+-1 values; internally they are bipolar (+-1), where the Hamming distance is
h = (n - q.x) / 2 and the cosine similarity is q.x / n.  Continuous patterns are
rows that get L2-normalised.  Every memory maps a batch of queries (B, n) to an
updated batch with :meth:`update`; :func:`converge` iterates it to a fixed point.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from . import theory


# --------------------------------------------------------------------------- data
def _check_patterns(patterns: torch.Tensor) -> None:
    if not isinstance(patterns, torch.Tensor) or patterns.ndim != 2:
        shape = getattr(patterns, "shape", type(patterns).__name__)
        raise ValueError(f"patterns must be a 2-D tensor of shape (m, n), got {shape}")
    if patterns.shape[0] < 1 or patterns.shape[1] < 1:
        raise ValueError(f"patterns must have m >= 1 rows and n >= 1 columns, got {tuple(patterns.shape)}")


def to_bipolar(patterns: torch.Tensor) -> torch.Tensor:
    """Map {0,1} or +-1 binary patterns to float +-1."""
    _check_patterns(patterns)
    values = torch.unique(patterns)
    if set(values.tolist()) <= {0.0, 1.0}:
        return patterns.float() * 2 - 1
    if set(values.tolist()) <= {-1.0, 1.0}:
        return patterns.float()
    raise ValueError("binary patterns must contain only {0,1} or only {-1,+1} values")


def random_binary_patterns(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """m uniformly random bipolar (+-1) patterns of dimension n, shape (m, n)."""
    if m < 1 or n < 1:
        raise ValueError(f"need m >= 1 and n >= 1, got m={m}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (m, n), generator=gen).float() * 2 - 1


def random_continuous_patterns(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """m uniformly random unit vectors (on S^(n-1)), shape (m, n)."""
    if m < 1 or n < 1:
        raise ValueError(f"need m >= 1 and n >= 1, got m={m}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


def flip_bits(patterns: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Copy of bipolar ``patterns`` with exactly ``k`` random bits flipped per row."""
    _check_patterns(patterns)
    n = patterns.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"number of bit flips k must be in [0, n={n}], got k={k}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(patterns.shape, generator=gen).argsort(dim=1)[:, :k]
    sign = torch.ones_like(patterns)
    sign.scatter_(1, order, -1.0)
    return patterns * sign


def perturb_to_cosine(patterns: torch.Tensor, cosine: float, seed: int = 0) -> torch.Tensor:
    """Unit vectors with cosine similarity exactly ``cosine`` to each (normalised) row."""
    _check_patterns(patterns)
    if not -1.0 <= cosine <= 1.0:
        raise ValueError(f"target cosine must be in [-1, 1], got {cosine}")
    x = patterns / patterns.norm(dim=1, keepdim=True)
    # offset the stream so the noise never equals patterns drawn with the same seed
    gen = torch.Generator().manual_seed(seed + 0x5EED_0FF5E7)
    noise = torch.randn(x.shape, generator=gen)
    noise = noise - (noise * x).sum(1, keepdim=True) * x
    noise = noise / noise.norm(dim=1, keepdim=True)
    return cosine * x + math.sqrt(max(0.0, 1.0 - cosine * cosine)) * noise


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity (for +-1 vectors: 1 - 2 h / n)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)


# --------------------------------------------------------------------------- memories
class Memory(Protocol):
    """An autoassociative memory: one read step maps queries (B, n) to (B, n)."""

    binary: bool

    def update(self, queries: torch.Tensor) -> torch.Tensor: ...


def _sign_keep(values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """sign(values), keeping the query's bit where values == 0 (tie / nothing read)."""
    return torch.where(values == 0, queries, torch.sign(values))


class NeuronSDM:
    """Kanerva's SDM with ``r`` explicit random neurons (binary data only).

    Writing adds each bipolar pattern to the counters of every neuron whose address is
    within Hamming distance ``d``; reading sums the counters of the neurons within
    ``d`` of the query and takes the sign.  Queries that activate no neuron (or tie)
    keep their bits.  Needs r * p(d) >~ 1 activated neurons per pattern.
    """

    binary = True

    def __init__(self, patterns: torch.Tensor, d: int, r: int, seed: int = 0, chunk: int = 16384):
        x = to_bipolar(patterns)
        self.n = x.shape[1]
        theory.check_n_d(self.n, d)
        if r < 1:
            raise ValueError(f"number of neurons r must be >= 1, got r={r}")
        self.d, self.r, self.chunk = d, int(r), chunk
        gen = torch.Generator().manual_seed(seed)
        self.addresses = torch.randint(0, 2, (self.r, self.n), generator=gen).float() * 2 - 1
        self.counters = torch.zeros(self.r, self.n)
        for start in range(0, self.r, chunk):
            act = self._active(x, slice(start, start + chunk))
            self.counters[start : start + chunk] = act.T @ x
        self.neurons_per_pattern = float(self._active(x, slice(0, self.r)).sum(1).mean())

    def _active(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        # Hamming distance <= d  <=>  dot product >= n - 2d
        return ((x @ self.addresses[rows].T) >= self.n - 2 * self.d).float()

    def update(self, queries: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(queries)
        for start in range(0, self.r, self.chunk):
            rows = slice(start, start + self.chunk)
            total += self._active(queries, rows) @ self.counters[rows]
        return _sign_keep(total, queries)


class PatternSDM:
    """SDM read written over patterns: each pattern weighted by the expected number of
    neurons in the intersection of its write ball and the query's read ball.

    ``r=None``: infinitely many (all 2^n) neurons, the exact relative intersection.
    ``r`` given: expected counts r * I / 2^n, stochastically rounded to integers each
    read (as finite neurons would), so tiny intersections read as zero neurons.
    Continuous queries are mapped to the Hamming distance n(1 - cos)/2, rounded to the nearest integer
    (``hamming="round"``, the default) or floored as the original code's ``cosine_to_hamm`` does
    (``hamming="floor"``; tolerant of float round-off of 1e-6, so bipolar queries map exactly either way).
    """

    def __init__(
        self, patterns: torch.Tensor, d: int, r: float | None = None, binary: bool = True, seed: int = 0,
        hamming: str = "round",
    ):
        _check_patterns(patterns)
        if hamming not in ("round", "floor"):
            raise ValueError(f"hamming must be 'round' or 'floor', got {hamming!r}")
        self.hamming = hamming
        self.binary = binary
        self.patterns = to_bipolar(patterns) if binary else patterns / patterns.norm(dim=1, keepdim=True)
        self.n = self.patterns.shape[1]
        theory.check_n_d(self.n, d)
        self.d, self.r = d, r
        log_i = torch.tensor(theory.log_expected_intersection(self.n, d, range(self.n + 1), r))
        if r is None:  # relative weights only matter; scale so the largest is 1
            log_i = log_i - log_i[0]
        self.table = torch.exp(log_i).float()
        self.gen = torch.Generator().manual_seed(seed)

    def weights(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, m) neuron counts shared by each query and pattern ball."""
        cos = (queries @ self.patterns.T) / (self.n if self.binary else 1.0)
        x = self.n * (1 - cos.clamp(-1, 1)) / 2
        h = (torch.round(x) if self.hamming == "round" else torch.floor(x + 1e-6)).long().clamp(0, self.n)
        w = self.table[h]
        if self.r is not None:
            frac = w - torch.floor(w)
            w = torch.floor(w) + (torch.rand(w.shape, generator=self.gen) < frac).float()
        return w

    def update(self, queries: torch.Tensor) -> torch.Tensor:
        out = self.weights(queries) @ self.patterns
        if self.binary:
            return _sign_keep(out, queries)
        norm = out.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, out / norm.clamp_min(1e-30), queries)


@functools.lru_cache(maxsize=32)
def _log_cap_table(n: int, d: int, resolution: int) -> np.ndarray:
    """log cap-intersection fraction on ``resolution`` cosines over [-1, 1] (cached: the quadratures take seconds)."""
    grid = np.linspace(-1.0, 1.0, resolution)
    c = theory.hamming_radius_to_cosine_threshold(d, n)
    # two caps of angular radius acos(c) meet only when their centres are less than 2 acos(c) apart
    meet = math.cos(min(math.pi, 2 * math.acos(max(-1.0, min(1.0, c)))))
    live = grid >= meet - 2.0 / (resolution - 1)
    log_i = np.full(resolution, -np.inf)
    log_i[live] = theory.log_cap_intersection(n, d, np.minimum(grid[live], 1 - 1e-12))
    log_i.setflags(write=False)
    return log_i


class CapSDM:
    """Continuous SDM on the unit hypersphere (the original's ``Cont_SDM`` / ``Cont_SDM_NeuronLimit``).

    Patterns are L2-normalised; each is weighted by the expected number of neurons in the intersection of two
    hypersphere caps (threshold cosine 1 - 2d/n, :func:`theory.log_cap_intersection`) whose centres have the
    query's cosine with it, looked up on a grid of ``resolution`` cosines over [-1, 1] (the cosine rounded down
    to the grid, as the original's cache). ``r=None``: infinitely many neurons (relative weights); ``r`` given:
    expected counts stochastically rounded at every read. A query sharing no neuron with any pattern stays.
    """

    binary = False

    def __init__(self, patterns: torch.Tensor, d: int, r: float | None = None, resolution: int = 1001, seed: int = 0):
        _check_patterns(patterns)
        self.patterns = patterns.float() / patterns.float().norm(dim=1, keepdim=True)
        self.n = self.patterns.shape[1]
        theory.check_n_d(self.n, d)
        if resolution < 3:
            raise ValueError(f"resolution must be >= 3 grid points, got {resolution}")
        self.d, self.r, self.resolution = d, r, resolution
        log_i = _log_cap_table(self.n, d, resolution) + (0.0 if r is None else theory.log_neuron_count(self.n, r))
        self.log_table = torch.as_tensor(log_i)  # float64: tiny intersections keep their relative size
        self.gen = torch.Generator().manual_seed(seed)

    def weights(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, m) neuron counts (finite r) or relative weights (r=None) of each pattern for each query."""
        q = queries / queries.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = (q @ self.patterns.T).clamp(-1, 1).double()
        idx = torch.floor((cos + 1) / 2 * (self.resolution - 1) + 1e-9).long().clamp(0, self.resolution - 1)
        log_w = self.log_table[idx]
        if self.r is None:
            top = log_w.max(dim=1, keepdim=True).values
            return torch.where(torch.isfinite(top), torch.exp(log_w - top.clamp_min(-1e300)), torch.zeros_like(log_w))
        w = torch.exp(log_w)
        frac = w - torch.floor(w)
        return torch.floor(w) + (torch.rand(w.shape, generator=self.gen, dtype=w.dtype) < frac).double()

    def update(self, queries: torch.Tensor) -> torch.Tensor:
        out = (self.weights(queries) @ self.patterns.double()).float()
        norm = out.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, out / norm.clamp_min(1e-30), queries)


class Hopfield:
    """Classical Hopfield network: W = sum of outer products (zero diagonal), sign update."""

    binary = True

    def __init__(self, patterns: torch.Tensor):
        x = to_bipolar(patterns)
        self.weight = x.T @ x
        self.weight.fill_diagonal_(0.0)

    def update(self, queries: torch.Tensor) -> torch.Tensor:
        return _sign_keep(queries @ self.weight, queries)


class SoftmaxAttention:
    """Attention read: softmax(beta * cosine(query, pattern)) weighted sum of patterns.

    Use :meth:`sdm_fitted` for beta fitted to the SDM circle intersection and
    :meth:`transformer` for the transformer's q.k / sqrt(n) scaling.
    """

    def __init__(self, patterns: torch.Tensor, beta: float, binary: bool = True):
        _check_patterns(patterns)
        self.binary = binary
        self.patterns = to_bipolar(patterns) if binary else patterns / patterns.norm(dim=1, keepdim=True)
        self.n = self.patterns.shape[1]
        self.beta = float(beta)

    @classmethod
    def sdm_fitted(cls, patterns: torch.Tensor, d: int, binary: bool = True, cap: bool = False) -> "SoftmaxAttention":
        """beta fitted (covariance convention, dv = 0..d-1) to the binary intersection, or with ``cap`` to the
        continuous hypersphere-cap intersection (the original's ``Cont_SDM_CFit_Attention``)."""
        return cls(patterns, theory.fit_beta(patterns.shape[1], d, continuous=cap), binary)

    @classmethod
    def transformer(cls, patterns: torch.Tensor, binary: bool = True) -> "SoftmaxAttention":
        """Scores q.x / sqrt(n) on the vectors as stored: cosine beta sqrt(n) for +-1
        vectors (|x|^2 = n), 1/sqrt(n) for unit vectors."""
        n = patterns.shape[1]
        return cls(patterns, math.sqrt(n) if binary else 1.0 / math.sqrt(n), binary)

    def weights(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, m) softmax weights of the patterns for each query."""
        cos = (queries @ self.patterns.T) / (self.n if self.binary else 1.0)
        return torch.softmax(self.beta * cos, dim=1)

    def update(self, queries: torch.Tensor) -> torch.Tensor:
        out = self.weights(queries) @ self.patterns
        if self.binary:
            return _sign_keep(out, queries)
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-30)


# --------------------------------------------------------------------------- recall
@dataclass(frozen=True)
class Convergence:
    """Converged queries and the number of read steps taken."""

    queries: torch.Tensor
    steps: int


def converge(memory: Memory, queries: torch.Tensor, max_steps: int = 50, tol: float = 1e-6) -> Convergence:
    """Apply ``memory.update`` until no query changes (binary) or moves > ``tol``."""
    if queries.ndim != 2:
        raise ValueError(f"queries must have shape (B, n), got {tuple(queries.shape)}")
    q = queries.float()
    for step in range(1, max_steps + 1):
        new = memory.update(q)
        changed = (new != q).any() if memory.binary else ((new - q).abs() > tol).any()
        q = new
        if not changed:
            return Convergence(q, step)
    return Convergence(q, max_steps)


def recall_similarity(memory: Memory, originals: torch.Tensor, queries: torch.Tensor, max_steps: int = 50) -> torch.Tensor:
    """Cosine similarity of each converged query to its original pattern, shape (B,)."""
    result = converge(memory, queries, max_steps)
    return similarity(result.queries, originals)
