"""The block-sparse kernel: the gather kernel's math on tiles of columns (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from columnformer import Columnformer, SheetConfig, grid, stacked
from columnformer.block_sparse import block_sparse_attention, build_block_plan, tile_order
from columnformer.config import build_config
from columnformer.connectivity import Connectivity, rewire_sheet
from columnformer.geometry import from_coords, sphere
from columnformer.sparse_attention import sparse_attention


def _random_coords_geometry(n=70, seed=0):
    return from_coords(np.random.default_rng(seed).normal(size=(n, 3)) * 3)


GEOMETRIES = {
    "grid_local": lambda: Connectivity.local(grid(11, 9), 9),
    "grid_long_range": lambda: Connectivity.local_plus_long_range(grid(11, 9), 9, 3, seed=1),
    "stacked_long_range": lambda: Connectivity.local_plus_long_range(stacked([(6, 6), (4, 4)], 1.0), 7, 2, seed=2),
    "sphere_local": lambda: Connectivity.local(sphere(90), 10),
    "coords_local": lambda: Connectivity.local(_random_coords_geometry(), 8),
    "grid_rewired": lambda: Connectivity.local(grid(10, 10), 9).rewire(torch.rand(100, 9), 0.3, seed=3),
}


def _inputs(n, k, b=3, h=2, d=4, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, kk = (torch.randn(n, b, h, d, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(n, b, h, dv, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(n, k, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.rand(n, k, dtype=torch.float64, generator=g)
    return q, kk, v, bias, w


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("tile,min_readers,chunk", [(16, 1, 2), (16, 3, 1), (32, 2, None)])
def test_block_kernel_equals_gather_kernel(name, tile, min_readers, chunk):
    conn = GEOMETRIES[name]()
    n, k = conn.index.shape
    plan = build_block_plan(conn.geometry.coords, conn.index, conn.mask, tile=tile, min_readers=min_readers)
    if min_readers == 3:
        assert plan.gathered > 0  # the gathered part is exercised, not only the tiles
    check_against_gather(conn, lambda q, kk, v, bias, w: block_sparse_attention(
        q, kk, v, bias, w, plan, record_attn=True, chunk=chunk), _inputs(n, k))


def check_against_gather(conn, run, inputs):
    """``run(q, k, v, bias, w) -> (out, wiring, entropy, attn)`` equals the gather kernel on ``conn``'s edges:
    values, wiring, entropy, the map, and the gradients of q, k, v and the bias."""
    q, kk, v, bias, w = inputs
    ref, st = sparse_attention(q, kk, v, bias, w, conn.index, conn.mask, record_attn=True)
    g_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g_out).sum() + 3.0 * st.wiring, [q, kk, v, bias])
    out, wiring, entropy, attn = run(q, kk, v, bias, w)
    grads = torch.autograd.grad((out * g_out).sum() + 3.0 * wiring, [q, kk, v, bias])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(wiring, st.wiring)
    torch.testing.assert_close(entropy, st.entropy)
    torch.testing.assert_close(attn, st.attn)
    for got, want, what in zip(grads, ref_grads, ("q", "k", "v", "bias")):
        torch.testing.assert_close(got, want, msg=lambda m: f"d{what}: {m}")


def test_block_kernel_without_bias_and_under_bf16_autocast():
    conn = GEOMETRIES["grid_long_range"]()
    n, k = conn.index.shape
    plan = build_block_plan(conn.geometry.coords, conn.index, conn.mask, tile=16, min_readers=2)
    q, kk, v, _, w = _inputs(n, k)
    ref, st = sparse_attention(q, kk, v, None, w, conn.index, conn.mask)
    out, wiring, _, _ = block_sparse_attention(q, kk, v, None, w, plan)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(wiring, st.wiring)
    qf, kf, vf = (x.detach().float() for x in (q, kk, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf, _ = sparse_attention(qf.bfloat16(), kf.bfloat16(), vf.bfloat16(), None, w.float(), conn.index, conn.mask)
        out_bf, _, _, _ = block_sparse_attention(qf.bfloat16(), kf.bfloat16(), vf.bfloat16(), None, w.float(), plan)
    assert out_bf.dtype == ref_bf.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf.float(), ref_bf.float(), atol=1e-2, rtol=1e-2)


def saved_elements(run) -> int:
    """Elements autograd saves for backward while ``run() -> (out, wiring)`` executes (then backward runs)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, wiring = run()
    (out.sum() + wiring).backward()
    return sum(t.numel() for t in saved)


