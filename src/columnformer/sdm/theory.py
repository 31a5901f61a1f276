"""Closed-form Sparse Distributed Memory (SDM) theory.

Everything here is NumPy/SciPy or exact Python integers.  Binary SDM lives in
{0,1}^n with Hamming distances; the continuous version lives on the unit
hypersphere S^(n-1) with cosine similarities.

Conventions
-----------
* ``n``: dimension, ``d``: Hamming radius of a read/write ball, ``dv``: Hamming
  distance between the two ball centres (query and stored pattern),
  ``r``: number of neurons scattered uniformly at random (``None`` = one neuron at
  every address, r = 2^n), ``m``: number of stored patterns.
* Hamming distance h and cosine similarity c of the corresponding bipolar (+-1)
  vectors are related by ``c = 1 - 2 h / n``.
* "Fraction of the space" p(d) is the fraction of all 2^n addresses that lie within
  Hamming distance d of a point: p(d) = sum_{i<=d} C(n, i) / 2^n, the activation
  probability of a neuron.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Literal, Sequence

import numpy as np
from scipy import integrate, special, stats

FitConvention = Literal["covariance", "least_squares"]


# --------------------------------------------------------------------------- checks
def check_n_d(n: int, d: int) -> None:
    """Raise ``ValueError`` unless 1 <= n and 0 <= d <= n are integers."""
    if int(n) != n or n < 1:
        raise ValueError(f"dimension n must be an integer >= 1, got n={n!r}; pass e.g. n=64")
    if int(d) != d or d < 0 or d > n:
        raise ValueError(
            f"Hamming radius d must be an integer with 0 <= d <= n, got d={d!r} for n={n}; "
            f"choose d in [0, {n}] (e.g. via fraction_to_hamming_radius)"
        )


def _check_dv(n: int, dv: int) -> None:
    if int(dv) != dv or dv < 0 or dv > n:
        raise ValueError(f"Hamming distance dv must be an integer in [0, n={n}], got {dv!r}")


def _check_r(r: float | None) -> None:
    if r is not None and not (math.isfinite(r) and r > 0):
        raise ValueError(f"number of neurons r must be a finite number > 0 (or None for r = 2^n), got r={r!r}")


def log_neuron_count(n: int, r: float | None) -> float:
    """log r, with ``r=None`` meaning one neuron at every address (log 2^n: no overflow for large n)."""
    _check_r(r)
    return n * math.log(2.0) if r is None else math.log(r)


def _log_neuron_fraction(n: int, r: float | None) -> float:
    """log(r / 2^n): the fraction of addresses that hold a neuron."""
    return log_neuron_count(n, r) - n * math.log(2.0)


# --------------------------------------------------------------------------- conversions
def hamming_to_cosine(h: float | np.ndarray, n: int) -> float | np.ndarray:
    """Cosine similarity of two bipolar vectors at Hamming distance ``h``: 1 - 2h/n."""
    check_n_d(n, 0)
    h_arr = np.asarray(h, dtype=float)
    if np.any(h_arr < 0) or np.any(h_arr > n):
        raise ValueError(f"Hamming distances must lie in [0, n={n}], got {h!r}")
    out = 1.0 - 2.0 * h_arr / n
    return float(out) if out.ndim == 0 else out


def cosine_to_hamming(c: float | np.ndarray, n: int) -> float | np.ndarray:
    """Hamming distance n(1 - c)/2 matching cosine similarity ``c`` (not rounded)."""
    check_n_d(n, 0)
    c_arr = np.asarray(c, dtype=float)
    if np.any(np.abs(c_arr) > 1 + 1e-9):
        raise ValueError(f"cosine similarities must lie in [-1, 1], got {c!r}")
    out = n * (1.0 - np.clip(c_arr, -1.0, 1.0)) / 2.0
    return float(out) if out.ndim == 0 else out


def ball_volume(n: int, d: int) -> int:
    """Exact number of addresses within Hamming distance ``d``: sum_{i<=d} C(n, i)."""
    check_n_d(n, d)
    return sum(math.comb(n, i) for i in range(d + 1))


def hamming_radius_to_fraction(d: int, n: int) -> float:
    """Fraction p(d) of {0,1}^n inside a Hamming ball of radius ``d`` (activation prob.; may underflow
    to 0 for large n: use :func:`log_ball_fractions` there)."""
    return math.exp(math.log(ball_volume(n, d)) - n * math.log(2.0))


def log_ball_fractions(n: int) -> np.ndarray:
    """log p(d) for every radius d = 0..n, from one running sum of exact binomials: (n + 1,)."""
    check_n_d(n, 0)
    out, total, comb = np.empty(n + 1), 0, 1
    log_space = n * math.log(2.0)
    for d in range(n + 1):
        total += comb
        out[d] = math.log(total) - log_space
        comb = comb * (n - d) // (d + 1)  # C(n, d + 1)
    return out


def fraction_to_hamming_radius(p: float, n: int) -> int:
    """Smallest radius d with p(d) >= ``p`` (the binomial quantile, as in the original code)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"space fraction p must be in (0, 1], got p={p!r}")
    return log_fraction_to_hamming_radius(math.log(p), n)


