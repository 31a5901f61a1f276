"""The fused C++ kernel: the gather kernel's math in one pass per column (values and gradients)."""

from __future__ import annotations

import pytest
import torch

import columnformer.fused_sparse as fused_sparse
from columnformer import native
from columnformer import Columnformer, SheetConfig, grid
from columnformer.connectivity import Connectivity
from columnformer.fused_sparse import FusedPlan, fused_sparse_attention, visit_order
from columnformer.sparse_attention import sparse_attention
from test_block_sparse import GEOMETRIES, _inputs, check_against_gather, saved_elements, sheet_pair

pytestmark = pytest.mark.skipif(not fused_sparse.available(), reason=f"C++ kernel not built: {fused_sparse.load_error()}")


@pytest.fixture(autouse=True, params=["two_pass", "one_pass", "one_pass+groups"])
def backward_path(request, monkeypatch):
    """Every test runs with each kernel variant: two passes in backward (dk, dv over the inverted edge table); one
    pass (blocks of the visiting order in colour phases; tiny blocks here so that the small test sheets still get
    several blocks and colours), one column at a time; and one pass with reader groups in forward and backward."""
    backward, _, groups = request.param.partition("+")
    monkeypatch.setattr(fused_sparse, "BACKWARD", backward)
    monkeypatch.setattr(fused_sparse, "GROUPS", "on" if groups else "off")
    monkeypatch.setattr(fused_sparse, "MIN_BLOCK", 8)
    return backward


def _run(conn, order=True):
    o = visit_order(conn.geometry.coords) if order else None

    def run(q, kk, v, bias, w):
        out, st = fused_sparse_attention(q, kk, v, bias, w, conn.index, conn.mask, record_attn=True, order=o)
        return out, st.wiring, st.entropy, st.attn

    return run


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_fused_kernel_equals_gather_kernel(name):
    conn = GEOMETRIES[name]()
    n, k = conn.index.shape
    check_against_gather(conn, _run(conn), _inputs(n, k))  # float64, B*H = 6 lanes padded to 8


def test_fused_kernel_with_padding_edges_and_the_wiring_weight_gradient():
    conn = Connectivity.local(grid(11, 9), 9)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(conn.index.shape, generator=g) > 0.3
    mask[:, 0] = True  # every column keeps one edge
    conn = Connectivity.from_index(conn.geometry, conn.index, mask)
    n, k = conn.index.shape
    q, kk, v, bias, _ = _inputs(n, k, b=2, h=3, d=8, dv=16)  # a compiled (d, dv) case
    w = torch.rand(n, k, dtype=torch.float64, generator=g).requires_grad_()
    check_against_gather(conn, _run(conn), (q, kk, v, bias, w.detach()))
    grads = []
    for fn in (sparse_attention, fused_sparse_attention):
        out, st = fn(q, kk, v, bias, w, conn.index, conn.mask)
        grads.append(torch.autograd.grad(out.square().sum() + 2.0 * st.wiring, [w, bias]))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("b,h,d,dv", [(3, 2, 4, 5), (4, 5, 8, 16), (8, 1, 16, 32), (16, 1, 16, 32), (64, 4, 8, 8)])
def test_float32_matches_the_gather_kernel(b, h, d, dv):
    """float32 runs the polynomial exp and the compiled (d, dv) cases; the B*H lanes are padded to 1, 2, 4 or
    32 vectors of 8 (20 lanes to 32; 256 lanes: more lane blocks than a register tile holds)."""
    conn = GEOMETRIES["grid_long_range"]()
    n, k = conn.index.shape
    q, kk, v, bias, w = (t.detach().float().requires_grad_(t.requires_grad) for t in _inputs(n, k, b, h, d, dv))
    res = []
    for run in (lambda *a: sparse_attention(*a, conn.index, conn.mask, record_attn=True),
                lambda *a: fused_sparse_attention(*a, conn.index, conn.mask, record_attn=True)):
        out, st = run(q, kk, v, bias, w)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + st.wiring, [q, kk, v, bias])
        res.append((out, st.wiring, st.entropy, st.attn, *grads))
    for got, want in zip(*res):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


def test_visiting_order_and_thread_count_do_not_change_the_result(backward_path):
    """Bit for bit: the thread count never changes the result; the visiting order neither with two passes (with one
    pass it orders the sums into dk, dv: equal up to rounding)."""
    conn = GEOMETRIES["grid_rewired"]()
    n, k = conn.index.shape
    q, kk, v, bias, w = (t.detach().float().requires_grad_(t.requires_grad) for t in _inputs(n, k, 8, 1, 16, 32))
    threads = torch.get_num_threads()
    results = []
    try:
        for order, nthreads in ((True, 1), (False, 2), (True, 2)):
            torch.set_num_threads(nthreads)
            out, wiring, _, _ = _run(conn, order)(q, kk, v, bias, w)
            results.append([out, *torch.autograd.grad(out.square().sum() + wiring, [q, kk, v, bias])])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)  # every output row is computed by one thread, in the same order
    for a, b in zip(results[0], results[1]):
        if backward_path == "two_pass":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


