"""Exact SDM theory: hand-checked beta values, intersection identities, optimal radii."""

import math

import numpy as np
import pytest

from columnformer.sdm import theory

N64_COV = {5: 35.48, 9: 20.04, 11: 15.85, 15: 10.11}
N64_LSQ = {5: 28.39, 9: 17.81, 11: 14.41, 15: 9.44}


@pytest.mark.parametrize("d", sorted(N64_COV))
def test_beta_n64_both_conventions(d):
    cov = theory.fit_beta(64, d, r=2**64, convention="covariance")
    lsq = theory.fit_beta(64, d, r=2**64, convention="least_squares")
    assert cov == pytest.approx(N64_COV[d], abs=0.006)
    assert lsq == pytest.approx(N64_LSQ[d], abs=0.006)
    assert cov / lsq == pytest.approx(d / (d - 1), rel=1e-12)  # m = d fitted points


def test_beta_independent_of_neuron_count_and_normalisation():
    assert theory.fit_beta(64, 11, r=1e6) == pytest.approx(theory.fit_beta(64, 11), rel=1e-12)


def test_intersection_at_zero_is_ball_volume():
    vol = sum(math.comb(64, i) for i in range(12))
    assert theory.intersection_count_lune(64, 11, 0) == vol
    assert theory.intersection_count_double_sum(64, 11, 0) == vol
    got = theory.expected_intersection(64, 11, [0], r=1e6)[0]
    assert got == pytest.approx(vol * 1e6 / 2**64, rel=1e-12)


def test_lune_equals_double_sum_exhaustively():
    for n in range(1, 13):
        for d in range(n + 1):
            for dv in range(n + 1):
                assert theory.intersection_count_lune(n, d, dv) == theory.intersection_count_double_sum(n, d, dv)
    for d, dv in [(5, 3), (11, 7), (15, 20), (30, 64)]:
        assert theory.intersection_count_lune(64, d, dv) == theory.intersection_count_double_sum(64, d, dv)


def test_intersection_matches_brute_force_small_space():
    n, d, dv = 8, 3, 4
    a = np.zeros(n, dtype=int)
    b = np.r_[np.ones(dv, dtype=int), np.zeros(n - dv, dtype=int)]
    pts = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    both = ((pts != a).sum(1) <= d) & ((pts != b).sum(1) <= d)
    assert theory.intersection_count_lune(n, d, dv) == int(both.sum())


def test_intersection_empty_beyond_2d():
    assert theory.intersection_count_lune(64, 5, 11) == 0
    assert theory.intersection_count_lune(64, 5, 10) > 0
    assert np.isneginf(theory.log_expected_intersection(64, 5, [11])[0])


def test_snr_optimal_probability_and_radius():
    m, r = 60000, 2.0**64
    assert theory.snr_optimal_probability(m, r) == pytest.approx((2 * m * r) ** (-1 / 3), rel=1e-12)
    assert theory.snr_optimal_probability(m, r) == pytest.approx(7.673e-9, rel=1e-3)
    assert theory.snr_optimal_radius(64, m) == 10  # value of the original notebook


def test_capacity_optimal_radius_n64():
    d, cap = theory.capacity_optimal_radius(64)
    assert d == 5  # value of the original notebook (p ~ 2e-13 -> d = 5)
    p = theory.hamming_radius_to_fraction(5, 64)
    assert cap == pytest.approx(theory.memory_capacity(p, 2.0**64, theory.z_for_whole_pattern(64)))


def test_critical_distance_is_2d_with_all_neurons_and_small_radius():
    # with r = 2^n the signal only vanishes once the balls stop intersecting (x > 2d)
    assert theory.critical_distance(64, 5, 1024) == 10
    # a crowded memory (huge m, wide radius) has a smaller critical distance
    assert theory.critical_distance(64, 27, 10**6, r=1e5) < theory.critical_distance(64, 15, 1024)