def log_fraction_to_hamming_radius(log_p: float, n: int) -> int:
    """:func:`fraction_to_hamming_radius` given log p (so p below the float range works)."""
    check_n_d(n, 0)
    if not (log_p <= 0.0):  # also rejects nan
        raise ValueError(f"space fraction p must be in (0, 1], got log p={log_p!r}")
    log_target = log_p + n * math.log(2.0)
    total, comb = 0, 1
    for d in range(n + 1):
        total += comb
        if math.log(total) >= log_target - 1e-12:
            return d
        comb = comb * (n - d) // (d + 1)
    return n


def hamming_radius_to_cosine_threshold(d: int, n: int) -> float:
    """Cosine similarity threshold equivalent to Hamming radius ``d``."""
    check_n_d(n, d)
    return 1.0 - 2.0 * d / n


# --------------------------------------------------------------------------- binary intersection
def intersection_count_lune(n: int, d: int, dv: int) -> int:
    """Exact number of addresses in both radius-``d`` balls whose centres are ``dv`` apart.

    Closed "lune" form (Kanerva 1988, appendix B): ball volume minus the lune of the
    first ball that lies outside the second,
    lune = sum_{odd j <= dv} C(j-1, (j-1)/2) * C(n-j, d-(j-1)/2).
    """
    check_n_d(n, d)
    _check_dv(n, dv)
    lune = 0
    for j in range(1, dv + 1, 2):
        half = (j - 1) // 2
        if d - half >= 0:
            lune += math.comb(j - 1, half) * math.comb(n - j, d - half)
    return ball_volume(n, d) - lune


def intersection_count_double_sum(n: int, d: int, dv: int) -> int:
    """Same count as :func:`intersection_count_lune`, as an interpretable double sum.

    Of the n coordinates, ``dv`` differ between the centres a and b and n - dv agree.
    An address x that flips i of the agreeing and k of the differing coordinates
    (relative to a) is at distance i + k from a and i + dv - k from b, so
    count = sum_{i, k} C(n - dv, i) C(dv, k) [i + k <= d] [i + dv - k <= d].
    """
    check_n_d(n, d)
    _check_dv(n, dv)
    total = 0
    for k in range(dv + 1):
        i_max = min(d - k, d - dv + k, n - dv)
        if i_max < 0:
            continue
        inner = sum(math.comb(n - dv, i) for i in range(i_max + 1))
        total += math.comb(dv, k) * inner
    return total


def log_expected_intersection(
    n: int, d: int, dvs: Iterable[int], r: float | None = None
) -> np.ndarray:
    """log of the expected number of the ``r`` neurons in the ball intersection, per ``dv``.

    Uses the lune form, accumulated over dv so all n + 1 distances cost O(n) big-integer
    steps (:func:`_log_intersections`).  Entries are ``-inf`` where the balls do not intersect (dv > 2d).
    """
    check_n_d(n, d)
    dv_list = [int(v) for v in dvs]
    for dv in dv_list:
        _check_dv(n, dv)
    logs = list(itertools.islice(_log_intersections(n, d, r), max(dv_list, default=0) + 1))
    return np.asarray([logs[dv] for dv in dv_list], dtype=float)


