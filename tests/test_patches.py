"""Category t-maps and patch detection (issue 14) on constructed maps and on any geometry."""

from __future__ import annotations

import numpy as np
import pytest

from columnformer import geometry as geo
from columnformer.analysis.patches import category_patches, detect_patches, welch_t_from_stats
from columnformer.analysis.topography import ResponseStats


def _discs(g, centres, radius, height=8.0):
    values = np.zeros(g.n)
    for c in centres:
        values[np.linalg.norm(g.coords[:, :2] - np.asarray(c), axis=1) <= radius] = height
    return values


def test_known_patches_are_found_with_their_size_and_position():
    g = geo.grid(32, 32)
    mid = g.coords.mean(0)
    centres = [tuple(mid + (-8.0, -8.0)), tuple(mid + (7.5, 9.5))]
    values = _discs(g, centres, 3.0) + np.random.default_rng(0).normal(0, 1, g.n)
    res = detect_patches(values, g, threshold=3.0, sigma=1.0)
    assert res["count"] == 2
    truth = [int((np.linalg.norm(g.coords - np.asarray(c), axis=1) <= 3.0).sum()) for c in centres]
    for p in res["patches"]:
        k = int(np.argmin([np.linalg.norm(np.asarray(p["centroid"]) - np.asarray(c)) for c in centres]))
        assert np.linalg.norm(np.asarray(p["centroid"]) - np.asarray(centres[k])) < 1.0
        assert 0.6 * truth[k] <= p["size"] <= 1.6 * truth[k]


@pytest.mark.parametrize("g", [geo.grid(32, 32), geo.stacked([(16, 16), (16, 16)]), geo.sphere(600)])
def test_no_patches_on_noise(g):
    values = np.random.default_rng(1).normal(0, 1, g.n)
    assert detect_patches(values, g, threshold=3.0, sigma=1.0 if g.metric == "euclidean" else 0.15)["count"] == 0


def test_patches_stay_in_their_layer_of_a_stack():
    g = geo.stacked([(12, 12), (12, 12)], spacing=1.0)  # layers 1 apart: neighbours across layers too
    values = np.zeros(g.n)
    g12 = geo.grid(12, 12)
    values[:144] = _discs(g12, [tuple(g12.coords.mean(0))], 2.5)
    values[144:] = _discs(g12, [tuple(g12.coords.mean(0))], 2.5)
    res = detect_patches(values, g, threshold=3.0, sigma=0.0)
    assert res["count"] == 2 and sorted(p["layer"] for p in res["patches"]) == [0, 1]


def test_welch_t_from_streamed_stats_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 200)
    r = rng.normal(0, 1, (200, 5)) + (y == 1)[:, None] * np.array([2.0, 0, 0, -1.0, 0])
    s = ResponseStats.from_arrays(r, y, 3)
    t = welch_t_from_stats(s.count, s.sum, s.sumsq)
    for c in range(3):
        ref = stats.ttest_ind(r[y == c], r[y != c], equal_var=False).statistic
        assert np.allclose(t[c], ref, rtol=1e-9)
    summary, tmap = category_patches(s.count, s.sum, s.sumsq, geo.grid(1, 5), sigma=0.0, min_size=1)
    assert tmap.shape == (3, 5) and summary["1"]["count"] >= 1


def test_smoothness_curve_has_a_shuffled_null_band():
    from columnformer.analysis.topography import smoothness

    g = geo.grid(16, 16)
    smooth_profiles = np.stack([np.sin(g.coords[:, 0] / 3), np.cos(g.coords[:, 1] / 3), g.coords.sum(1) / 30], 1)
    res = smoothness(smooth_profiles, g, n_shuffles=10, bins=6)
    null, prof = res["shuffled_profile"], res["profile"]
    assert len(null["mean"]) == len(prof["mean"]) == 6
    # a smooth map: near pairs are more similar than the shuffled null allows; the null is flat-ish
    assert prof["mean"][0] > null["hi"][0]
    assert np.nanmax(null["mean"]) - np.nanmin(null["mean"]) < prof["mean"][0] - np.nanmin(prof["mean"])
