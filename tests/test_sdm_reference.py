"""columnformer.sdm against values computed by the SDM paper's own code (tests/fixtures/sdm_original/reference.json,
made by make_reference.py from TrentBrick/attention-approximates-sdm at the commit recorded there)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from columnformer.sdm import memories as mem
from columnformer.sdm import theory

REF = json.loads((Path(__file__).parent / "fixtures" / "sdm_original" / "reference.json").read_text())


def test_reference_is_from_the_recorded_commit():
    assert REF["commit"] == "4cb44d825408a2e5af488ef166a9aa82ad2a2b31"


@pytest.mark.parametrize("case", [c for c in REF["cap_intersection"]["cases"] if c["n"] <= 256], ids=lambda c: f"n{c['n']}")
def test_continuous_cap_beta_matches_the_original_quadrature_to_1e6(case):
    n, d = case["n"], case["d"]
    assert theory.fit_beta(n, d, continuous=True) == pytest.approx(case["beta"], rel=1e-6)
    ours = theory.log_cap_intersection(n, d, case["cosines"])
    np.testing.assert_allclose(ours - ours[0], case["log_intersection_minus_first"], rtol=0, atol=1e-5)


def test_continuous_cap_at_n1000_is_closer_to_a_fine_grid_than_the_original():
    """At n = 1000 the original's quad on the raw integrand loses accuracy (4.9e-3 in log at the farthest cosine;
    beta 5.9e-5 relative): a 200,001-point trapezoid agrees with our adaptive quadrature, not with it."""
    from scipy import special

    case = next(c for c in REF["cap_intersection"]["cases"] if c["n"] == 1000)
    n, d = case["n"], case["d"]
    i = len(case["cosines"]) - 1  # the farthest cosine, where the original is off most

    def grid(cv, points=200_001):
        c = 1 - 2 * d / n
        t = np.linspace(c, 1, points)[:-1]
        s = (c - t * cv) / (np.sqrt(1 - t * t) * math.sqrt(1 - cv * cv))
        half = 0.5 * special.betainc((n - 2) / 2, 0.5, np.clip(1 - s * s, 0, 1))
        with np.errstate(divide="ignore"):
            lf = 0.5 * (n - 3) * np.log(1 - t * t) + np.log(np.where(s >= 0, half, 1 - half))
        return special.logsumexp(lf)

    cos = case["cosines"]
    fine = grid(cos[i]) - grid(cos[1])
    ours = np.diff(theory.log_cap_intersection(n, d, [cos[1], cos[i]]))[0]
    theirs = case["log_intersection_minus_first"][i] - case["log_intersection_minus_first"][1]
    assert abs(ours - fine) < 1e-3 < abs(theirs - fine)  # the grid itself is good to ~2e-4 here


@pytest.mark.parametrize("case", REF["expected_intersection_lune"]["cases"], ids=lambda c: f"n{c['n']}")
def test_lune_intersections_equal_the_original(case):
    """Ours sums exact integers; the original subtracts float binomials (scipy comb): they agree to its round-off
    (1e-6) while the intersection is above ~1e-8 of the ball; further out its difference cancels to nothing
    (n = 256, dv = 100: it returns 0, the exact value is 2.2e44 = 7e-16 of the ball)."""
    ours = theory.expected_intersection(case["n"], case["d"], case["dvals"], None)
    theirs = np.asarray(case["values"])
    big = theirs > 1e-8 * theirs[0]
    np.testing.assert_allclose(ours[big], theirs[big], rtol=1e-6)
    assert (ours[~big] >= 0).all() and (ours[~big] < 1e-8 * ours[0]).all()


@pytest.mark.parametrize("case", REF["space_frac_to_hamm_radius"]["cases"], ids=lambda c: f"n{c['n']}")
def test_space_fraction_radii_equal_the_original(case):
    assert [theory.fraction_to_hamming_radius(p, case["n"]) for p in case["fractions"]] == case["radii"]


@pytest.mark.parametrize("case", REF["capacity_closed_form"]["cases"], ids=lambda c: f"n{c['n']}-r{c['r']:.0e}")
def test_closed_form_capacity_optimum_equals_the_original(case):
    n, r = case["n"], case["r"]
    d, p = theory.capacity_optimal_radius_closed_form(n, r)
    assert p == pytest.approx(case["optimal_p"], rel=1e-12)
    assert d == case["optimal_d"]
    assert abs(d - theory.capacity_optimal_radius(n, r)[0]) <= 1  # the argmax default: the same or one radius less


def test_floor_option_maps_cosines_like_the_original():
    ref = REF["cosine_to_hamm"]
    n, cos = ref["n"], torch.tensor(ref["cosines"], dtype=torch.float64)
    patterns = torch.nn.functional.normalize(torch.randn(1, n, dtype=torch.float64), dim=1)
    memory = mem.PatternSDM(patterns.float(), 20, None, binary=False, hamming="floor")
    # the memory's map applied to the reference cosines (its weights read table[h])
    h_floor = torch.floor(n * (1 - cos) / 2 + 1e-6).long()
    assert h_floor.tolist() == [int(x) for x in ref["hamms"]]
    rounded = torch.round(n * (1 - cos) / 2).long()
    assert (rounded != h_floor).any()  # the two options differ on these cosines
    q = torch.nn.functional.normalize(patterns + 0.3 * torch.randn_like(patterns), dim=1).float()
    c = float((q @ memory.patterns.T).squeeze())
    expected = memory.table[int(math.floor(n * (1 - c) / 2 + 1e-6))]
    assert float(memory.weights(q).squeeze()) == pytest.approx(float(expected))


def test_half_distance_noise_term_is_the_originals_snr_noise():
    """noise='half': one other pattern adds the expected intersection at distance n/2 (the original's SNR figure,
    Compute_Difference_In_Circle_Intersects: sigma^2 = I(dv) + (m - 1)(I(n/2) + I(n/2)^2), I from its lune)."""
    case = next(c for c in REF["expected_intersection_lune"]["cases"] if c["n"] == 100 and c["d"] == 35)
    n, d, m, r = 100, 35, 10_000, None  # m chosen so the SNR is ~2.5: read errors of a few bits
    i_half = case["values"][case["dvals"].index(50)]
    log_p = math.log(theory.ball_volume(n, d)) - n * math.log(2.0)
    b = theory._log_noise_term(n, d, r, "half", log_p, theory.log_neuron_count(n, r))
    assert math.exp(b) == pytest.approx(i_half, rel=1e-6)
    signal = case["values"][case["dvals"].index(10)]
    snr = signal / math.sqrt(signal + (m - 1) * (i_half + i_half**2))
    expected = n * 0.5 * math.erfc(snr / math.sqrt(2))
    assert theory.read_error_distance(n, d, m, 10, r, noise="half") == pytest.approx(expected, rel=1e-5)
    assert theory.read_error_distance(n, d, m, 10, r, noise="average") != pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="noise must be one of"):
        theory.read_error_distance(n, d, m, 10, r, noise="bogus")