def expected_intersection(
    n: int, d: int, dvs: Iterable[int], r: float | None = None
) -> np.ndarray:
    """Expected number of neurons in the intersection (count * r / 2^n), per ``dv``."""
    return np.exp(log_expected_intersection(n, d, dvs, r))


# --------------------------------------------------------------------------- continuous intersection
def log_cap_fraction(n: int, c: float) -> float:
    """log fraction of S^(n-1) in the cap {x : x.a >= c} (n >= 2)."""
    if n < 2:
        raise ValueError(f"hypersphere caps need n >= 2, got n={n}")
    if c >= 1:
        return -math.inf
    if c <= -1:
        return 0.0
    half = 0.5 * special.betainc((n - 1) / 2.0, 0.5, 1.0 - c * c)
    frac = half if c >= 0 else 1.0 - half
    return math.log(frac) if frac > 0 else -math.inf


def log_cap_intersection(n: int, d: int, cosines: Iterable[float], r: float | None = None) -> np.ndarray:
    """log expected neurons in the intersection of two hypersphere caps (continuous SDM).

    Caps on S^(n-1) have cosine threshold c = 1 - 2d/n (the Hamming radius ``d``
    mapped to a cosine) and are centred on unit vectors with cosine similarity
    ``cosines``.  The intersection fraction is
    int_c^1 f_n(t) P[y.e >= s(t)] dt, with t = x.a distributed as
    f_n(t) ~ (1 - t^2)^((n-3)/2), y uniform on S^(n-2) and
    s(t) = (c - t cos th) / (sqrt(1 - t^2) sin th).  ``r`` neurons are spread
    uniformly over the sphere (``None`` = fraction of the sphere, i.e. r = 1).
    The integral is computed by adaptive quadrature (``scipy.integrate.quad``, relative tolerance
    1e-12, as the original's ``cap_intersection`` uses quad) of the integrand divided by its value
    at the lower limit, so tiny fractions do not underflow; the result agrees with the original's
    to 1e-6 relative or better (tests/test_sdm_reference.py).
    """
    from scipy import integrate

    check_n_d(n, d)
    if n < 3:
        raise ValueError(f"cap intersection needs n >= 3, got n={n}")
    c = hamming_radius_to_cosine_threshold(d, n)
    log_r = 0.0 if r is None else math.log(r)
    log_norm = -special.betaln(0.5, (n - 1) / 2.0)
    lo = max(c, -1.0)
    out = []
    for cv in cosines:
        cv = float(cv)
        if abs(cv) > 1:
            raise ValueError(f"cosine similarities must lie in [-1, 1], got {cv}")
        if cv >= 1 - 1e-12:
            out.append(log_cap_fraction(n, c) + log_r)
            continue
        if cv <= -1 + 1e-12:  # antipodal centres: the band c <= x.a <= -c (empty for c >= 0)
            band = 1.0 - 2.0 * math.exp(log_cap_fraction(n, -c)) if c < 0 else 0.0
            out.append(math.log(band) + log_r if band > 0 else -math.inf)
            continue
        cos_t, sin_t = cv, math.sqrt(max(0.0, 1.0 - cv * cv))

        def log_f(t: float) -> float:
            one_m_t2 = max(1.0 - t * t, 1e-300)
            s = (c - t * cos_t) / (math.sqrt(one_m_t2) * sin_t)
            half = 0.5 * special.betainc((n - 2) / 2.0, 0.5, min(max(1.0 - s * s, 0.0), 1.0))
            cond = half if s >= 0 else 1.0 - half
            return 0.5 * (n - 3) * math.log(one_m_t2) + math.log(cond) if cond > 0 else -math.inf

        # the integrand vanishes below t* where s(t) = 1 (the caps' lune starts there): integrate from there
        ts = np.linspace(lo, 1.0, 2049)[:-1]
        vals = np.array([log_f(t) for t in ts])
        if not np.isfinite(vals).any():
            out.append(-math.inf)
            continue
        first = int(np.argmax(np.isfinite(vals)))
        a = ts[max(first - 1, 0)]
        shift = float(vals[np.isfinite(vals)].max())
        peak = float(ts[int(np.nanargmax(np.where(np.isfinite(vals), vals, -np.inf)))])
        value, _ = integrate.quad(
            lambda t: math.exp(log_f(t) - shift), a, 1.0, points=[peak] if a < peak < 1.0 else None,
            epsabs=0.0, epsrel=1e-12, limit=500,
        )
        out.append(math.log(value) + shift + log_norm + log_r if value > 0 else -math.inf)
    return np.asarray(out, dtype=float)


