"""The FlexAttention backend (the CUDA path): the gather kernel's math through FlexAttention block masks.

torch 2.13 has no FlexAttention backward on CPU; torch's eager math reference of FlexAttention
(which the CUDA kernel is tested against upstream) does differentiate on CPU once its device check
is lifted, so these tests check this backend's values *and* gradients there. Speed on CUDA: unmeasured.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import columnformer.flex_sparse as flex_sparse
from columnformer import Columnformer, SheetConfig, grid
from columnformer.block_sparse import BlockPlan
from columnformer.connectivity import Connectivity
from columnformer.flex_sparse import FlexPlan, build_flex_plan, flex_sparse_attention
from columnformer.sparse_attention import sparse_attention
from test_block_sparse import GEOMETRIES, _inputs, check_against_gather


@pytest.fixture
def cpu_backward(monkeypatch):
    """Let torch's eager FlexAttention reference differentiate on CPU (test seam; CUDA needs neither patch)."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)
    monkeypatch.setattr(flex_sparse, "check_backward_supported", lambda *a: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        yield


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_flex_backend_equals_gather_kernel(name, cpu_backward):
    conn = GEOMETRIES[name]()
    n, k = conn.index.shape
    tile, min_edges = (16, 4) if name != "coords_local" else (32, 1)
    plan = build_flex_plan(conn.geometry.coords, conn.index, conn.mask, tile=tile, min_block_edges=min_edges)
    if name in ("grid_long_range", "grid_rewired", "stacked_long_range"):
        assert plan.gathered > 0  # the gathered part and the log-sum-exp merge are exercised
    check_against_gather(conn, lambda q, kk, v, bias, w: flex_sparse_attention(
        q, kk, v, bias, w, plan, conn.index, conn.mask, record_attn=True), _inputs(n, k, b=2, h=1))


def test_flex_plan_partitions_the_edges_and_its_block_mask_covers_them():
    conn = Connectivity.local_plus_long_range(grid(12, 12), 9, 3, seed=5)
    n, k = conn.index.shape
    plan = build_flex_plan(conn.geometry.coords, conn.index, conn.mask, tile=16, min_block_edges=3)
    assert plan.gathered > 0 and plan.kv_blocks.shape[1] > 1
    # every valid edge exactly once: in the tile table (found by the lookup) or in the gathered list
    q_rows, kv_rows = torch.meshgrid(torch.arange(plan.rows), torch.arange(plan.rows), indexing="ij")
    e = plan.edge_lookup(q_rows, kv_rows)  # (R, R)
    found = {(int(plan.perm[r]), int(e[r, c])): int(plan.perm[c]) for r, c in zip(*torch.nonzero(e >= 0).T)}
    for i, j in zip(*np.nonzero(plan.g_valid.numpy())):
        key = (int(i), int(plan.g_edge[i, j]))
        assert key not in found
        found[key] = int(plan.g_src[i, j])
    want = {(i, e_): int(conn.index[i, e_]) for i in range(n) for e_ in range(k) if conn.mask[i, e_]}
    assert found == want
    # the FlexAttention block mask lists exactly the tiles holding table edges
    dense = plan.block_mask().to_dense()[0, 0]  # (T, T)
    has_edge = torch.zeros_like(dense, dtype=torch.bool)
    r, c = torch.nonzero(e >= 0).T
    has_edge[r // plan.tile, c // plan.tile] = True
    assert torch.equal(dense.bool(), has_edge)


def test_flex_backend_without_bias_and_in_bf16():
    conn = GEOMETRIES["grid_long_range"]()
    n, k = conn.index.shape
    plan = build_flex_plan(conn.geometry.coords, conn.index, conn.mask, tile=16, min_block_edges=4)
    q, kk, v, _, w = (x.detach() if x is not None else None for x in _inputs(n, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, st = sparse_attention(q, kk, v, None, w, conn.index, conn.mask)
        out, wiring, _, _ = flex_sparse_attention(q, kk, v, None, w, plan, conn.index)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(wiring, st.wiring)
        out_bf, _, _, _ = flex_sparse_attention(q.bfloat16(), kk.bfloat16(), v.bfloat16(), None, w.float(), plan, conn.index)
    assert out_bf.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_flex_backend_refuses_cpu_training_and_large_eager_calls():
    conn = GEOMETRIES["grid_local"]()
    n, k = conn.index.shape
    plan = build_flex_plan(conn.geometry.coords, conn.index, conn.mask, tile=16)
    q, kk, v, bias, w = _inputs(n, k)
    with pytest.raises(RuntimeError, match="sparse_kernel='block'"):
        flex_sparse_attention(q, kk, v, bias, w, plan, conn.index)
    big = Connectivity.local(grid(96, 96), 9)
    plan = build_flex_plan(big.geometry.coords, big.index, big.mask)
    x = torch.zeros(96 * 96, 1, 1, 4)
    with pytest.raises(RuntimeError, match="eager FlexAttention reference"):
        flex_sparse_attention(x, x, x, None, torch.ones(96 * 96, 9), plan, big.index)


def _sheets(conn, **cfg):
    base = dict(width=8, steps=2, qk_dim=4, heads=2, **cfg)
    torch.manual_seed(0)
    ref = Columnformer(SheetConfig(**base, sparse_kernel="gather"), conn.geometry, conn, "all", "all").double()
    flex = Columnformer(SheetConfig(**base, sparse_kernel="flex"), conn.geometry, conn, "all", "all").double()
    flex.load_state_dict(ref.state_dict())
    return ref, flex


def test_sheet_runs_flex_on_cuda_and_the_block_kernel_on_cpu(cpu_backward, monkeypatch):
    conn = Connectivity.local_plus_long_range(grid(8, 8), 9, 3, seed=0)
    ref, flex = _sheets(conn)
    assert isinstance(flex.block_plan(), BlockPlan)  # CPU: the block kernel, same math
    monkeypatch.setattr("columnformer.sheet.flex_runs_on", lambda device: True)  # as on CUDA
    flex.edge_index.add_(0)  # bump the edge version: the plan is rebuilt
    assert isinstance(flex.block_plan(), FlexPlan)
    x = torch.randn(2, 64, 8, dtype=torch.float64)
    results = []
    for m in (ref, flex):
        out, trace = m(x, record=("attn",))
        (out.square().sum() + 0.1 * trace.wiring_cost).backward()
        results.append((out, trace))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(torch.stack(results[1][1].attn), torch.stack(results[0][1].attn))
    for (name, p_ref), p_flex in zip(ref.named_parameters(), flex.parameters()):
        torch.testing.assert_close(p_flex.grad, p_ref.grad, msg=lambda m: f"{name}: {m}")


def test_flex_refuses_activation_checkpointing():
    """torch's FlexAttention gets a learned score_mod bias's gradient wrong under non-reentrant checkpointing
    (reproduced on CPU with torch alone, see BENCHMARKS.md), so the sheet refuses the pair."""
    with pytest.raises(ValueError, match="sparse_kernel=flex with checkpoint=true is refused"):
        SheetConfig(width=4, sparse_kernel="flex", checkpoint=True)
    SheetConfig(width=4, sparse_kernel="block", checkpoint=True)  # the CPU kernel checkpoints fine


def test_tiled_kernels_refuse_learned_positions():
    with pytest.raises(ValueError, match="sparse_kernel=flex: set sparse_kernel to 'gather', 'fused' or 'auto'"):
        SheetConfig(width=4, learn_positions=True, sparse_kernel="flex")
    with pytest.raises(ValueError, match="learn_positions"):
        SheetConfig(width=4, learn_positions=True, sparse_kernel="block")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention path needs CUDA (none here)")
def test_compiled_flex_on_cuda_equals_gather_kernel():
    """On a GPU: the compiled kernel (what training runs), fp32, against the gather kernel, values and gradients."""
    conn = Connectivity.local_plus_long_range(grid(32, 32), 16, 4, seed=0)
    n, k = conn.index.shape
    dev = torch.device("cuda")
    plan = build_flex_plan(conn.geometry.coords, conn.index, conn.mask).to(dev)
    index, mask = conn.index.to(dev), conn.mask.to(dev)
    q, kk, v, bias, w = (x.detach().float().to(dev).requires_grad_(x.requires_grad) for x in _inputs(n, k, b=2, h=2, d=16, dv=16))
    ref, st = sparse_attention(q, kk, v, bias, w, index, mask)
    g_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g_out).sum() + 3.0 * st.wiring, [q, kk, v, bias])
    out, wiring, entropy, _ = flex_sparse_attention(q, kk, v, bias, w, plan, index, mask)
    grads = torch.autograd.grad((out * g_out).sum() + 3.0 * wiring, [q, kk, v, bias])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wiring, st.wiring, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(entropy, st.entropy, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
