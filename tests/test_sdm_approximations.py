"""Approximations of the circle intersection, the SDM book, Jaeckel's design, the softmax beta fit.

Values of the original code come from tests/fixtures/sdm_original/reference.json (see make_reference.py there:
upstream commit, function and parameters of every case).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from columnformer.sdm import approximations as A
from columnformer.sdm import theory as T

REF = json.loads((Path(__file__).parent / "fixtures" / "sdm_original" / "reference.json").read_text())


def test_exponential_approximations_equal_the_original_notebook():
    for case in REF["exp_approx"]["cases"]:
        n, d = case["n"], case["d"]
        for i, dv in enumerate(case["dvs"]):
            low, up = A.log_taylor_bounds(n, d, dv)
            ours = [A.log_largest_term_normal(n, d, dv), A.log_largest_term_taylor(n, d, dv), low, up]
            theirs = [case[k][i] for k in ("normal_approx", "taylor_approx", "taylor_lower", "taylor_upper")]
            assert np.allclose(ours, np.log(theirs), rtol=0, atol=1e-10), (n, d, dv)


def test_book_quantities_equal_the_original():
    for case in REF["book_continuous"]["cases"]:
        ours = A.book_continuous_intersection(case["n"], case["d"], case["dvals"], case["r"])
        assert np.allclose(ours, case["values"], rtol=1e-9, atol=0)
    for case in REF["book_sigma"]["cases"]:
        assert A.kanerva_read_sigma(case["n"], case["d"], case["m"], case["r"]) == pytest.approx(case["sigma"], rel=1e-12)
    for case in REF["interpretable"]["cases"]:  # the original's "interpretable" (Jaeckel-inspired) sum = our double sum
        ours = [T.intersection_count_double_sum(case["n"], case["d"], dv) / 2 ** case["n"] for dv in case["dvals"]]
        theirs = np.nan_to_num(case["values"], nan=0.0)
        assert np.allclose(ours, theirs, rtol=1e-9, atol=0)


def test_book_table_sits_between_the_continuous_approximation_and_the_exact_count():
    rows = A.book_table()
    assert [r["book"] for r in rows] == A.KANERVA_BOOK_TABLE["values"]
    for row in rows:  # n = 1000, d = 451, r = 1e6: exact > book > continuous at every distance, each within 15 %
        assert row["exact"] > row["book"] > row["continuous"]
        assert row["continuous"] / row["exact"] > 0.85
    assert rows[0]["exact"] == pytest.approx(1071.85, abs=0.01)


@pytest.mark.parametrize("n,d", [(64, 11), (100, 35), (301, 120)])
def test_largest_term_bounds_hold_on_the_exact_intersection(n, d):
    for dv in range(0, 2 * d + 1):
        exact = T.log_expected_intersection(n, d, [dv], None)[0] - n * math.log(2)
        low, up = A.log_largest_term_bounds(n, d, dv)
        assert low <= exact + 1e-9 <= up + 2e-9, (dv, low, exact, up)
    assert A.term_count(n, d, 0) == d + 1  # dv = 0: one term per distance 0..d
    assert A.log_largest_term(n, d, 2 * d + 1) == -math.inf and A.term_count(n, d, 2 * d + 2) == 0


def test_taylor_beta_is_the_slope_of_the_taylor_approximation():
    n, d = 1000, 405
    c = [T.hamming_to_cosine(dv, n) for dv in (10, 11)]
    # the Taylor exponent is linear in dv; its slope in cosine units is approx_beta (the constant varies slowly)
    slope = (A._log_taylor_exponent(n, d, 10) - A._log_taylor_exponent(n, d, 11)) / (c[0] - c[1])
    assert slope == pytest.approx(A.approx_beta(n, d), rel=1e-12)
    lo, up = A.log_exponential_bounds(n, d, range(1, 801))
    assert np.all(up > lo)


def test_softmax_beta_fit_equals_the_original_and_beats_the_log_linear_fit_on_its_loss():
    for case in REF["fit_softmax_backprop"]["cases"][:1]:  # n = 100 (the n = 64 case agrees as well; 4 s each)
        n, d, dvs = case["n"], case["d"], case["dvs"]
        y = np.array([T.intersection_count_double_sum(n, d, dv) for dv in dvs], dtype=float)
        cos = T.hamming_to_cosine(np.array(dvs, dtype=float), n)
        beta, loss = A.fit_beta_softmax(cos, y, init=case["init"])
        assert beta == pytest.approx(case["beta"], rel=1e-4)
        target = y / y.sum()

        def mse(b):
            s = np.exp(b * cos - (b * cos).max())
            return float(((target - s / s.sum()) ** 2).mean())

        assert mse(beta) < mse(T.fit_beta(n, d))  # the log-linear beta is not the softmax optimum
        assert loss == pytest.approx(mse(beta), rel=1e-3)
    with pytest.raises(ValueError, match="targets"):
        A.fit_beta_softmax([0.0, 1.0], [0.0, 0.0])


def test_jaeckel_intersection_and_read_noise_match_a_simulation():
    n, q, r, m, trials = 64, 6, 3000, 40, 300
    sim = A.simulate_read(n, r, m, [0, 8, 30], trials, design="jaeckel", q=q, seed=3)
    expect = np.exp(A.jaeckel_log_expected_intersection(n, q, [0, 8, 30], r))
    se = np.sqrt(sim.signal_var / trials)
    assert np.all(np.abs(sim.signal_mean - expect) < 4 * se + 1e-9), (sim.signal_mean, expect)
    var = A.read_noise_variance(n, m, r, "jaeckel", q=q)
    assert np.all(np.abs(sim.noise_var / var - 1) < 4 * math.sqrt(2 / (trials - 1))), (sim.noise_var, var)
    assert sim.other_mean == pytest.approx(r * 4.0**-q, rel=0.1)  # a random pattern: r p^2, p = 2^-q


def test_hamming_read_noise_variance_matches_a_simulation():
    n, d, r, m, trials = 64, 22, 3000, 40, 300
    sim = A.simulate_read(n, r, m, [0, 10], trials, design="hamming", d=d, seed=4)
    expect = T.expected_intersection(n, d, [0, 10], r)
    assert np.all(np.abs(sim.signal_mean - expect) < 4 * np.sqrt(sim.signal_var / trials))
    var = A.read_noise_variance(n, m, r, "hamming", d=d)
    assert np.all(np.abs(sim.noise_var / var - 1) < 4 * math.sqrt(2 / (trials - 1))), (sim.noise_var, var)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="d <= n/2"):
        A.log_largest_term(64, 40, 3)
    with pytest.raises(ValueError, match="dv"):
        A.log_largest_term_taylor(64, 11, 0)
    with pytest.raises(ValueError, match="q"):
        A.jaeckel_log_expected_intersection(64, 0, [1])
    with pytest.raises(ValueError, match="design"):
        A.simulate_read(64, 10, 4, [0], 3, design="other", d=3)


def test_qknorm_learned_betas_sit_between_the_sdm_optima():
    from columnformer.sdm import effective_beta as eb

    betas = eb.qknorm_learned_betas()
    values = [v for vals in betas.values() for v in vals]
    assert len(betas) == 5 and len(values) == 90 and values[0] == pytest.approx(13.2098)
    summary = eb.compare_learned_betas(values)  # n = 64, m = 1024, r = 2^64: the paper's references
    refs = summary["references"]
    assert refs["critical_distance_optimal"][0] == 15 and refs["snr_optimal"][0] == 11 and refs["capacity_optimal"][0] == 5
    assert summary["range"] == pytest.approx((10.11, 35.48), abs=0.01)
    assert summary["in_range"] == 1.0  # every learned beta lies between beta_CD and beta_Mem, as the paper reports
    synthetic = eb.compare_learned_betas([5.0, 20.0, 40.0])
    assert synthetic["below"] == synthetic["in_range"] == synthetic["above"] == pytest.approx(1 / 3)