# --------------------------------------------------------------------------- beta fit
def fit_log_linear(
    x: Sequence[float], y: Sequence[float], convention: FitConvention = "covariance"
) -> tuple[float, float]:
    """Fit log(y) ~ beta * x + bias; return ``(beta, bias)``.

    ``"least_squares"``: ordinary least-squares slope cov(x, log y) / var(x) with
    both moments normalised the same way.  ``"covariance"``: the original analysis'
    ``np.cov(x, log y)[0, 1] / np.var(x)``, whose covariance uses 1/(m-1) and variance
    1/m, so it equals the least-squares slope times m/(m-1) for m fitted points.
    Non-positive y values are dropped (log undefined).
    """
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D and the same length, got {xa.shape} and {ya.shape}")
    keep = ya > 0
    xa, ly = xa[keep], np.log(ya[keep])
    m = xa.size
    if m < 2 or np.ptp(xa) == 0:
        raise ValueError("need at least two distinct x values with positive y to fit beta")
    slope = float(np.sum((xa - xa.mean()) * (ly - ly.mean())) / np.sum((xa - xa.mean()) ** 2))
    if convention == "covariance":
        slope *= m / (m - 1)
    elif convention != "least_squares":
        raise ValueError(f"convention must be 'covariance' or 'least_squares', got {convention!r}")
    return slope, float(ly.mean() - slope * xa.mean())


def fit_beta(
    n: int,
    d: int,
    r: float | None = None,
    dvs: Sequence[int] | None = None,
    convention: FitConvention = "covariance",
    continuous: bool = False,
) -> float:
    """beta of the exponential exp(beta * cosine) fitted to the normalised intersection.

    By default fits Hamming distances dv = 0 .. d-1 (as the original analysis), with
    x = cosine similarity 1 - 2 dv / n and y = the intersection (binary lune, or the
    continuous cap intersection when ``continuous``).  Normalising y only shifts the
    bias, so beta is the same with or without the softmax denominator.
    """
    check_n_d(n, d)
    if dvs is None:
        if d < 2:
            raise ValueError(f"fitting beta needs d >= 2 (dv = 0..d-1 has < 2 points), got d={d}")
        dvs = list(range(d))
    cos = np.asarray(hamming_to_cosine(np.asarray(dvs, dtype=float), n), dtype=float)
    if continuous:
        log_y = log_cap_intersection(n, d, np.minimum(cos, 1 - 1e-12), r)
    else:
        log_y = log_expected_intersection(n, d, dvs, r)
    finite = np.isfinite(log_y)
    # fit on log values directly (avoids underflow of exp for huge n)
    y = np.exp(log_y[finite] - log_y[finite].max())
    beta, _ = fit_log_linear(cos[finite], y, convention)
    return beta


# --------------------------------------------------------------------------- optimal radii
def snr_optimal_probability(m: int, r: float) -> float:
    """Signal-to-noise-optimal activation probability p* = (2 m r)^(-1/3) (Kanerva 1988)."""
    if m < 1 or not (math.isfinite(r) and r > 0):
        raise ValueError(f"need m >= 1 patterns and a finite r > 0 neurons, got m={m}, r={r}")
    return math.exp(log_snr_optimal_probability(m, math.log(r)))


def log_snr_optimal_probability(m: int, log_r: float) -> float:
    """log p* = -(log 2 + log m + log r) / 3, for r beyond the float range (r = 2^n at large n)."""
    if m < 1:
        raise ValueError(f"need m >= 1 patterns, got m={m}")
    return -(math.log(2.0) + math.log(m) + log_r) / 3.0


def snr_optimal_radius(n: int, m: int, r: float | None = None) -> int:
    """Hamming radius whose activation probability first reaches p* (r=None: 2^n)."""
    check_n_d(n, 0)
    return log_fraction_to_hamming_radius(log_snr_optimal_probability(m, log_neuron_count(n, r)), n)


