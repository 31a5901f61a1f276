"""Geometry: coordinates, distances, the wiring normaliser and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from columnformer.geometry import GREAT_CIRCLE, Geometry, GeometryError, from_coords, grid, sphere, stacked


# ------------------------------------------------------------------ grid
@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (3, 2), (1, 5), (4, 7)])
def test_grid_shape_and_row_major_order(h, w):
    g = grid(h, w)
    assert g.n == h * w
    assert g.layer_shapes == ((h, w),)
    assert g.num_layers == 1
    # column index = row * w + col, coordinates (row, col)
    for idx in range(g.n):
        np.testing.assert_array_equal(g.coords[idx], [idx // w, idx % w])


def test_grid_hand_distances_non_square():
    g = grid(2, 3)
    d = g.distances(torch.float64)
    assert d.shape == (6, 6)
    assert d[0, 5].item() == pytest.approx(math.sqrt(1 + 4))  # (0,0) -> (1,2)
    assert d[0, 2].item() == pytest.approx(2.0)  # along a row
    assert d[1, 4].item() == pytest.approx(1.0)  # straight down
    assert torch.allclose(d, d.T)
    assert torch.all(d.diagonal() == 0)
    # pair_distances agrees with the dense matrix
    i, j = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    np.testing.assert_allclose(g.pair_distances(i, j), d.numpy(), atol=1e-12)


def test_grid_square_default():
    assert grid(3).n == 9 and grid(3).layer_shapes == ((3, 3),)


# ------------------------------------------------------------------ stacked
def test_stacked_different_layer_sizes_hand_values():
    g = stacked([(4, 4), (2, 2)], spacing=2.0)
    assert g.n == 20
    assert g.num_layers == 2
    assert g.layer_shapes == ((4, 4), (2, 2))
    np.testing.assert_array_equal(g.layer, [0] * 16 + [1] * 4)
    np.testing.assert_array_equal(g.layer_indices(0), np.arange(16))
    np.testing.assert_array_equal(g.layer_indices(-1), np.arange(16, 20))
    # every layer centred over the same point
    for i in range(2):
        np.testing.assert_allclose(g.coords[g.layer == i, :2].mean(0), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(g.coords[:, 2], [0.0] * 16 + [2.0] * 4)
    # bottom layer coordinates run -1.5..1.5, top layer -0.5..0.5
    np.testing.assert_allclose(g.coords[0], [-1.5, -1.5, 0.0])
    np.testing.assert_allclose(g.coords[15], [1.5, 1.5, 0.0])
    np.testing.assert_allclose(g.coords[16], [-0.5, -0.5, 2.0])
    np.testing.assert_allclose(g.coords[19], [0.5, 0.5, 2.0])
    d = g.distances(torch.float64)
    # column 5 = bottom (row 1, col 1) = (-0.5, -0.5, 0) sits directly below column 16
    assert d[5, 16].item() == pytest.approx(2.0)
    # corner of the bottom to first column of the top: sqrt(1 + 1 + 4)
    assert d[0, 16].item() == pytest.approx(math.sqrt(6.0))
    # opposite corner to the same column: sqrt(2^2 + 2^2 + 2^2)
    assert d[15, 16].item() == pytest.approx(math.sqrt(12.0))
    # within-layer distances are the grid's
    assert d[16, 19].item() == pytest.approx(math.sqrt(2.0))
    assert d[0, 1].item() == pytest.approx(1.0)


def test_stacked_int_layers_and_spacing():
    g = stacked([3, 3, 3], spacing=1.5)
    assert g.layer_shapes == ((3, 3),) * 3
    assert g.n == 27
    # the centre column of every layer sits on the z axis
    centres = [4, 13, 22]
    np.testing.assert_allclose(g.coords[centres], [[0, 0, 0], [0, 0, 1.5], [0, 0, 3.0]])
    assert g.pair_distances(4, 22) == pytest.approx(3.0)


# ------------------------------------------------------------------ sphere
@pytest.mark.parametrize("n", [12, 100, 500])
def test_sphere_points_on_radius(n):
    g = sphere(n)
    r = math.sqrt(n / (4 * math.pi))
    assert g.metric == GREAT_CIRCLE
    assert g.radius == pytest.approx(r)
    np.testing.assert_allclose(np.linalg.norm(g.coords, axis=1), r, rtol=1e-12)
    assert g.n == n


def test_sphere_explicit_radius():
    g = sphere(50, radius=3.0)
    np.testing.assert_allclose(np.linalg.norm(g.coords, axis=1), 3.0, rtol=1e-12)


def test_sphere_nearest_neighbour_spacing_about_one():
    g = sphere(400)
    d = g.distances(torch.float64)
    d.fill_diagonal_(float("inf"))
    nn_dist = d.min(dim=1).values
    assert 0.8 < nn_dist.median().item() < 1.25
    assert nn_dist.min().item() > 0.5  # no clumps


def test_great_circle_hand_values():
    r = 2.5
    coords = np.array([[r, 0, 0], [-r, 0, 0], [0, r, 0], [0, 0, r]], dtype=float)
    g = Geometry(coords, metric=GREAT_CIRCLE, radius=r)
    d = g.distances(torch.float64)
    assert d[0, 1].item() == pytest.approx(math.pi * r)  # antipodal
    assert d[0, 2].item() == pytest.approx(math.pi * r / 2)  # quarter circle
    assert d[2, 3].item() == pytest.approx(math.pi * r / 2)
    assert g.pair_distances(0, 1) == pytest.approx(math.pi * r)


def test_sphere_distances_are_great_circle_not_chord():
    g = sphere(64)
    rng = np.random.default_rng(1)
    i, j = rng.integers(0, 64, 50), rng.integers(0, 64, 50)
    a, b = g.coords[i], g.coords[j]
    ang = np.arccos(np.clip((a * b).sum(1) / g.radius**2, -1, 1))
    np.testing.assert_allclose(g.pair_distances(i, j), g.radius * ang, atol=1e-9)
    np.testing.assert_allclose(g.distances(torch.float64).numpy()[i, j], g.radius * ang, atol=1e-6)
    chord = np.linalg.norm(a - b, axis=1)
    far = chord > 1.0
    assert np.all(g.pair_distances(i, j)[far] > chord[far])  # arc longer than chord


# ------------------------------------------------------------------ from_coords
@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_from_coords_any_dimension(dim):
    rng = np.random.default_rng(dim)
    c = rng.normal(size=(7, dim))
    g = from_coords(c)
    assert g.n == 7 and g.coords.shape == (7, dim)
    ref = np.linalg.norm(c[:, None, :] - c[None, :, :], axis=-1)
    np.testing.assert_allclose(g.distances(torch.float64).numpy(), ref, atol=1e-9)


def test_from_coords_1d_list():
    g = from_coords([0.0, 1.0, 3.0])
    assert g.coords.shape == (3, 1)
    np.testing.assert_allclose(g.distances(torch.float64).numpy(), [[0, 1, 3], [1, 0, 2], [3, 2, 0]])


# ------------------------------------------------------------------ normaliser
def test_mean_distance_power_hand_value():
    g = from_coords([[0.0], [1.0], [3.0]])
    # all 9 ordered pairs, diagonal included: 2 * (1 + 3 + 2) / 9
    assert g.mean_distance_power(1.0) == pytest.approx(12 / 9)
    assert g.mean_distance_power(2.0) == pytest.approx(2 * (1 + 9 + 4) / 9)


def _exact_mean_pow(coords: np.ndarray, p: float) -> float:
    c = torch.from_numpy(coords)
    total = 0.0
    for start in range(0, len(c), 512):
        total += (torch.cdist(c[start : start + 512], c) ** p).sum().item()
    return total / len(c) ** 2


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_mean_distance_power_sampled_close_to_exact_for_large_n(p):
    g = grid(70, 70)  # 4900 columns > exact limit: sampled
    exact = _exact_mean_pow(g.coords, p)
    if p == 2.0:  # closed form: mean |a - b|^2 = 2 * sum of per-axis variances
        assert exact == pytest.approx(2 * g.coords.var(axis=0).sum(), rel=1e-9)
    sampled = g.mean_distance_power(p)
    assert sampled == pytest.approx(exact, rel=0.01)
    # seeded: a fresh equal geometry gives exactly the same number
    assert grid(70, 70).mean_distance_power(p) == sampled


def test_mean_distance_power_exact_path_matches_reference():
    g = stacked([(5, 5), (3, 3)], spacing=2.0)
    assert g.mean_distance_power(1.0) == pytest.approx(_exact_mean_pow(g.coords, 1.0), rel=1e-12)
    assert g.mean_distance_power(0.5) == pytest.approx(_exact_mean_pow(g.coords, 0.5), rel=1e-12)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "build",
    [
        lambda: sphere(0),
        lambda: sphere(-3),
        lambda: grid(0, 4),
        lambda: grid(3, 0),
        lambda: stacked([]),
        lambda: stacked([(2, 2), (0, 2)]),
        lambda: from_coords(np.zeros((0, 2))),
    ],
)
def test_empty_geometries_raise(build):
    with pytest.raises(GeometryError):
        build()


def test_nan_and_inf_coords_raise_clear_error():
    with pytest.raises(GeometryError, match="NaN"):
        from_coords([[0.0, 1.0], [float("nan"), 0.0]])
    with pytest.raises(GeometryError, match="NaN or infinite"):
        from_coords([[0.0], [float("inf")]])


def test_mismatched_layer_labels_raise():
    with pytest.raises(GeometryError, match="one per column"):
        from_coords([[0.0], [1.0], [2.0]], layer=np.array([0, 1]))


def test_bad_metric_spacing_radius_raise():
    with pytest.raises(GeometryError, match="metric"):
        Geometry(np.zeros((2, 2)), metric="manhattan")
    with pytest.raises(GeometryError, match="spacing"):
        stacked([(2, 2)], spacing=0.0)
    with pytest.raises(GeometryError, match="radius"):
        sphere(10, radius=-1.0)


def test_coincident_columns_make_wiring_cost_undefined():
    with pytest.raises(GeometryError, match="coincide"):
        from_coords([[1.0, 1.0], [1.0, 1.0]]).mean_distance_power()


def test_geometry_is_frozen():
    g = grid(2, 2)
    with pytest.raises(Exception):
        g.metric = GREAT_CIRCLE  # type: ignore[misc]


def test_nearest_neighbour_spacing_within_layers():
    from columnformer.geometry import nearest_neighbour_spacing

    g = grid(4, 4).coords
    coords = np.concatenate([np.c_[g, np.zeros(16)], np.c_[g, np.full(16, 0.25)]])  # two layers 0.25 apart
    layer = np.repeat([0, 1], 16)
    assert nearest_neighbour_spacing(coords, layer) == 1.0  # within a layer
    assert nearest_neighbour_spacing(coords) == 0.25  # the other layer is nearer
    assert nearest_neighbour_spacing(2.0 * grid(6, 6).coords, sample=5) == 2.0
    assert nearest_neighbour_spacing(np.zeros((1, 2))) == 1.0
