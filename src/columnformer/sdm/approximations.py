"""Approximations of the binary circle intersection, the SDM book's numbers, and Jaeckel's design.

The analyses of the original code's ``Exp_Approx_Circle_Intersect`` and
``Compute_Difference_In_Circle_Intersects`` notebooks, re-derived here (own code; conventions of
:mod:`columnformer.sdm.theory`: ``n`` dimension, ``d`` Hamming radius, ``dv`` distance between the two
ball centres, ``r`` neurons, ``None`` = one at every address).

**Why attention is exponential.** The intersection count is a double sum
``I(dv) = sum_{a, b} C(n - dv, a) C(dv, b)`` over the addresses that agree with the first centre on ``a`` of the
n - dv shared bits and ``b`` of the dv differing ones, with both distances <= d. Its *largest term*
(``a = n - d - floor(dv/2)``, ``b = floor(dv/2)``; the largest one for d <= n/2) bounds it from below, and the
number of terms times the largest term bounds it from above. Replacing both binomials of the largest term by
normal densities (de Moivre-Laplace) gives ``2 / (pi sqrt(dv (n - dv))) exp(-(n - 2d)^2 / (2 (n - dv)))``
(a fraction of the space); a first-order Taylor expansion of the exponent in dv/n turns it into
``exp(-(n - 2d)^2 / (2n)) exp(-(n - 2d)^2 dv / (2 n^2))``: an exponential in dv, i.e. in the cosine
c = 1 - 2 dv / n, with slope ``beta ~ (n - 2d)^2 / (4n)`` (:func:`approx_beta`). Bounding the dv-dependent
constant over 1 <= dv <= n - 1 gives the Taylor lower / upper bounds (:func:`log_taylor_bounds`).

**The SDM book.** Kanerva (1988) approximates the intersection by an integral of a normal density
(:func:`book_continuous_intersection`, appendix B of the book) and tabulates it for n = 1000, d = 451,
r = 10^6 (:data:`KANERVA_BOOK_TABLE`); :func:`book_table` sets both beside the exact count. His read noise
(:func:`kanerva_read_sigma`) does not depend on the query distance.

**Jaeckel's selected-coordinate design** (Jaeckel 1989, "An alternative design for a sparse distributed
memory"): each neuron fixes ``q`` random coordinates and random values for them and activates when an address
matches all q, so it is activated with probability 2^-q, and two addresses dv apart share it with
probability 2^-q C(n - dv, q) / C(n, q) (:func:`jaeckel_log_expected_intersection`).

:func:`simulate_read` checks the expectations and the read-noise variance of both designs by Monte Carlo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
from scipy import integrate

from . import theory

LOG2 = math.log(2.0)

# Kanerva (1988), Sparse Distributed Memory, the table of the expected intersection of two read/write balls for
# n = 1000, d = 451 (p = 0.001), r = 1,000,000 neurons, as used by the original code's notebook
# Compute_Difference_In_Circle_Intersects.ipynb (numbers from the book, not computed).
KANERVA_BOOK_TABLE = {
    "n": 1000, "d": 451, "r": 1e6,
    "dvs": [0, 1, 10, 50, 100, 150, 200, 300, 400, 500],
    "values": [1000, 894, 743, 445, 267, 162, 97, 30, 7, 1],
}


def _dv_list(n: int, dvs: Iterable[int], lo: int = 0, hi: int | None = None) -> list[int]:
    hi = n if hi is None else hi
    out = []
    for dv in dvs:
        if int(dv) != dv or not lo <= dv <= hi:
            raise ValueError(f"distances dv must be integers in [{lo}, {hi}] for n={n}, got {dv!r}")
        out.append(int(dv))
    return out


def _check_half(n: int, d: int) -> None:
    theory.check_n_d(n, d)
    if 2 * d > n:
        raise ValueError(f"the largest-term analysis needs d <= n/2 (a ball at most half the space), got d={d}, n={n}")


# --------------------------------------------------------------------------- the largest term and its bounds
def log_largest_term(n: int, d: int, dv: int) -> float:
    """log of the largest term of the intersection double sum, as a fraction of the space:
    log(C(n - dv, n - d - floor(dv/2)) C(dv, floor(dv/2)) / 2^n); -inf where the balls do not meet (dv > 2d)."""
    _check_half(n, d)
    (dv,) = _dv_list(n, [dv])
    a, b = n - d - dv // 2, dv // 2
    if a > n - dv:
        return -math.inf
    return math.log(math.comb(n - dv, a) * math.comb(dv, b)) - n * LOG2


def term_count(n: int, d: int, dv: int) -> int:
    """Number of non-zero terms (a, b) of the intersection double sum (the upper bound's multiplier)."""
    theory.check_n_d(n, d)
    (dv,) = _dv_list(n, [dv])
    count = 0
    for a in range(max(0, n - d - dv // 2), n - dv + 1):
        lo, hi = max(0, n - d - a), min(dv, dv - (n - d - a))
        count += max(0, hi - lo + 1)
    return count


def log_largest_term_bounds(n: int, d: int, dv: int) -> tuple[float, float]:
    """Exact bounds on the log intersection fraction: (largest term, number of terms x largest term)."""
    low = log_largest_term(n, d, dv)
    return low, (low + math.log(term_count(n, d, dv)) if low > -math.inf else -math.inf)


def log_largest_term_normal(n: int, d: int, dv: int) -> float:
    """The largest term with both binomials replaced by normal densities (de Moivre-Laplace), 1 <= dv <= n-1."""
    _check_half(n, d)
    (dv,) = _dv_list(n, [dv], 1, n - 1)
    mu_a, var_a = (n - d - dv // 2) - (n - dv) / 2, (n - dv) / 4
    mu_b, var_b = dv // 2 - dv / 2, dv / 4
    return -math.log(2 * math.pi * math.sqrt(var_a * var_b)) - mu_a**2 / (2 * var_a) - mu_b**2 / (2 * var_b)


def _log_taylor_exponent(n: int, d: int, dv: int) -> float:
    return -((n - 2 * d) ** 2) / (2 * n) - ((n - 2 * d) ** 2) * dv / (2 * n**2)


def log_largest_term_taylor(n: int, d: int, dv: int) -> float:
    """The normal approximation with its exponent expanded to first order in dv/n: exponential in dv."""
    _check_half(n, d)
    (dv,) = _dv_list(n, [dv], 1, n - 1)
    return math.log(2 / (math.pi * math.sqrt(dv * (n - dv)))) + _log_taylor_exponent(n, d, dv)


def log_taylor_bounds(n: int, d: int, dv: int) -> tuple[float, float]:
    """The Taylor approximation with its constant 2 / (pi sqrt(dv (n - dv))) replaced by its smallest
    (dv = n/2: 4 / (pi n)) and largest (dv = 1: 2 / (pi sqrt(n - 1))) value over 1 <= dv <= n - 1."""
    _check_half(n, d)
    (dv,) = _dv_list(n, [dv], 1, n - 1)
    e = _log_taylor_exponent(n, d, dv)
    return math.log(4 / (math.pi * n)) + e, math.log(2 / (math.pi * math.sqrt(n - 1))) + e


def approx_beta(n: int, d: int) -> float:
    """beta of the Taylor approximation in cosine units: (n - 2d)^2 / (4n)."""
    theory.check_n_d(n, d)
    return (n - 2 * d) ** 2 / (4 * n)


def log_exponential_bounds(n: int, d: int, dvs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The original's fixed-constant bounds on the whole intersection over a range of dv (1 <= dv <= n - 1):
    ``exp(-(n - 2d)^2 / (2 (n - dv)))`` times the smallest normal constant over ``dvs`` (lower) or the largest
    constant times the largest term count over ``dvs`` (upper); log fractions of the space."""
    _check_half(n, d)
    dv = np.asarray(_dv_list(n, dvs, 1, n - 1), dtype=float)
    log_const = np.log(2 / (np.pi * np.sqrt(dv * (n - dv))))
    expo = -((n - 2 * d) ** 2) / (2 * (n - dv))
    log_count = math.log(max(term_count(n, d, int(v)) for v in dv))
    return log_const.min() + expo, log_const.max() + log_count + expo


# --------------------------------------------------------------------------- beta by gradient descent
def fit_beta_softmax(
    cosines: Sequence[float], targets: Sequence[float], lr: float = 0.3, iters: int = 5000,
    init: float | None = None, seed: int = 0,
) -> tuple[float, float]:
    """beta of the softmax over ``cosines`` closest to the normalised ``targets`` (e.g. the intersection at
    every distance), fitted by Adam on the mean squared error, as the original's ``fit_softmax_backprop``;
    beside the log-linear fit of :func:`columnformer.sdm.theory.fit_beta` it is the best beta for a softmax
    over exactly these points. ``init``: the starting beta (default: uniform in [1, 30] from ``seed``, the
    original's range). Returns (beta, final loss)."""
    import torch

    x = torch.as_tensor(np.asarray(cosines, dtype=np.float32))
    y = np.asarray(targets, dtype=np.float64)
    if x.ndim != 1 or y.shape != tuple(x.shape) or x.numel() < 2:
        raise ValueError(f"cosines and targets must be 1-D of the same length >= 2, got {tuple(x.shape)} and {y.shape}")
    if not (np.all(np.isfinite(y)) and np.all(y >= 0) and y.sum() > 0):
        raise ValueError("targets must be finite, non-negative and not all zero")
    if not (lr > 0 and iters >= 1):
        raise ValueError(f"need lr > 0 and iters >= 1, got lr={lr}, iters={iters}")
    target = torch.as_tensor((y / y.sum()).astype(np.float32))
    start = float(np.random.default_rng(seed).uniform(1, 30)) if init is None else float(init)
    beta = torch.nn.Parameter(torch.tensor([start]))
    opt = torch.optim.Adam([beta], lr=lr)
    for _ in range(iters):
        opt.zero_grad()
        loss = ((target - torch.softmax(beta * x, dim=0)) ** 2).sum() / x.numel()
        loss.backward()
        opt.step()
    return float(beta.item()), float(loss.item())


# --------------------------------------------------------------------------- the SDM book
def _book_density(x: float, c: float) -> float:
    return math.exp(-0.5 * c * c / (1 - x)) / (2 * math.pi * math.sqrt(x * (1 - x)))


def book_continuous_intersection(n: int, d: int, dvs: Iterable[int], r: float | None = None) -> np.ndarray:
    """The SDM book's continuous approximation of the expected intersection (Kanerva 1988, appendix B):
    r * integral_{dv/n}^{1} exp(-c^2 / (2 (1 - x))) / (2 pi sqrt(x (1 - x))) dx, c = (d - n/2) / sqrt(n/4).
    ``r=None``: the fraction of the space."""
    theory.check_n_d(n, d)
    if r is not None:
        theory._check_r(r)
    scale = 1.0 if r is None else float(r)
    c = (d - n / 2) / math.sqrt(n / 4)
    out = []
    for dv in _dv_list(n, dvs):
        value = 0.0 if dv >= n else integrate.quad(_book_density, dv / n, 1.0, args=(c,), limit=200)[0]
        out.append(scale * value)
    return np.asarray(out)


def book_table() -> list[dict]:
    """Kanerva's table beside the exact expected intersection and the book's continuous approximation."""
    t = KANERVA_BOOK_TABLE
    exact = theory.expected_intersection(t["n"], t["d"], t["dvs"], t["r"])
    cont = book_continuous_intersection(t["n"], t["d"], t["dvs"], t["r"])
    return [{"dv": dv, "exact": float(e), "continuous": float(c), "book": b}
            for dv, e, c, b in zip(t["dvs"], exact, cont, t["values"])]


def kanerva_read_sigma(n: int, d: int, m: int, r: float) -> float:
    """The SDM book's standard deviation of one bit's read sum with m stored patterns (independent of the
    query distance): sqrt((1 + h^2 r / (4 p^2 n)) p^2 r m), p the activation probability and
    h = -f(1/2) the book's density at x = 1/2 (the original's "old approx")."""
    theory.check_n_d(n, d)
    theory._check_r(r)
    if m < 1:
        raise ValueError(f"need m >= 1 stored patterns, got m={m}")
    p = theory.hamming_radius_to_fraction(d, n)
    h = -_book_density(0.5, (d - n / 2) / math.sqrt(n / 4))
    return math.sqrt((1 + h * h * r / (4 * p * p * n)) * p * p * r * m)


# --------------------------------------------------------------------------- Jaeckel's design
def jaeckel_log_expected_intersection(n: int, q: int, dvs: Iterable[int], r: float | None = None) -> np.ndarray:
    """log expected neurons shared by two addresses dv apart in Jaeckel's selected-coordinate design
    (each neuron matches q fixed random coordinates): log(r 2^-q C(n - dv, q) / C(n, q)); -inf for dv > n - q.
    ``r=None``: a fraction (r = 1)."""
    if int(q) != q or not 1 <= q <= n:
        raise ValueError(f"q (coordinates each neuron checks) must be an integer in [1, n={n}], got {q!r}")
    log_r = 0.0 if r is None else theory.log_neuron_count(n, r)
    base = math.log(math.comb(n, q))
    return np.asarray([
        log_r - q * LOG2 + math.log(math.comb(n - dv, q)) - base if n - dv >= q else -math.inf
        for dv in _dv_list(n, dvs)
    ])


def read_noise_variance(
    n: int, m: int, r: float, design: Literal["hamming", "jaeckel"] = "hamming", d: int | None = None,
    q: int | None = None,
) -> float:
    """Exact variance of one bit's read noise from the m - 1 other (random) patterns, r random neurons:
    (m - 1) E_D[r p_D (1 - p_D) + (r p_D)^2], D ~ Binomial(n, 1/2) the distance of a random pattern from the
    query and p_D the probability that one neuron serves both (each other pattern adds +-1 times its shared
    neurons, a binomial count given D). The SNR analyses approximate E_D[...] by p^2 r + (p^2 r)^2
    (``theory``'s ``average``), by I(n/2) + I(n/2)^2 (``half``) or by the book's :func:`kanerva_read_sigma`."""
    theory._check_r(r)
    if m < 1:
        raise ValueError(f"need m >= 1 stored patterns, got m={m}")
    if design == "hamming":
        if d is None:
            raise ValueError("design='hamming' needs the radius d")
        log_p = theory.log_expected_intersection(n, d, range(n + 1), None) - n * LOG2
    elif design == "jaeckel":
        log_p = jaeckel_log_expected_intersection(n, q, range(n + 1), None) if q is not None else None
        if log_p is None:
            raise ValueError("design='jaeckel' needs q")
    else:
        raise ValueError(f"design must be 'hamming' or 'jaeckel', got {design!r}")
    log_w = np.array([math.log(math.comb(n, k)) for k in range(n + 1)]) - n * LOG2  # Binomial(n, 1/2) weights
    p = np.exp(log_p)
    second = np.exp(log_w) * (r * p * (1 - p) + (r * p) ** 2)
    return float((m - 1) * second.sum())


# --------------------------------------------------------------------------- Monte Carlo
@dataclass
class ReadSimulation:
    """Per query distance dv: the mean signal (neurons the query shares with its target) and the variance of
    one bit's read noise (the sum over the other patterns of +-1 times the neurons each shares with the query)."""

    dvs: list[int]
    signal_mean: np.ndarray
    signal_var: np.ndarray
    noise_var: np.ndarray
    other_mean: float  # mean neurons a random other pattern shares with the query


def simulate_read(
    n: int, r: int, m: int, dvs: Sequence[int], trials: int, design: Literal["hamming", "jaeckel"] = "hamming",
    d: int | None = None, q: int | None = None, seed: int = 0,
) -> ReadSimulation:
    """Monte Carlo of one read: ``trials`` fresh draws of r random neurons and m random patterns per dv; the
    query is the first pattern with dv bits flipped. ``design``: Kanerva's Hamming balls of radius ``d`` or
    Jaeckel's selected coordinates (``q`` per neuron)."""
    if design == "hamming":
        if d is None:
            raise ValueError("design='hamming' needs the radius d")
        theory.check_n_d(n, d)
    elif design == "jaeckel":
        if q is None or not 1 <= q <= n:
            raise ValueError(f"design='jaeckel' needs q in [1, n={n}], got {q!r}")
    else:
        raise ValueError(f"design must be 'hamming' or 'jaeckel', got {design!r}")
    if r < 1 or m < 2 or trials < 2:
        raise ValueError(f"need r >= 1 neurons, m >= 2 patterns and trials >= 2, got r={r}, m={m}, trials={trials}")
    dvs = _dv_list(n, dvs)
    rng = np.random.default_rng(seed)
    signal = np.zeros((len(dvs), trials))
    noise = np.zeros((len(dvs), trials))
    others = []
    for t in range(trials):
        if design == "hamming":
            neurons = rng.integers(0, 2, (r, n)).astype(np.float32) * 2 - 1  # bipolar

            def active(x: np.ndarray) -> np.ndarray:  # (k, n) {0,1} addresses -> (k, r) activations
                dot = (x.astype(np.float32) * 2 - 1) @ neurons.T  # Hamming distance = (n - dot) / 2
                return (dot >= n - 2 * d).astype(np.int64)
        else:
            coords = np.argsort(rng.random((r, n)), axis=1)[:, :q]  # (r, q) distinct coordinates per neuron
            values = rng.integers(0, 2, (r, q), dtype=np.int8)

            def active(x: np.ndarray) -> np.ndarray:
                return (x[:, coords] == values[None]).all(-1).astype(np.int64)

        patterns = rng.integers(0, 2, (m, n), dtype=np.int8)
        act_p = active(patterns)  # (m, r)
        for i, dv in enumerate(dvs):
            query = patterns[0].copy()
            flip = rng.choice(n, dv, replace=False)
            query[flip] ^= 1
            shared = act_p @ active(query[None])[0]  # (m,) neurons each pattern shares with the query
            signal[i, t] = shared[0]
            bits = rng.choice([-1, 1], m - 1)  # one bit position: the other patterns' random +-1 values
            noise[i, t] = bits @ shared[1:]
            others.append(shared[1:].mean())
    return ReadSimulation(dvs, signal.mean(1), signal.var(1, ddof=1), noise.var(1, ddof=1), float(np.mean(others)))