def z_for_whole_pattern(n: int, prob_whole_pattern: float = 0.5) -> float:
    """Per-bit z-score so that all n bits are right with probability ``prob_whole_pattern``."""
    if not 0 < prob_whole_pattern < 1:
        raise ValueError(f"prob_whole_pattern must be in (0, 1), got {prob_whole_pattern}")
    return float(stats.norm.ppf(prob_whole_pattern ** (1.0 / n)))


def memory_capacity(p: float, r: float, z: float) -> float:
    """Patterns storable with per-bit SNR >= z at activation probability ``p``.

    For a query exactly at a stored pattern the signal is p r neurons (variance p r)
    and each of the m other patterns adds noise of variance p^2 r + (p^2 r)^2, so
    SNR^2 = (p r)^2 / (p r + m (p^2 r + p^4 r^2)) >= z^2 gives
    m = ((p r)^2 / z^2 - p r) / (p^2 r + p^4 r^2)  (negative = nothing storable).
    """
    pr = p * r
    return float((pr * pr / (z * z) - pr) / (p * pr + (p * pr) ** 2))


def _log_capacity(log_p: float, log_r: float, z: float) -> tuple[int, float]:
    """:func:`memory_capacity` in log space: ``(sign, log |capacity|)`` (no overflow for r = 2^n, large n)."""
    a = log_p + log_r  # log p r
    b = log_p + a  # log p^2 r
    log_z2 = 2.0 * math.log(abs(z)) if z != 0 else -math.inf
    log_den = float(np.logaddexp(b, 2.0 * b))
    t1, t2 = 2.0 * a - log_z2, a  # (pr)^2 / z^2 and pr
    if t1 == t2:
        return 0, -math.inf
    sign = 1 if t1 > t2 else -1
    hi, lo = max(t1, t2), min(t1, t2)
    return sign, hi + math.log1p(-math.exp(lo - hi)) - log_den


def capacity_optimal_radius(
    n: int, r: float | None = None, prob_whole_pattern: float = 0.5, log10: bool = False
) -> tuple[int, float]:
    """Integer radius maximising :func:`memory_capacity`; returns ``(d, capacity)``.

    Computed in log space, so any n and r work; ``log10=True`` returns log10 of the capacity instead
    (a capacity beyond the float range is then still a finite number). For r = 2^n the curve has a plateau
    flat to the last bit (n = 200: d = 9..15); equal values go to the smallest radius. The float formula
    of earlier versions picked within such plateaus by rounding (n = 200: d = 13)."""
    log_r = log_neuron_count(n, r)
    z = z_for_whole_pattern(n, prob_whole_pattern)
    curve = [_log_capacity(lp, log_r, z) for lp in log_ball_fractions(n)]
    best = max(range(n + 1), key=lambda d: (curve[d][0], curve[d][0] * curve[d][1], -d))  # ties: smallest d
    sign, mag = curve[best]
    if log10:
        return best, (mag / math.log(10.0) if sign > 0 else -math.inf)
    return best, (sign * math.exp(mag) if sign else 0.0)


def log_capacity_optimal_probability(log_r: float, z: float) -> float:
    """log of the activation probability p* where d/dp of :func:`memory_capacity` is 0, in closed form.

    Setting the derivative (-2 r^2 p^3 + 3 r p^2 z^2 + z^2) / (p^2 z^2 (r p^2 + 1)^2) to zero gives the cubic's
    real root p* = (z^(10/3) A^(-1/3) + z^(2/3) A^(1/3) + z^2) / (2 r), A = 2 r + z^4 + 2 sqrt(r^2 + r z^4)
    (the original analysis' ``memory_derivative`` in its Optimal_d notebook, rearranged so that no power of r
    above the first is formed: it holds for r = 2^n at any n).
    """
    if not math.isfinite(log_r):
        raise ValueError(f"log r must be finite, got {log_r}")
    z2 = z * z
    # log A = log r + log(2 + z^4/r + 2 sqrt(1 + z^4/r))
    q = math.exp(2.0 * math.log(abs(z)) * 2.0 - log_r) if z != 0 else 0.0  # z^4 / r
    log_a = log_r + math.log(2.0 + q + 2.0 * math.sqrt(1.0 + q))
    terms = [
        (10.0 / 3.0) * math.log(abs(z)) - log_a / 3.0 if z != 0 else -math.inf,
        (2.0 / 3.0) * math.log(abs(z)) + log_a / 3.0 if z != 0 else -math.inf,
        math.log(z2) if z != 0 else -math.inf,
    ]
    return float(special.logsumexp(terms)) - math.log(2.0) - log_r


