"""Analysis metrics on small constructed cases with known answers."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from columnformer.analysis.connectivity import (
    attention_vs_distance,
    layer_flow,
    locality_index,
    top_incoming,
    wiring_length,
)
from columnformer.analysis.graph import modularity, small_world, strong_graph, strong_graph_summary
from columnformer.analysis.layout import sheet_layout
from columnformer.analysis.topography import (
    ResponseStats,
    dprime,
    sample_pairs,
    smoothness,
    weight_similarity,
)
from columnformer.connectivity import Connectivity
from columnformer.geometry import from_coords, grid, sphere, stacked


def _neighbour_attention(g, radius: float) -> np.ndarray:
    """Dense (1, N, N) attention uniform over the columns within ``radius`` (self included)."""
    d = g.distances(torch.float64).numpy()
    a = (d <= radius + 1e-9).astype(float)
    return (a / a.sum(1, keepdims=True))[None]


# ---------------------------------------------------------------------- connectivity
def test_locality_is_one_for_neighbour_only_attention_dense_and_sparse():
    g = grid(5, 7)
    d = g.distances(torch.float64).numpy()
    a = _neighbour_attention(g, 1.0)
    assert locality_index(a, d, radius=1.0)[0] == pytest.approx(1.0)
    assert locality_index(a, d, radius=1.5)[0] == pytest.approx(1.0)
    assert locality_index(a, d, radius=0.5)[0] < 0.5  # only the self edge is that close
    # the same attention stored as a sparse (N, K) edge list
    conn = Connectivity.local(g, 9)
    idx, mask = conn.index.numpy(), conn.mask.numpy()
    ds = conn.dist.double().numpy()
    w = np.where(mask & (ds <= 1.0 + 1e-9), 1.0, 0.0)
    w = (w / w.sum(1, keepdims=True))[None]
    assert locality_index(w, ds, 1.0, mask)[0] == pytest.approx(1.0)
    assert wiring_length(w, ds, mask)[0] == pytest.approx(wiring_length(a, d)[0])


def test_wiring_length_known_value():
    # every column attends only to its right-hand neighbour (distance 1) or itself at the edge
    g = grid(3, 4)
    n = g.n
    a = np.zeros((1, n, n))
    for i in range(n):
        r, c = divmod(i, 4)
        a[0, i, i + 1 if c < 3 else i] = 1.0
    d = g.distances(torch.float64).numpy()
    assert wiring_length(a, d)[0] == pytest.approx(9 / 12)  # 9 columns travel 1, 3 stay
    prof = attention_vs_distance(torch.tensor(a), d, bins=np.array([0, 0.5, 1.5, 10]))
    np.testing.assert_allclose(prof["mass"][0], [3 / 12, 9 / 12, 0])


def _flow_case():
    g = stacked([(2, 2), (2, 2), (3, 3)])
    layer = g.layer
    first = [int(np.flatnonzero(layer == L)[0]) for L in range(3)]
    n = g.n
    a = np.zeros((1, n, n))
    for q in range(n):
        L = layer[q]
        if L == 0:
            a[0, q, q], a[0, q, first[1]] = 0.7, 0.3
        elif L == 1:
            a[0, q, first[0]], a[0, q, q], a[0, q, first[2]] = 0.5, 0.3, 0.2
        else:
            a[0, q, first[1]], a[0, q, q] = 0.6, 0.4
    expected = {
        "feedforward": (4 * 0.5 + 9 * 0.6) / 17,
        "lateral": (4 * 0.7 + 4 * 0.3 + 9 * 0.4) / 17,
        "feedback": (4 * 0.3 + 4 * 0.2) / 17,
    }
    return g, a, expected


def test_layer_flow_on_hand_built_stacked_attention():
    g, a, expected = _flow_case()
    src = np.broadcast_to(np.arange(g.n)[None], (g.n, g.n))
    f = layer_flow(a, g.layer, src)
    for k, v in expected.items():
        assert f[k][0] == pytest.approx(v), k
    assert f["matrix"][0].sum() == pytest.approx(1.0)
    # query layer 1 reads layer 0 / itself / layer 2 with 0.5 / 0.3 / 0.2
    np.testing.assert_allclose(f["row_normalised"][0][1], [0.5, 0.3, 0.2])
    np.testing.assert_allclose(f["row_normalised"][0][0], [0.7, 0.3, 0.0])


def test_layer_flow_sparse_matches_dense():
    g, a, expected = _flow_case()
    K = 3
    idx = np.zeros((g.n, K), dtype=np.int64)
    w = np.zeros((1, g.n, K))
    mask = np.zeros((g.n, K), dtype=bool)
    for q in range(g.n):
        nz = np.flatnonzero(a[0, q])
        idx[q, : len(nz)], w[0, q, : len(nz)], mask[q, : len(nz)] = nz, a[0, q, nz], True
        idx[q, len(nz):] = q  # padding points at the column itself, weight 0
    f = layer_flow(w, g.layer, idx, mask)
    for k, v in expected.items():
        assert f[k][0] == pytest.approx(v), k


def test_top_incoming_dense_and_sparse():
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.random((2, 6, 6)), dtype=torch.float32)
    src = np.broadcast_to(np.arange(6)[None], (6, 6))
    s, w = top_incoming(a, src, m=3)
    ref = torch.topk(a, 3, dim=-1)
    np.testing.assert_array_equal(s, ref.indices.numpy())
    np.testing.assert_allclose(w, ref.values.numpy())
    # sparse: 2 real edges out of 4 slots -> m=3 gives one missing entry (-1, 0)
    idx = np.array([[1, 2, 0, 0], [0, 2, 1, 1]])
    mask = np.array([[True, True, False, False], [True, True, False, False]])
    att = torch.tensor([[[0.2, 0.8, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0]]])
    s, w = top_incoming(att, idx, m=3, mask=mask)
    np.testing.assert_array_equal(s[0], [[2, 1, -1], [0, 2, -1]])
    np.testing.assert_allclose(w[0], [[0.8, 0.2, 0.0], [0.6, 0.4, 0.0]])


# ---------------------------------------------------------------------- graphs
def test_modularity_two_disconnected_cliques():
    g = nx.disjoint_union(nx.complete_graph(6), nx.complete_graph(6))
    res = modularity(g, seed=0)
    assert res["modularity"] == pytest.approx(0.5)
    assert res["num_communities"] == 2
    # the same from an attention matrix that is block diagonal
    n = 12
    a = np.zeros((n, n))
    a[:6, :6] = 1.0
    a[6:, 6:] = 1.0
    a += np.eye(n)  # strong self edges are excluded from the graph
    src = np.broadcast_to(np.arange(n)[None], (n, n))
    summary = strong_graph_summary(a, src, edges_per_column=5, seed=0, n_random=1)
    assert summary["edges"] == 30  # 2 cliques of 15 undirected edges
    assert summary["modularity"] == pytest.approx(0.5)


def test_strong_graph_keeps_heaviest_edges():
    a = np.array([[0, 0.9, 0.1], [0.2, 0, 0.8], [0.5, 0.5, 0]])
    src = np.broadcast_to(np.arange(3)[None], (3, 3))
    g, info = strong_graph(a, src, 2)
    assert sorted(map(sorted, g.edges())) == [[0, 1], [1, 2]]
    assert info["threshold"] == pytest.approx(0.8)


def test_small_world_ring_with_shortcuts_beats_lattice():
    lattice = nx.watts_strogatz_graph(200, 6, 0.0, seed=1)
    shortcuts = nx.watts_strogatz_graph(200, 6, 0.1, seed=1)
    sw_lat = small_world(lattice, n_random=2, seed=0)
    sw_ws = small_world(shortcuts, n_random=2, seed=0)
    assert sw_ws["path_length"] < sw_lat["path_length"] / 2
    assert sw_ws["sigma"] > 2.0
    assert sw_ws["sigma"] > sw_lat["sigma"]
    # random graph itself is not small-world
    rnd = nx.gnm_random_graph(200, 600, seed=2)
    assert small_world(rnd, n_random=2, seed=0)["sigma"] < 1.5


# ---------------------------------------------------------------------- topography
def test_dprime_on_constructed_responses():
    # column 0: class 0 -> {2, 4} (mean 3, var 1), rest {0, 0, 1, 1} (mean 0.5, var 0.25)
    # column 1: the same responses negated
    r0 = np.array([2, 4, 0, 0, 1, 1], dtype=float)
    labels = np.array([0, 0, 1, 1, 2, 2])
    resp = np.stack([r0, -r0], axis=1)
    d = dprime(resp, labels)
    expected = (3 - 0.5) / np.sqrt((1 + 0.25) / 2)
    assert d[0, 0] == pytest.approx(expected)
    assert d[0, 1] == pytest.approx(-expected)
    # class 1 (values {0, 0}, var 0) vs rest {2, 4, 1, 1}: mean 2, var 1.5
    assert d[1, 0] == pytest.approx((0 - 2) / np.sqrt((0 + 1.5) / 2), rel=1e-6)
    # streaming in batches gives the same numbers
    s = ResponseStats(3, 2)
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        s.add(torch.tensor(resp[sl]), torch.tensor(labels[sl]))
    np.testing.assert_allclose(s.dprime(), d)


def test_sample_pairs_exhaustive_and_sampled():
    i, j, info = sample_pairs(10, max_pairs=100)
    assert info["exhaustive"] and info["pairs"] == 45 and len(i) == 45 and (i < j).all()
    groups = np.repeat([0, 1, 2], [30, 40, 1])
    i, j, info = sample_pairs(71, max_pairs=500, seed=3, groups=groups)
    assert not info["exhaustive"] and info["pairs"] == 500 and info["total_pairs"] == 435 + 780
    assert (groups[i] == groups[j]).all() and (i != j).all()
    i2, j2, _ = sample_pairs(71, max_pairs=500, seed=3, groups=groups)
    np.testing.assert_array_equal(i, i2)


def _smooth_profiles(g, classes: int = 6) -> np.ndarray:
    y, x = g.coords[:, 0], g.coords[:, 1]
    k = np.arange(classes)[None]
    return np.sin(x[:, None] / 3.0 + k) + np.cos(y[:, None] / 4.0 + 2 * k)


def test_smoothness_of_smooth_map_beats_shuffled_control():
    g = grid(12, 10)
    res = smoothness(_smooth_profiles(g), g, n_shuffles=20, seed=0)
    assert res["pairs"]["exhaustive"] and res["pairs"]["pairs"] == 120 * 119 // 2
    assert res["smoothness"] > 0.3
    assert res["smoothness"] > res["shuffled_mean"] + 5 * res["shuffled_std"]
    assert res["shuffled_p"] <= 1 / 21 + 1e-12
    assert res["slope"] < 0
    # random profiles are not smoother than their control
    noise = np.random.default_rng(0).standard_normal((g.n, 6))
    r2 = smoothness(noise, g, n_shuffles=20, seed=0)
    assert abs(r2["smoothness"]) < 0.1
    # sampled pairs on a larger, non-square sheet give the same verdict
    g3 = grid(40, 70)
    r3 = smoothness(_smooth_profiles(g3), g3, max_pairs=5000, n_shuffles=5, seed=1)
    assert not r3["pairs"]["exhaustive"] and r3["pairs"]["pairs"] == 5000
    assert r3["smoothness"] > r3["shuffled_mean"] + 0.2


def test_weight_similarity_smooth_untied_weights():
    from columnformer.sheet import Columnformer, SheetConfig

    g = grid(6, 7)
    sheet = Columnformer(SheetConfig(width=8, steps=1, qk_dim=4), g)
    y, x = torch.tensor(g.coords[:, 0]), torch.tensor(g.coords[:, 1])
    with torch.no_grad():
        for name, p in sheet.blocks[0].named_parameters():
            if p.shape[0] == g.n and not name.endswith("attn.bias"):
                flat = p.view(g.n, -1)
                phase = torch.arange(flat.shape[1], dtype=torch.float64)
                flat.copy_((torch.sin(x[:, None] / 2 + phase) + torch.cos(y[:, None] / 2 + 0.5 * phase)).float())
    res = weight_similarity(sheet, n_shuffles=10)
    assert res["smoothness"] > res["shuffled_mean"] + 0.2
    tied = Columnformer(SheetConfig(width=8, steps=1, qk_dim=4, untied_attn=False, untied_mlp=False, untied_norm=False), g)
    assert weight_similarity(tied) is None


# ---------------------------------------------------------------------- layouts
def test_layouts_any_geometry():
    lay = sheet_layout(grid(3, 5))
    assert lay.projection == "grid" and lay.xy[:, 0].max() == pytest.approx(4 + 0.5) and lay.xy[:, 1].max() == pytest.approx(2 + 0.5)
    lay = sheet_layout(stacked([(4, 4), (2, 6)]))
    assert lay.panel_names == ["layer 0 4x4", "layer 1 2x6"]
    b0, b1 = lay.panel_boxes
    assert b1[0] > b0[2]  # panels side by side, not overlapping
    assert (lay.xy[lay.panel == 1, 0] > b0[2]).all()
    lay = sheet_layout(sphere(200))
    assert lay.projection == "equirectangular"
    assert (np.abs(lay.xy[:, 0]) <= 180).all() and (np.abs(lay.xy[:, 1]) <= 90).all()
    lay = sheet_layout(from_coords(np.random.default_rng(0).random((30, 3))))
    assert lay.xy.shape == (30, 2) and np.isfinite(lay.xy).all()
