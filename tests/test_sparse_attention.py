"""The sparse attention kernel: same math as the dense kernel, O(B N K) memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from columnformer import Columnformer, SheetConfig, grid, stacked
from columnformer.attention import dense_attention
from columnformer.connectivity import Connectivity, rewire_sheet
from columnformer.sparse_attention import sparse_attention


def _random_edges(n, k, seed=0, pad=True):
    """(N, K) index with self first, distinct sources, and (optionally) some padding."""
    rng = np.random.default_rng(seed)
    index = np.stack([np.r_[i, rng.choice(np.delete(np.arange(n), i), k - 1, replace=False)] for i in range(n)])
    mask = np.ones((n, k), bool)
    if pad:
        mask[:, -2:] = rng.random((n, 2)) < 0.5  # random padding at the end of rows
    index = np.where(mask, index, np.arange(n)[:, None])
    return torch.from_numpy(index), torch.from_numpy(mask)


def _dense_from_edges(index, mask, values_nk, n, fill=0.0):
    out = torch.full((n, n), fill, dtype=values_nk.dtype)
    rows = torch.arange(n)[:, None].expand_as(index)
    out[rows[mask], index[mask]] = values_nk[mask]
    return out


@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_equals_masked_dense_forward_and_backward(with_bias):
    n, b, h, d, dv, k = 12, 3, 2, 4, 5, 5
    index, mask = _random_edges(n, k)
    q = torch.randn(n, b, h, d, dtype=torch.float64, requires_grad=True)
    kk = torch.randn(n, b, h, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, b, h, dv, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, k, dtype=torch.float64, requires_grad=True) if with_bias else None
    w = torch.rand(n, k, dtype=torch.float64) * mask
    out_s, st_s = sparse_attention(q, kk, v, bias, w, index, mask, record_attn=True, chunk=5)
    gout = torch.randn_like(out_s)
    loss_s = (out_s * gout).sum() + 3.0 * st_s.wiring
    grads_s = torch.autograd.grad(loss_s, [q, kk, v] + ([bias] if with_bias else []))

    edge = _dense_from_edges(index, mask, torch.ones(n, k, dtype=torch.bool), n, fill=False)
    dbias = _dense_from_edges(index, mask, bias, n) if with_bias else None
    dw = _dense_from_edges(index, mask, w, n)
    out_d, st_d = dense_attention(q, kk, v, dbias, dw, edge_mask=edge, record_attn=True)
    loss_d = (out_d * gout).sum() + 3.0 * st_d.wiring
    grads_d = torch.autograd.grad(loss_d, [q, kk, v] + ([bias] if with_bias else []))

    torch.testing.assert_close(out_s, out_d)
    torch.testing.assert_close(st_s.wiring, st_d.wiring)
    torch.testing.assert_close(st_s.entropy, st_d.entropy)
    for gs, gd in zip(grads_s, grads_d):
        torch.testing.assert_close(gs, gd)
    # recorded map (B, H, N, K) is the dense map read at the edges
    rows = torch.arange(n)[:, None].expand_as(index)
    assert st_s.attn.shape == (b, h, n, k)
    torch.testing.assert_close(st_s.attn * mask, st_d.attn[:, :, rows, index] * mask)
    assert (st_s.attn[..., ~mask] == 0).all()


def test_wiring_cost_on_edges_equals_dense_cost_restricted_to_edges():
    n, b, h, d, k = 16, 2, 2, 3, 6
    geo = grid(4, 4)
    conn = Connectivity.local(geo, k)
    wn = geo.mean_distance_power(1.0)
    q, kk, v = (torch.randn(n, b, h, d, dtype=torch.float64) for _ in range(3))
    w_sparse = conn.dist.double() / wn
    w_dense = geo.distances(torch.float64) / wn
    edge = _dense_from_edges(conn.index, conn.mask, torch.ones(n, k, dtype=torch.bool), n, fill=False)
    _, st_s = sparse_attention(q, kk, v, None, w_sparse, conn.index, conn.mask)
    _, st_d = dense_attention(q, kk, v, None, w_dense, edge_mask=edge, record_attn=True)
    torch.testing.assert_close(st_s.wiring, st_d.wiring)
    # and equals the explicit formula with the full distance matrix restricted to the edges
    ref = (st_d.attn * (w_dense * edge)).sum(-1).mean()
    torch.testing.assert_close(st_s.wiring, ref)


def _full_sparse(geometry):
    """A sparse Connectivity that lists all N pairs (forces the sparse kernel at K = N)."""
    return Connectivity.local(geometry, geometry.n)


@pytest.mark.parametrize("recurrent", [True, False])
def test_columnformer_sparse_k_equals_n_matches_dense(recurrent, randomize):
    geo = stacked([(2, 3), (3, 3)])
    cfg = SheetConfig(width=8, steps=3, recurrent=recurrent, heads=2, qk_dim=3, value_proj=True, mlp_ratio=1.0,
                      untied_attn=True, untied_mlp=True, untied_norm=True, time_embed=recurrent)
    dense = Columnformer(cfg, geo).double()
    conn = _full_sparse(geo)
    assert conn.k == geo.n and not conn.is_dense
    sparse = Columnformer(cfg, geo, conn).double()
    randomize(dense, std=0.3)
    idx = conn.index
    rows = torch.arange(geo.n)[:, None].expand_as(idx)
    sp = dict(sparse.named_parameters())
    with torch.no_grad():
        for name, p in dense.named_parameters():
            sp[name].copy_(p[rows, idx] if name.endswith("attn.bias") else p)
    tokens = torch.randn(4, 6, 8, dtype=torch.float64)
    outs, grads = [], []
    for model in (dense, sparse):
        out, trace = model(tokens)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + 0.7 * trace.wiring_cost
        model.zero_grad()
        loss.backward()
        outs.append((out, trace.wiring_cost, trace.attn_entropy))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b)
    for name, g in grads[0].items():
        gs = grads[1][name]
        if name.endswith("attn.bias"):
            g = g[rows, idx]
        torch.testing.assert_close(gs, g, msg=lambda m: f"{name}: {m}")


def test_no_gathered_tensor_saved_for_backward():
    n, b, h, d, dv, k = 64, 4, 1, 8, 16, 16
    index, mask = _random_edges(n, k, pad=False)
    q, kk = (torch.randn(n, b, h, d, requires_grad=True) for _ in range(2))
    v = torch.randn(n, b, h, dv, requires_grad=True)
    bias = torch.zeros(n, k, requires_grad=True)
    w = torch.rand(n, k)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, st = sparse_attention(q, kk, v, bias, w, index, mask)
    (out.sum() + st.wiring).backward()
    limit = b * n * k * (h * dv)  # B * N * K * C
    assert saved and max(saved) < limit, (max(saved), limit)
    assert max(saved) <= max(b * h * n * k, n * b * h * dv)  # probs (N, K, B, H) or the inputs
    assert q.grad is not None and kk.grad is not None and v.grad is not None and bias.grad is not None


def test_bf16_autocast_and_chunking():
    n, b, h, d, k = 40, 2, 1, 8, 7
    index, mask = _random_edges(n, k)
    q, kk, v = (torch.randn(n, b, h, d) for _ in range(3))
    w = torch.rand(n, k)
    ref, st_ref = sparse_attention(q, kk, v, None, w, index, mask)
    chunked, _ = sparse_attention(q, kk, v, None, w, index, mask, chunk=3)
    torch.testing.assert_close(chunked, ref)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, kk, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, st = sparse_attention(qb, kb, vb, None, w, index, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    (out.float().sum() + st.wiring).backward()
    assert qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()


def test_sparse_sheet_trains_and_rewire_sheet_updates_buffers():
    geo = grid(6, 6)
    conn = Connectivity.local_plus_long_range(geo, 5, 3, scale=2.0, seed=0)
    cfg = SheetConfig(width=8, steps=2, heads=1, qk_dim=4)
    sheet = Columnformer(cfg, geo, conn, input_area="all", output_area="all")
    opt = torch.optim.AdamW(sheet.parameters(), lr=1e-2)
    out, trace = sheet(torch.randn(3, 36, 8), record=("attn",))
    (out.square().mean() + trace.wiring_cost).backward()
    opt.step()
    attn = torch.stack(trace.attn)  # (T, B, H, N, K)
    old_index = sheet.edge_index.clone()
    old_bias = sheet.blocks[0].attn.bias.detach().clone()
    replaced = rewire_sheet(sheet, attn, 0.25, seed=1, optimizer=opt)
    changed = sheet.edge_index != old_index
    assert replaced == int(changed.sum()) > 0
    assert sheet.edge_index.shape == old_index.shape and sheet.edge_mask.all()
    assert (sheet.edge_index[:, 0] == torch.arange(36)).all()  # self-edge kept
    d = torch.from_numpy(geo.pair_distances(torch.arange(36)[:, None].expand_as(sheet.edge_index), sheet.edge_index)).float()
    torch.testing.assert_close(sheet.wiring_weight, d / geo.mean_distance_power(1.0))
    bias = sheet.blocks[0].attn.bias.detach()
    torch.testing.assert_close(bias[changed], torch.clamp(-d[changed] ** 2 / 8.0, min=-8.0))
    torch.testing.assert_close(bias[~changed], old_bias[~changed])
    assert (opt.state[sheet.blocks[0].attn.bias]["exp_avg"][changed] == 0).all()
    assert sheet.connectivity.index.equal(sheet.edge_index)
    out, trace = sheet(torch.randn(3, 36, 8))  # still runs
    assert torch.isfinite(out).all()