def capacity_optimal_radius_closed_form(
    n: int, r: float | None = None, prob_whole_pattern: float = 0.5
) -> tuple[int, float]:
    """The original analysis' memory-capacity-optimal radius: the first radius whose activation probability
    reaches the closed-form optimum p* (:func:`log_capacity_optimal_probability`); returns ``(d, p*)``.

    :func:`capacity_optimal_radius` (the default here) instead takes the integer radius with the largest
    capacity; the two differ by one radius for most (n, r) other than n = 64 (sdm/README.md lists both)."""
    log_r = log_neuron_count(n, r)
    z = z_for_whole_pattern(n, prob_whole_pattern)
    log_p = log_capacity_optimal_probability(log_r, z)
    return log_fraction_to_hamming_radius(min(log_p, 0.0), n), math.exp(log_p)


def prob_neuron_within(n: int, d: int, r: float | None) -> float:
    """Probability that at least one of ``r`` random neurons is within ``d`` of a query (``None``: a neuron at
    every address, so 1)."""
    if r is None:
        return 1.0
    _check_r(r)
    log_p = math.log(ball_volume(n, d)) - n * math.log(2.0)
    if log_p >= 0:
        return 1.0
    return float(-math.expm1(r * math.log1p(-math.exp(log_p))))


def _logaddexp(a: float, b: float) -> float:
    """log(e^a + e^b) for Python floats (np.logaddexp without the array overhead)."""
    hi, lo = (a, b) if a >= b else (b, a)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _read_error_from_log(n: int, m: int, log_signal: float, b: float) -> float:
    """n Phi(-signal / noise) with noise^2 = signal + (m - 1)(b + b^2), b the log noise term, all in log space."""
    log_other = math.log(m - 1) + _logaddexp(b, 2.0 * b) if m > 1 else -math.inf
    log_noise_var = _logaddexp(log_signal, log_other)
    if log_noise_var == -math.inf:
        return n / 2.0
    snr = math.exp(min(log_signal - 0.5 * log_noise_var, 700.0))  # beyond e^700 no bit is wrong anyway
    return n * 0.5 * math.erfc(snr / math.sqrt(2.0))  # n Phi(-snr)


NOISE_TERMS = ("average", "half")