def test_bf16_autocast_inputs():
    conn = GEOMETRIES["grid_long_range"]()
    n, k = conn.index.shape
    q, kk, v, _, w = (t.detach().float() for t in _inputs(n, k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = sparse_attention(q.bfloat16(), kk.bfloat16(), v.bfloat16(), None, w, conn.index, conn.mask)
        out, _ = fused_sparse_attention(q.bfloat16(), kk.bfloat16(), v.bfloat16(), None, w, conn.index, conn.mask)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_fused_kernel_saves_no_edge_sized_tensors():
    """Backward recomputes the scores from the (N, B*H) log-sum-exp: nothing of size B*N*K is kept."""
    conn = Connectivity.local(grid(16, 16), 25)
    n, k = conn.index.shape
    q, kk, v, bias, w = _inputs(n, k, b=4, h=1, d=4, dv=4)

    def run():
        out, st = fused_sparse_attention(q, kk, v, bias, w, conn.index, conn.mask)
        return out, st.wiring

    saved = saved_elements(run)
    lanes_padded = 8  # float64 pads 4 lanes to 8 in the kernel's copies of q, k, v
    budget = (2 * 4 + 4) * n * lanes_padded + 3 * n * k + n * lanes_padded + n
    assert saved <= budget
    assert 4 * n * k > 2 * 4 * 4 * n  # (B*N*K probabilities alone would exceed the q/k inputs here)


@pytest.mark.parametrize("cfg", [dict(), dict(value_proj=True, attn_bias="zero", recurrent=False),
                                 dict(learn_positions=True), dict(checkpoint=True, inject="every")])
def test_sheet_on_fused_kernel_equals_gather_kernel(cfg):
    conn = Connectivity.local_plus_long_range(grid(9, 9), 12, 4, seed=0)
    ref, fused = sheet_pair(conn, "fused", **cfg)
    assert ref.block_plan() is None and isinstance(fused.block_plan(), FusedPlan)
    x = torch.randn(2, 81, 8, dtype=torch.float64)
    outs = []
    for m in (ref, fused):
        out, trace = m(x, record=("attn",))
        loss = out.square().sum() + 0.1 * trace.wiring_cost
        if trace.repulsion is not None:
            loss = loss + trace.repulsion
        loss.backward()
        outs.append((out, trace))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(torch.stack(outs[1][1].attn), torch.stack(outs[0][1].attn))
    torch.testing.assert_close(outs[1][1].attn_entropy, outs[0][1].attn_entropy)
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        assert p_ref.grad is not None, name
        torch.testing.assert_close(p_fused.grad, p_ref.grad, msg=lambda m: f"{name}: {m}")


def test_auto_runs_fused_on_cpu_and_the_cost_model_when_it_cannot_build(monkeypatch):
    conn = Connectivity.local(grid(32, 32), 64)
    sheet = Columnformer(SheetConfig(width=4, steps=1, qk_dim=2), conn.geometry, conn, "all", "all")
    assert isinstance(sheet.block_plan(), FusedPlan)
    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setattr(native, "_ERROR", "RuntimeError: no compiler (test)")
    monkeypatch.setattr("columnformer.sheet.fused_available", fused_sparse.available)
    assert type(sheet.block_plan()).__name__ == "BlockPlan"  # auto falls back to the cheaper torch kernel
    forced = Columnformer(SheetConfig(width=4, steps=1, qk_dim=2, sparse_kernel="fused"), conn.geometry, conn)
    with pytest.raises(RuntimeError, match="could not be built.*no compiler.*sparse_kernel='block' or 'gather'"):
        forced(torch.randn(1, forced.num_tokens, 4))


def test_fused_is_refused_off_cpu():
    conn = Connectivity.local(grid(4, 4), 4)
    sheet = Columnformer(SheetConfig(width=4, steps=1, qk_dim=2, sparse_kernel="fused"), conn.geometry, conn)
    sheet.edge_index = sheet.edge_index.to("meta")
    with pytest.raises(ValueError, match="CPU kernel but the sheet is on meta"):
        sheet.block_plan()
    q = torch.randn(16, 1, 1, 2, device="meta")
    with pytest.raises(ValueError, match="runs on CPU"):
        fused_sparse_attention(q, q, q, None, torch.rand(16, 4), conn.index, conn.mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernel_reads_query_and_key_slices_of_one_projection_in_place(dtype):
    """q and k as the two halves of one (N, B, 1, 2d) projection (as the sheet's fused query/key matmul makes them:
    row stride 2d, not d) give the results of contiguous copies; 8 and 3 lanes (whole and padded vectors)."""
    conn = Connectivity.local(grid(6, 6), 7)
    n, k = conn.index.shape
    for b in (8, 3):
        g = torch.Generator().manual_seed(b)
        qk = torch.randn(n, b, 1, 32, dtype=dtype, generator=g)
        v = torch.randn(n, b, 1, 16, dtype=dtype, generator=g)
        w = torch.rand(n, k, dtype=dtype, generator=g)
        q, kk = qk[..., :16], qk[..., 16:]
        assert q.stride(1) == 32
        out, st = fused_sparse_attention(q, kk, v, None, w, conn.index, conn.mask)
        ref, st_ref = fused_sparse_attention(q.contiguous(), kk.contiguous(), v, None, w, conn.index, conn.mask)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        ref_g, st_g = sparse_attention(q, kk, v, None, w, conn.index, conn.mask)
        torch.testing.assert_close(out, ref_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_one_pass_schedule_never_runs_two_readers_of_a_source_at_once(name, backward_path):
    """Blocks of one colour (run in parallel by the one-pass backward) read disjoint sets of sources, and every
    block is scheduled exactly once."""
    conn = GEOMETRIES[name]()
    index, mask = conn.index.long().contiguous(), conn.mask
    order = visit_order(conn.geometry.coords)
    blocks, phase_ptr, block = fused_sparse.backward_phases(index, mask, order)
    n = index.shape[0]
    assert sorted(blocks.tolist()) == list(range(-(-n // block)))
    assert len(phase_ptr) > 2  # several colours: the schedule is not trivially serial
    for c in range(len(phase_ptr) - 1):
        seen = set()
        for blk in blocks[phase_ptr[c]:phase_ptr[c + 1]].tolist():
            cols = order[blk * block:(blk + 1) * block]
            src = index[cols] if mask is None else index[cols][mask[cols]]
            mine = set(src.tolist())
            assert not (mine & seen), f"colour {c}: blocks share sources"
            seen |= mine


def test_auto_takes_one_pass_on_local_edges_and_two_passes_when_colouring_fails(monkeypatch):
    monkeypatch.setattr(fused_sparse, "BACKWARD", "auto")
    monkeypatch.setattr(fused_sparse, "MIN_BLOCK", 64)
    conn = Connectivity.local(grid(64, 64), 9)
    order = visit_order(conn.geometry.coords)
    index = conn.index.long().contiguous()
    assert fused_sparse._one_pass_schedule(index, conn.mask, order) is not None
    hub = index.clone()
    hub[:, 0] = 0  # every column reads column 0: all blocks conflict, 64 blocks need 64 colours
    n = 64 * 65
    hub = torch.cat([hub, hub[: n - 4096]])
    hub_order = torch.arange(n)
    assert fused_sparse.backward_phases(hub, None, hub_order) is None
    assert fused_sparse._one_pass_schedule(hub, None, hub_order) is None
    monkeypatch.setattr(fused_sparse, "BACKWARD", "one_pass")
    with pytest.raises(RuntimeError, match="more than 64 colours"):
        fused_sparse._one_pass_schedule(hub, None, hub_order)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_reader_groups_hold_the_union_of_their_readers_sources(name, backward_path):
    conn = GEOMETRIES[name]()
    index, mask = conn.index.long().contiguous(), conn.mask
    order = visit_order(conn.geometry.coords)
    uni, count, slot, _ = fused_sparse.reader_groups(index, mask, order)
    R = fused_sparse.READERS_PER_GROUP
    n = index.shape[0]
    assert len(count) == -(-n // R)
    for g in range(len(count)):
        cols = order[g * R:(g + 1) * R]
        src = index[cols] if mask is None else index[cols][mask[cols]]
        want = sorted(set(src.tolist()))
        got = uni[g, :count[g]].tolist()
        assert got == want
        for c in cols.tolist():
            ok = torch.ones(index.shape[1], dtype=torch.bool) if mask is None else mask[c]
            assert torch.equal(uni[g].long()[slot[c].long()][ok], index[c][ok])


def test_auto_takes_reader_groups_on_local_edges_only(monkeypatch):
    monkeypatch.setattr(fused_sparse, "GROUPS", "auto")
    local = Connectivity.local(grid(32, 32), 25)
    order = visit_order(local.geometry.coords)
    assert fused_sparse._groups_for(local.index.long().contiguous(), local.mask, order) is not None
    scattered = torch.randperm(1024 * 25, generator=torch.Generator().manual_seed(0)).view(1024, 25) % 1024
    assert fused_sparse._groups_for(scattered.contiguous(), None, order) is None  # ~no shared sources


def test_duplicate_edges_add_up_as_in_the_gather_kernel():
    """An edge table may name one source twice in a row (e.g. written by hand): each copy is its own edge of the
    softmax, in every kernel variant (the reader groups merge them into one union row and must add, not overwrite)."""
    conn = Connectivity.local(grid(8, 8), 9)
    index = conn.index.clone()
    index[:, 1] = index[:, 0]
    index[::3, 2] = index[::3, 0]
    conn = Connectivity.from_index(conn.geometry, index, conn.mask)
    n, k = index.shape
    check_against_gather(conn, _run(conn), _inputs(n, k))