def test_block_kernel_saves_no_edge_sized_tensors():
    """Backward recomputes the tile scores: what autograd keeps is the inputs, nothing of size B*N*K."""
    conn = Connectivity.local(grid(16, 16), 25)
    n, k = conn.index.shape
    plan = build_block_plan(conn.geometry.coords, conn.index, conn.mask, tile=16, min_readers=1)
    q, kk, v, bias, w = _inputs(n, k, b=4, h=1, d=4, dv=4)
    saved_elems = saved_elements(lambda: block_sparse_attention(q, kk, v, bias, w, plan)[:2])
    inputs_elems = sum(t.numel() for t in (q, kk, v, bias, w))
    assert saved_elems <= inputs_elems, (saved_elems, inputs_elems)
    assert 4 * n * k > inputs_elems - n * k  # (B*N*K probabilities alone would exceed the q/k/v inputs here)


def test_tiles_are_compact_squares_on_a_power_of_two_grid():
    g = grid(16, 16)
    tiles = tile_order(g.coords, 16)
    assert len(tiles) == 16 and all(len(t) == 16 for t in tiles)
    assert sorted(np.concatenate(tiles).tolist()) == list(range(256))
    for t in tiles:
        yx = g.coords[t]
        assert (yx.max(0) - yx.min(0)).tolist() == [3.0, 3.0]  # a 4 x 4 square
    uneven = tile_order(grid(7, 5).coords, 8)  # 35 columns: 4 full tiles and one of 3
    assert sorted(len(t) for t in uneven) == [3, 8, 8, 8, 8]


def sheet_pair(conn, kernel="block", **cfg):
    """Two float64 sheets with the same weights: one on the gather kernel, one on ``kernel``."""
    base = dict(width=8, steps=3, qk_dim=4, heads=2)
    base.update(cfg)
    torch.manual_seed(0)
    ref = Columnformer(SheetConfig(**base, sparse_kernel="gather"), conn.geometry, conn, "all", "all").double()
    other = Columnformer(SheetConfig(**base, sparse_kernel=kernel), conn.geometry, conn, "all", "all").double()
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(value_proj=True, attn_bias="zero", recurrent=False),
        dict(attn_bias="none", inject="every", time_embed=True),
    ],
)
def test_sheet_on_block_kernel_equals_gather_kernel(cfg):
    conn = Connectivity.local_plus_long_range(grid(9, 9), 12, 4, seed=0)
    ref, blk = sheet_pair(conn, **cfg)
    assert ref.block_plan() is None and blk.block_plan() is not None
    x = torch.randn(2, 81, 8, dtype=torch.float64)
    outs = []
    for m in (ref, blk):
        out, trace = m(x, record=("attn", "qk"))
        (out.square().sum() + 0.1 * trace.wiring_cost).backward()
        outs.append((out, trace))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(torch.stack(outs[1][1].attn), torch.stack(outs[0][1].attn))
    torch.testing.assert_close(outs[1][1].attn_entropy, outs[0][1].attn_entropy)
    for (name, p_ref), p_blk in zip(ref.named_parameters(), blk.parameters()):
        torch.testing.assert_close(p_blk.grad, p_ref.grad, msg=lambda m: f"{name}: {m}")


def test_plan_follows_rewiring_and_loaded_edges():
    conn = Connectivity.local(grid(10, 10), 9)
    ref, blk = sheet_pair(conn)
    x = torch.randn(2, 100, 8, dtype=torch.float64)
    _, trace = blk(x, record=("attn",))
    plan_before = blk.block_plan()
    for m in (ref, blk):
        rewire_sheet(m, torch.stack(trace.attn), 0.3, seed=4)
    plan_after = blk.block_plan()
    assert plan_after is not plan_before  # the edge buffers changed: the plan was rebuilt
    torch.testing.assert_close(blk(x)[0], ref(x)[0])
    # a fresh sheet loading the rewired edges from a state dict plans them too
    fresh = Columnformer(blk.cfg, conn.geometry, conn, "all", "all").double()
    fresh.load_state_dict(blk.state_dict())
    torch.testing.assert_close(fresh(x)[0], ref(x)[0])


def test_auto_picks_block_for_a_stencil_and_gather_for_scattered_edges(monkeypatch):
    monkeypatch.setattr("columnformer.sheet.fused_available", lambda: False)  # the choice when the C++ kernel can't build
    local = Connectivity.local(grid(32, 32), 64)
    sheet = Columnformer(SheetConfig(width=4, steps=1, qk_dim=2), local.geometry, local, "all", "all")
    plan = sheet.block_plan()
    assert plan is not None and plan.cost < plan.gather_cost
    rng = np.random.default_rng(0)
    n, k = 400, 8
    index = np.stack([np.r_[i, rng.choice(np.delete(np.arange(n), i), k - 1, replace=False)] for i in range(n)])
    scattered = Connectivity.from_index(grid(20, 20), index)
    sheet = Columnformer(SheetConfig(width=4, steps=1, qk_dim=2), scattered.geometry, scattered, "all", "all")
    assert sheet.block_plan() is None  # random edges share no keys within a tile: the gather kernel runs
    forced = Columnformer(SheetConfig(width=4, steps=1, qk_dim=2, sparse_kernel="block"), scattered.geometry, scattered)
    assert forced.block_plan() is not None