def test_conversions():
    assert theory.hamming_to_cosine(16, 64) == pytest.approx(0.5)
    assert theory.cosine_to_hamming(0.5, 64) == pytest.approx(16)
    assert theory.fraction_to_hamming_radius(1e-13, 64) == 5
    d = theory.fraction_to_hamming_radius(0.1, 64)
    assert theory.hamming_radius_to_fraction(d, 64) >= 0.1 > theory.hamming_radius_to_fraction(d - 1, 64)
    assert theory.hamming_radius_to_fraction(64, 64) == pytest.approx(1.0)


def test_prob_neuron_within():
    p = theory.hamming_radius_to_fraction(11, 64)
    assert theory.prob_neuron_within(64, 11, 1) == pytest.approx(p, rel=1e-9)
    assert theory.prob_neuron_within(64, 11, 1e6) == pytest.approx(1 - (1 - p) ** 1e6, rel=1e-9)
    assert theory.prob_neuron_within(64, 20, 1e6) == pytest.approx(1.0)


def test_cap_intersection_matches_monte_carlo():
    rng = np.random.default_rng(0)
    n, d = 8, 2
    x = rng.standard_normal((200_000, n))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = theory.hamming_radius_to_cosine_threshold(d, n)
    for cv in (1.0, 0.8, 0.4):
        b = np.zeros(n)
        b[0], b[1] = cv, math.sqrt(1 - cv * cv)
        mc = ((x[:, 0] >= c) & (x @ b >= c)).mean()
        got = math.exp(theory.log_cap_intersection(n, d, [cv])[0])
        assert got == pytest.approx(mc, abs=4 * math.sqrt(mc / 200_000) + 1e-4)
    assert math.exp(theory.log_cap_intersection(n, d, [1.0])[0]) == pytest.approx(math.exp(theory.log_cap_fraction(n, c)))


def test_fit_log_linear_recovers_exact_exponential():
    x = np.linspace(0.2, 1.0, 9)
    beta, bias = theory.fit_log_linear(x, np.exp(7.0 * x - 1.0), "least_squares")
    assert beta == pytest.approx(7.0) and bias == pytest.approx(-1.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="0 <= d <= n"):
        theory.fit_beta(64, 70)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        theory.ball_volume(0, 0)
    with pytest.raises(ValueError, match="convention"):
        theory.fit_beta(64, 5, convention="bogus")
    with pytest.raises(ValueError, match="d >= 2"):
        theory.fit_beta(64, 1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        theory.fraction_to_hamming_radius(0.0, 64)
    with pytest.raises(ValueError, match="r must be a finite number > 0"):
        theory.expected_intersection(64, 5, [0], r=-1)


def test_cap_intersection_of_antipodal_centres_is_the_band_between_them():
    # n = 3: x.a is uniform on [-1, 1]; caps x.a >= c and x.(-a) >= c share the band c <= x.a <= -c
    n, d = 3, 2  # c = 1 - 2d/n = -1/3: the band has width 2/3, a third of the sphere
    for cv in (-1.0, -1 + 1e-13):
        assert math.exp(theory.log_cap_intersection(n, d, [cv])[0]) == pytest.approx(1 / 3, rel=1e-9)
    assert theory.log_cap_intersection(64, 11, [-1.0])[0] == -math.inf  # c > 0: no band


def test_critical_distance_curve_equals_the_per_radius_function_and_the_optimum():
    n, m = 64, 1024
    curve = theory.critical_distances(n, m)
    assert len(curve) == n // 2
    assert [theory.critical_distance(n, d, m) for d in range(1, n // 2 + 1)] == curve.tolist()
    d_best, cd_best = theory.critical_distance_optimal_radius(n, m)
    assert (d_best, cd_best) == (int(curve.argmax()) + 1, int(curve.max())) == (15, 24)
    from columnformer.sdm import critical

    rows = critical.critical_distance_table([n], [m], [None, 1e6])
    best = {r["r"]: (r["d"], r["critical_distance"]) for r in critical.summary(rows)}
    assert best[None] == (15, 24) and best[1e6] == theory.critical_distance_optimal_radius(n, m, 1e6)