def _log_noise_term(n: int, d: int, r: float | None, noise: str, log_p: float, log_r: float) -> float:
    """log of the neurons one other (random) pattern shares with the query's read ball, the noise term b:
    ``average`` p^2 r (the intersection averaged over the distances of random patterns; the default), or
    ``half`` the expected intersection at distance n/2 (the original analysis' "new approx", its SNR figure)."""
    if noise == "average":
        return 2.0 * log_p + log_r
    if noise == "half":
        return float(log_expected_intersection(n, d, [n // 2], r)[0])
    raise ValueError(f"noise must be one of {NOISE_TERMS}, got {noise!r}")


def read_error_distance(n: int, d: int, m: int, x: int, r: float | None = None, noise: str = "average") -> float:
    """Expected Hamming distance to the target after one read from distance ``x``.

    Signal = expected neurons I(x) shared by the query and target balls; noise
    variance I(x) + (m - 1)(b + b^2) from the other random patterns, b = p^2 r (``noise="average"``) or
    I(n/2) (``noise="half"``, the original's); each bit is wrong with probability Phi(-signal / noise).
    """
    log_r = log_neuron_count(n, r)
    log_p = math.log(ball_volume(n, d)) - n * math.log(2.0)
    log_signal = float(log_expected_intersection(n, d, [x], r)[0])
    return _read_error_from_log(n, m, log_signal, _log_noise_term(n, d, r, noise, log_p, log_r))


def _log_intersections(n: int, d: int, r: float | None, volume: int | None = None):
    """Yield log expected intersection for dv = 0, 1, 2, ..., n (the lune form, one term per step).

    The binomials of the lune, C(j-1, (j-1)/2) and C(n-j, d-(j-1)/2) for odd j, are updated by exact
    integer recurrences rather than recomputed, so the whole sequence costs O(n) big-integer steps.
    ``volume``: the ball volume if the caller has it (it is O(d) binomials to compute)."""
    log_frac = _log_neuron_fraction(n, r)
    volume = ball_volume(n, d) if volume is None else volume
    lune = 0
    yield math.log(volume) + log_frac
    central, side = 1, math.comb(n - 1, d)  # C(0, 0), C(n-1, d): the j = 1 terms
    for j in range(1, n + 1):
        if j % 2 == 1:
            half = (j - 1) // 2
            if side:
                lune += central * side
            # next odd j + 2: C(j+1, half+1) and C(n-j-2, d-half-1)
            central = central * j * (j + 1) // ((half + 1) * (half + 1))
            top, k = n - j, d - half
            side = side * k * (top - k) // (top * (top - 1)) if k >= 1 and top >= 2 else 0
        count = volume - lune
        yield math.log(count) + log_frac if count > 0 else -math.inf


def critical_distance(n: int, d: int, m: int, r: float | None = None, noise: str = "average") -> int:
    """Largest starting distance x for which one read moves the query closer (x' < x).

    Kanerva's critical distance (as the paper defines it): queries started further away diverge. Returns 0
    if even a query 1 bit away is not pulled in. Log space throughout (any n, any r). ``noise``: see
    :func:`read_error_distance`.
    """
    check_n_d(n, d)
    return _critical_distance(n, d, m, r, ball_volume(n, d), noise)


def _critical_distance(n: int, d: int, m: int, r: float | None, volume: int, noise: str = "average") -> int:
    if m < 1:
        raise ValueError(f"need m >= 1 stored patterns, got m={m}")
    log_r = log_neuron_count(n, r)
    log_p = math.log(volume) - n * math.log(2.0)
    b = _log_noise_term(n, d, r, noise, log_p, log_r)
    best = 0
    intersections = _log_intersections(n, d, r, volume)
    next(intersections)  # dv = 0
    for x, log_signal in zip(range(1, n // 2 + 1), intersections):
        if _read_error_from_log(n, m, log_signal, b) < x:
            best = x
        else:
            break
    return best


def _critical_distances_by_radius(n: int, m: int, r: float | None, noise: str):
    """Yield (d, critical distance) for d = 1 .. n/2 (ball volumes updated incrementally)."""
    volume, comb = 1, n  # ball volume of radius d, C(n, d + 1): updated as d grows
    for d in range(1, n // 2 + 1):
        volume += comb
        comb = comb * (n - d) // (d + 1)
        yield d, _critical_distance(n, d, m, r, volume, noise)


def critical_distances(n: int, m: int, r: float | None = None, noise: str = "average", progress=None) -> np.ndarray:
    """Critical distance (:func:`critical_distance`) of every radius d = 1 .. n/2, as an array indexed d - 1."""
    check_n_d(n, 0)
    out = []
    for d, cd in _critical_distances_by_radius(n, m, r, noise):
        out.append(cd)
        if progress is not None:
            progress(d, n // 2)
    return np.asarray(out, dtype=int)


def critical_distance_optimal_radius(
    n: int, m: int, r: float | None = None, progress=None, noise: str = "average"
) -> tuple[int, int]:
    """Radius d (1..n/2) maximising :func:`critical_distance`; returns ``(d, distance)``.

    Ties go to the smallest radius. ``progress``: optional callable ``(done, total)`` for long searches."""
    check_n_d(n, 0)
    best = (1, -1)
    total = n // 2
    for d, cd in _critical_distances_by_radius(n, m, r, noise):
        if cd > best[1]:
            best = (d, cd)
        if progress is not None:
            progress(d, total)
        if cd == total:  # the largest possible distance: no later radius can beat it (ties go to the smallest)
            break
    return best
