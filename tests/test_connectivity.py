"""Sparse connectivity: k nearest against brute force, the long-range rule, rewiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from columnformer import from_coords, grid, sphere, stacked
from columnformer.connectivity import Connectivity, ConnectivityError, knn_index


def _brute_knn(geo, k):
    """Brute-force k nearest (itself first, then distance rounded to 1e-9, then index)."""
    n = geo.n
    i = np.arange(n)
    d = np.sqrt(((geo.coords[:, None] - geo.coords[None]) ** 2).sum(-1))  # chord on the sphere: same order
    key = np.round(d, 9)
    key[i, i] = -1.0
    order = np.lexsort((np.broadcast_to(i, (n, n)), key), axis=-1)
    return order[:, :k]


GEOMETRIES = {
    "grid": lambda: grid(7, 9),
    "sphere": lambda: sphere(150),
    "stacked": lambda: stacked([(4, 4), (6, 6)], spacing=1.5),
    "coords": lambda: from_coords(np.random.default_rng(0).normal(size=(120, 3))),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("k", [1, 4, 9, 25])
def test_local_matches_brute_force(name, k):
    geo = GEOMETRIES[name]()
    conn = Connectivity.local(geo, k)
    ref = _brute_knn(geo, k)
    assert conn.index.shape == (geo.n, k) and conn.mask.all() and not conn.is_dense
    np.testing.assert_array_equal(conn.index.numpy(), ref)
    assert (conn.index[:, 0] == torch.arange(geo.n)).all()
    rows = np.arange(geo.n)[:, None]
    np.testing.assert_allclose(conn.dist.numpy(), geo.pair_distances(rows, ref), rtol=1e-6, atol=1e-5)
    assert (conn.dist[:, 1:] >= conn.dist[:, :-1] - 1e-4).all()  # nearest first (great-circle too)


def test_local_caps_k_at_n_and_is_all_pairs():
    geo = grid(3, 4)
    conn = Connectivity.local(geo, 100)
    assert conn.k == 12
    assert all(sorted(r) == list(range(12)) for r in conn.index.tolist())
    with pytest.raises(ConnectivityError):
        Connectivity.local(geo, 0)


def test_local_never_forms_an_n_by_n_matrix(monkeypatch):
    geo = grid(80, 80)

    def refuse(*a, **kw):
        raise AssertionError("local() must not form the N x N distance matrix")

    monkeypatch.setattr(type(geo), "distances", refuse)
    monkeypatch.setattr(type(geo), "mean_distance_power", refuse)
    conn = Connectivity.local(geo, 16)
    assert conn.index.shape == (6400, 16)
    long = Connectivity.local_plus_long_range(geo, 9, 4, scale=5.0, seed=0)
    assert long.index.shape == (6400, 13)


@pytest.mark.parametrize("geo_fn", [lambda: grid(20, 20), lambda: sphere(400), lambda: stacked([(10, 10), (14, 14)])])
def test_long_range_edges_valid_and_reproducible(geo_fn):
    geo = geo_fn()
    k, kl = 9, 6
    a = Connectivity.local_plus_long_range(geo, k, kl, scale=3.0, seed=5)
    b = Connectivity.local_plus_long_range(geo, k, kl, scale=3.0, seed=5)
    c = Connectivity.local_plus_long_range(geo, k, kl, scale=3.0, seed=6)
    assert a.index.shape == (geo.n, k + kl) and a.mask.all() and a.scale == 3.0
    assert torch.equal(a.index, b.index) and torch.equal(a.dist, b.dist)
    assert not torch.equal(a.index, c.index)
    local = Connectivity.local(geo, k).index
    assert torch.equal(a.index[:, :k], local)
    for row in a.index.tolist():
        assert len(set(row)) == len(row)  # no duplicates, long-range disjoint from local
    rows = np.arange(geo.n)[:, None]
    np.testing.assert_allclose(a.dist.numpy(), geo.pair_distances(rows, a.index.numpy()), rtol=1e-5, atol=1e-5)


def test_long_range_pads_when_the_sheet_is_too_small():
    geo = grid(3, 3)
    conn = Connectivity.local_plus_long_range(geo, 5, 6, scale=2.0, seed=0)
    assert conn.index.shape == (9, 11)
    assert conn.mask.sum(1).tolist() == [9] * 9  # 4 long-range sources left per column
    pad = ~conn.mask
    assert (conn.index[pad] == torch.arange(9)[:, None].expand(9, 11)[pad]).all()
    assert (conn.dist[pad] == 0).all()
    for i, row in enumerate(conn.index.tolist()):
        assert sorted(set(row)) == list(range(9))


@pytest.mark.parametrize("geo_fn,scale", [(lambda: grid(40, 40), 3.0), (lambda: sphere(1600), 4.0)])
def test_long_range_follows_the_exponential_rule(geo_fn, scale):
    """The first long-range edge of each column is one exact draw from p(j) ~ exp(-d/scale) over the
    non-local columns: compare the mean distance and the tail mass with the rule (fixed seed)."""
    geo = geo_fn()
    k = 9
    conn = Connectivity.local_plus_long_range(geo, k, 3, scale=scale, seed=0)
    n = geo.n
    d = geo.pair_distances(np.arange(n)[:, None], np.arange(n)[None, :])  # (N, N), fine at N = 1600
    allowed = np.ones((n, n), bool)
    allowed[np.arange(n)[:, None], conn.index[:, :k].numpy()] = False
    w = np.exp(-d / scale) * allowed
    w /= w.sum(1, keepdims=True)
    mean = (w * d).sum(1)
    var = (w * d**2).sum(1) - mean**2
    drawn = d[np.arange(n), conn.index[:, k].numpy()]
    se = np.sqrt(var.sum()) / n
    assert abs(drawn.mean() - mean.mean()) < 4 * se, (drawn.mean(), mean.mean(), se)
    t = np.median(mean)
    p_tail = (w * (d > t)).sum(1)
    se_tail = np.sqrt((p_tail * (1 - p_tail)).sum()) / n
    assert abs((drawn > t).mean() - p_tail.mean()) < 4 * se_tail
    # and long-range edges are much longer than local ones
    assert conn.dist[:, k:].mean() > 2 * conn.dist[:, 1:k].mean()


def _attn(conn, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(conn.index.shape, generator=g)
    return a / a.sum(1, keepdim=True)


@pytest.mark.parametrize("geo_fn", [lambda: grid(12, 12), lambda: stacked([(6, 6), (8, 8)])])
def test_rewire_replaces_exactly_the_weakest_edges(geo_fn):
    geo = geo_fn()
    conn = Connectivity.local_plus_long_range(geo, 8, 4, scale=3.0, seed=0)
    attn = _attn(conn)
    new = conn.rewire(attn, 0.25, seed=3)
    n, K = conn.index.shape
    assert new.index.shape == (n, K) and torch.equal(new.mask, conn.mask)
    assert (new.index[:, 0] == torch.arange(n)).all()  # self-edge kept
    drop = round(0.25 * (K - 1))
    changed = new.index != conn.index
    for i in range(n):
        a = attn[i].clone()
        a[0] = float("inf")  # the self-edge is never dropped
        weakest = set(torch.argsort(a, stable=True)[:drop].tolist())
        assert set(torch.nonzero(changed[i]).flatten().tolist()) == weakest
        row = new.index[i].tolist()
        assert len(set(row)) == K  # no duplicates
        assert not set(new.index[i, changed[i]].tolist()) & set(conn.index[i].tolist())  # fresh sources
    rows = np.arange(n)[:, None]
    np.testing.assert_allclose(new.dist.numpy(), geo.pair_distances(rows, new.index.numpy()), rtol=1e-5, atol=1e-5)
    # reproducible by seed; (T, B, H, N, K) attention is averaged; fraction 0 changes nothing
    assert torch.equal(conn.rewire(attn, 0.25, seed=3).index, new.index)
    stacked_attn = attn.expand(2, 3, 1, n, K)
    assert torch.equal(conn.rewire(stacked_attn, 0.25, seed=3).index, new.index)
    assert torch.equal(conn.rewire(attn, 0.0, seed=3).index, conn.index)


def test_rewire_keeps_padding_and_checks_inputs():
    geo = grid(3, 3)
    conn = Connectivity.local_plus_long_range(geo, 3, 8, scale=2.0, seed=0)  # 6 long-range left: 2 padded
    new = conn.rewire(_attn(conn), 0.5, seed=0)
    assert torch.equal(new.mask, conn.mask)
    pad = ~conn.mask
    assert torch.equal(new.index[pad], conn.index[pad]) and (new.dist[pad] == 0).all()
    for row, m in zip(new.index.tolist(), new.mask.tolist()):
        valid = [r for r, ok in zip(row, m) if ok]
        assert len(set(valid)) == len(valid)
    with pytest.raises(ConnectivityError):
        conn.rewire(_attn(conn), 1.5)
    with pytest.raises(ConnectivityError):
        conn.rewire(torch.rand(9, 3), 0.5)
    with pytest.raises(ConnectivityError):
        Connectivity.dense(geo).rewire(torch.rand(9, 9), 0.5)