def test_block_kernel_needs_a_sparse_connectivity():
    with pytest.raises(ValueError, match="sparse_kernel='block' needs a sparse connectivity"):
        Columnformer(SheetConfig(width=4, sparse_kernel="block"), grid(3, 3))
    with pytest.raises(ValueError, match="sparse_kernel"):
        build_config({"model": {"sheet": {"sparse_kernel": "block"}}})
    with pytest.raises(ValueError, match="sparse_kernel"):
        build_config({"model": {"sheet": {"sparse_kernel": "tiles"}}})


@pytest.mark.parametrize("kernel,recurrent", [("block", True), ("gather", False), ("fused", True), ("auto", True)])
def test_activation_checkpointing_changes_memory_not_results(kernel, recurrent):
    conn = Connectivity.local_plus_long_range(grid(9, 9), 12, 4, seed=0) if kernel != "auto" else Connectivity.dense(grid(9, 9))
    base = dict(width=8, steps=3, qk_dim=4, heads=2, recurrent=recurrent, sparse_kernel=kernel)
    torch.manual_seed(0)
    plain = Columnformer(SheetConfig(**base), conn.geometry, conn, "all", "all").double()
    ckpt = Columnformer(SheetConfig(**base, checkpoint=True), conn.geometry, conn, "all", "all").double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 81, 8, dtype=torch.float64)
    saved = {}
    for name, m in (("plain", plain), ("ckpt", ckpt)):
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, trace = m(x)
        (out.square().sum() + 0.1 * trace.wiring_cost).backward()
        saved[name] = (count[0], out)
    torch.testing.assert_close(saved["ckpt"][1], saved["plain"][1])
    for p_plain, p_ckpt in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad)
    assert saved["ckpt"][0] * 5 < saved["plain"][0]  # only each step's input is kept


@pytest.mark.parametrize("name,side", [("wide", 64), ("scale", 128)])
def test_wide_presets_read_their_input_everywhere_and_pool_the_sheet(name, side):
    from columnformer.config import ModelConfig
    from columnformer.factory import build_model
    from columnformer.presets import get_preset

    cfg = ModelConfig.model_validate(get_preset(name))
    model = build_model(cfg)
    sheet = model.sheet
    assert cfg.geometry.kind == "grid" and sheet.n == side * side
    assert len(sheet.output_idx) / sheet.n >= 0.5  # the head pools at least half the sheet
    assert sheet.connectivity.kind == "local_long_range" and sheet.block_plan() is not None
    # retinotopic: column (y, x) of the side x side sheet receives patch (6y // side, 6x // side) of the 6x6 grid
    # of overlapping 3x3-pixel patches (stride 1) of the 8x8 digit; patch row 1 starts at ceil(side / 6)
    assert model.embed.grid == (6, 6) and model.embed.proj.kernel_size == (3, 3)
    tok = sheet.input_token.view(side, side)
    b = -(-side // 6)
    assert tok[0, 0] == 0 and tok[b - 1, b - 1] == 0 and tok[b, 0] == 6 and tok[0, b] == 1 and tok[-1, -1] == 35
    images = torch.randn(2, 1, 8, 8)
    logits, _ = model(images)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    reached = (sheet.pos_embed.grad.abs().sum(1) > 0).float().mean().item()  # columns whose input reaches the loss
    assert reached >= 0.9


def test_retinotopic_input_and_span_geometry_are_validated():
    with pytest.raises(ValueError, match="retinotopic maps image patches onto a grid"):
        build_config({"model": {"input_area": "retinotopic", "geometry": {"kind": "sphere"}}})
    with pytest.raises(ValueError, match="the 2x2 sheet is smaller than the 4x4 patch grid"):  # a stack's bottom layer
        build_config({"model": {"input_area": "retinotopic", "geometry": {"kind": "stacked", "layers": [[2, 2], [8, 8]]}}})
    stack = build_config({"model": {"input_area": "retinotopic", "geometry": {"kind": "stacked", "layers": [[8, 8], [4, 4]]}}})
    assert stack.model.retinotopic_tokens().reshape(8, 8)[:, 0].tolist() == [0, 0, 4, 4, 8, 8, 12, 12]
    with pytest.raises(ValueError, match="smaller than the 4x4 patch grid"):
        build_config({"model": {"input_area": "retinotopic", "geometry": {"kind": "grid", "shape": [2, 2]}}})
    with pytest.raises(ValueError, match="span=true applies to kind=stacked only"):
        build_config({"model": {"geometry": {"kind": "grid", "span": True}}})
    g = stacked([(8, 8), (64, 64)], 1.0, span=True)
    low, high = g.coords[:64], g.coords[64:]
    assert np.allclose(low[:, :2].min(0), high[:, :2].min(0)) and np.allclose(low[:, :2].max(0), high[:, :2].max(0))
    assert np.allclose(np.diff(np.unique(low[:, 0])), 9.0)  # 8 rows spread over 63 units
