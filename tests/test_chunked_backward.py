"""Chunked backward (issue 17, memory): exact per-column gradients chunk by chunk, the optimizer stepped in parts."""

from __future__ import annotations

import copy

import pytest
import torch

from columnformer import Columnformer, SheetConfig, grid
from columnformer import optim as cf_optim
from columnformer.chunked_backward import ChunkedBackward, chunked_step, per_column_block_parameters, plan_chunks
from columnformer.connectivity import Connectivity
from columnformer.layers import UntiedLinear, untied_session
from columnformer.optim import AdamW

GEO = grid(24, 32)  # 768 columns: three chunks of 256


def _sheet(dtype=torch.float32, conn=None, **cfg):
    torch.manual_seed(0)
    opts = dict(width=8, steps=3, heads=2, qk_dim=4, mlp_ratio=1.0, checkpoint=True, sparse_kernel="fused")
    opts.update(cfg)
    model = Columnformer(SheetConfig(**opts), GEO, conn or Connectivity.local(GEO, 12), input_area="all",
                         output_area="all").to(dtype)
    with torch.no_grad():  # away from the initialisation's zeros and ones, so every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _loss_fn(model, tokens, wiring=0.3):
    def loss_fn():
        out, trace = model(tokens)
        return out.square().mean() + wiring * trace.wiring_cost
    return loss_fn


CASES = {
    "fused, checkpointed": dict(),
    "gather, no checkpointing": dict(sparse_kernel="gather", checkpoint=False),
    "block kernel": dict(sparse_kernel="block"),
    "long-range edges": dict(conn="long"),
    "feed-forward, value projections, time embedding, inject every": dict(
        recurrent=False, value_proj=True, inject="every"),
    "recurrent with time embedding": dict(time_embed=True),
    "selection queries": dict(attn_mode="selection"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_gradients_equal_autograd(case):
    """Every chunk's gradient rows of every per-column parameter equal autograd's gradient of the whole sheet (float64,
    loss with the wiring cost); the chunks cover every row once. Fails if R(S) or E(S) missed a reader or a source,
    the wiring derivative were scaled wrongly, a step's output gradient were paired with another step's input, or
    the input gradient of pass A's chunks were wrong (then the gradients of earlier steps would be)."""
    opts = dict(CASES[case])
    conn = Connectivity.local_plus_long_range(GEO, 10, 3) if opts.pop("conn", None) == "long" else None
    model = _sheet(torch.float64, conn, **opts)
    tokens = torch.randn(2, GEO.n, 8, dtype=torch.float64)
    _loss_fn(model, tokens)().backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got: dict[str, dict[int, torch.Tensor]] = {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    chunked_step(model, opt, _loss_fn(model, tokens), chunk_columns=256, input_chunk_columns=256,
                 on_gradient=lambda name, start, g: got.setdefault(name, {}).__setitem__(start, g.clone()))
    per_column = per_column_block_parameters(model)
    assert set(got) == set(per_column)
    for name, parts in got.items():
        assert sorted(parts) == [0, 256, 512]
        g = torch.cat([parts[s] for s in sorted(parts)])
        torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit", "bf16"])
def test_chunked_step_equals_the_standard_step(state_dtype):
    """Three training steps with the chunked backward give the weights of three standard steps (loss.backward(),
    optimizer.step()), every parameter included (the position embedding's gradient comes from pass A). Fails if a
    chunk's rows were stepped before a later chunk that reads them had recomputed (the halo rows' deferred write),
    a row were stepped twice or not at all, or a step's counter advanced per chunk."""
    a = _sheet()
    b = copy.deepcopy(a)

    def make(m):
        if state_dtype == "fp32":
            return torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        return AdamW(m.parameters(), lr=1e-2, state_dtype=state_dtype)

    opt_a, opt_b = make(a), make(b)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        tokens = torch.randn(2, GEO.n, 8, generator=gen)
        loss = _loss_fn(a, tokens)()
        loss.backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        loss_b = chunked_step(b, opt_b, _loss_fn(b, tokens), chunk_columns=256)
        assert abs(loss.item() - loss_b.item()) < 1e-5
        assert all(p.grad is None for p in b.parameters())
    # fp32: gradients differ by summation order only; 8-bit / bf16: an occasional code or rounding one step apart
    tol = 2e-5 if state_dtype == "fp32" else 2e-3
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa - pb).abs().max() < tol, name
    start = _sheet()
    moved = max((pa - p0).abs().max().item() for pa, p0 in zip(a.parameters(), start.parameters()))
    assert moved > 0.02  # the steps moved the weights far more than the tolerance


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit", "bf16"])
def test_optimizer_parts_equal_the_whole_step(state_dtype):
    """:func:`optim.step_part` over a parameter's block-aligned parts (one part stepped in a copy, as the halo rows are)
    gives bit for bit the weights and moments of the optimizer's own step with the same gradient (bf16: the same
    rounding noise, counted from each part's offset)."""
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(12, 32, 16))
    p2 = torch.nn.Parameter(p1.detach().clone())
    grads = [torch.randn(12, 32, 16) for _ in range(3)]

    def make(p):
        if state_dtype == "fp32":
            return torch.optim.AdamW([p], lr=3e-2, weight_decay=0.1, fused=True)
        return AdamW([p], lr=3e-2, weight_decay=0.1, state_dtype=state_dtype, seed=3)

    o1, o2 = make(p1), make(p2)
    for g in grads:
        p1.grad = g.clone()
        o1.step()
        cf_optim.begin_parts(o2, p2)
        with torch.no_grad():
            cf_optim.step_part(o2, p2, 0, g[:4], p2.data[:4])  # rows 0-3: 2,048 elements, 8 blocks
            copy_rows = p2.data[4:10].clone()
            cf_optim.step_part(o2, p2, 4 * 512, g[4:10], copy_rows)
            cf_optim.step_part(o2, p2, 10 * 512, g[10:], p2.data[10:])
            p2.data[4:10].copy_(copy_rows)
    assert torch.equal(p1, p2)
    for key, value in o1.state[p1].items():
        assert torch.equal(value, o2.state[p2][key]), key


def test_eight_bit_parts_must_start_on_a_block():
    p = torch.nn.Parameter(torch.randn(4, 100))
    opt = AdamW([p], lr=1e-2, state_dtype="8bit")
    cf_optim.begin_parts(opt, p)
    with pytest.raises(ValueError, match="whole blocks"):
        cf_optim.step_part(opt, p, 100, torch.zeros(3, 100), p.data[1:])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [None, slice(1, 4)])
def test_accumulate_into_buffers_sums_without_autograd_gradients(native, rows):
    """``untied_session(accumulate=..., rows=...)``: two backward passes add an untied layer's weight and bias gradients
    (of the given columns) into the given buffers, equal to autograd's sums, leave ``.grad`` None and still return
    every column's input gradient; with the C++ kernels and with torch's ops."""
    from columnformer.layers import native_kernels

    torch.manual_seed(0)
    layer = UntiedLinear(5, 4, 3).double()
    xs = [torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    grads = [torch.autograd.grad(layer(x).square().sum(), [layer.weight, layer.bias, x]) for x in xs]
    ref_w, ref_b = grads[0][0] + grads[1][0], grads[0][1] + grads[1][1]
    r = rows or slice(None)
    buf_w, buf_b = torch.zeros_like(layer.weight[r]), torch.zeros_like(layer.bias[r])
    with native_kernels(native):
        for x, (_, _, ref_x) in zip(xs, grads):
            x.grad = None
            with untied_session(fuse=False, accumulate={id(layer.weight): buf_w, id(layer.bias): buf_b}, rows=rows):
                layer(x).square().sum().backward()  # the whole graph, the weight's tap included
            torch.testing.assert_close(x.grad, ref_x)
    assert layer.weight.grad is None and layer.bias.grad is None
    torch.testing.assert_close(buf_w, ref_w[r])
    torch.testing.assert_close(buf_b, ref_b[r])


def test_chunks_cover_the_sheet_and_their_ranges_hold_readers_and_sources():
    model = _sheet()
    chunks = plan_chunks(model.edge_index, model.edge_mask, 300)  # rounded up to 512
    assert [(c.start, c.stop) for c in chunks] == [(0, 512), (512, 768)]
    index, mask = model.edge_index, model.edge_mask
    for c in chunks:
        readers = ((index >= c.start) & (index < c.stop) & mask).any(1)
        readers[c.start:c.stop] = True
        rows = readers.nonzero().squeeze(1)
        assert c.lo <= int(rows.min()) and int(rows.max()) < c.hi
        sources = index[readers][mask[readers]]
        assert c.lo <= int(sources.min()) and int(sources.max()) < c.hi
        assert c.lo > 0 or c.hi < GEO.n  # local edges: a chunk's range is not the whole sheet


@pytest.mark.parametrize("bad, match", [
    (dict(halting="act"), "halting"),
    (dict(untied_mlp=False), "per-column"),
    (dict(mixture="static"), "mixture"),
])
def test_unsupported_sheets_are_refused(bad, match):
    model = _sheet(**bad)
    with pytest.raises(ValueError, match=match):
        ChunkedBackward(model, torch.optim.AdamW(model.parameters()))


def test_unsupported_optimizers_are_refused():
    model = _sheet()
    with pytest.raises(ValueError, match="AdamW"):
        ChunkedBackward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="dense"):
        dense = Columnformer(SheetConfig(width=8, steps=2, qk_dim=4), grid(4, 4), input_area="all")
        ChunkedBackward(dense, torch.optim.AdamW(dense.parameters()))


def test_backward_needs_the_forward_inside_its_context():
    model = _sheet()
    cb = ChunkedBackward(model, torch.optim.AdamW(model.parameters()))
    loss = _loss_fn(model, torch.randn(2, GEO.n, 8))()
    with pytest.raises(RuntimeError, match="forward"):
        cb.backward(loss)


def test_trainer_with_chunked_backward_trains_as_without(tmp_path):
    """train.chunked_backward reaches the trainer: six steps on digits (a local sheet) end with the weights of the
    same run without it (float rounding apart), and its clashes are refused with the key to change."""
    from columnformer.checkpoint import load_checkpoint
    from columnformer.config import ConfigError, build_config
    from columnformer.train import train

    base = ["preset=digits", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2",
            "model.connectivity.kind=local", "model.connectivity.k=8", "optim.grad_clip=null", "train.wiring_lambda=0.1",
            "train.batch_size=64", "train.threads=1", "train.progress=false", "train.figures=false", "train.epochs=1",
            "train.max_steps=6", "train.log_every=3", "train.ckpt_every=6", f"out_dir={tmp_path}"]
    train(build_config({}, [*base, "name=plain"]))
    train(build_config({}, [*base, "name=chunked", "train.chunked_backward=256"]))
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
    chunked = load_checkpoint(tmp_path / "chunked" / "checkpoints" / "last.pt")["model"]
    train(build_config({}, [*base, "name=early", "train.max_steps=1"]))
    early = load_checkpoint(tmp_path / "early" / "checkpoints" / "last.pt")["model"]
    moved = 0.0
    for k, v in plain.items():
        if not v.is_floating_point():
            assert torch.equal(chunked[k], v), k
            continue
        assert (chunked[k] - v).abs().max() < 1e-4, k
        moved = max(moved, float((v - early[k]).abs().max()))
    assert moved > 1e-3  # steps 2-6 moved the weights far more than the tolerance
    with pytest.raises(ConfigError, match="optim.grad_clip"):
        build_config({}, [*base[:6], *base[7:], "name=x", "train.chunked_backward=256"])
    for bad in ("optim.accum_steps=2", "train.precision=bf16", "train.compile=true"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            build_config({}, [*base, "name=x", "train.chunked_backward=256", bad])


def test_chunks_are_planned_again_when_the_edges_change():
    """One ChunkedBackward over two steps: after an edge is rewired in place to a far column (as rewiring does), the
    chunks' ranges are planned again and the gradients still equal autograd's. Fails if the plan were cached past
    a change of the edge buffers (the new far source would lie outside its reader's range)."""
    model = _sheet(torch.float64)
    tokens = torch.randn(2, GEO.n, 8, dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)  # weights stay: both steps see the same
    got: dict[str, dict[int, torch.Tensor]] = {}
    cb = ChunkedBackward(model, opt, chunk_columns=256,
                         on_gradient=lambda name, start, g: got.setdefault(name, {}).__setitem__(start, g.clone()))
    for rewire in (False, True):
        if rewire:
            with torch.no_grad():
                model.edge_index[700, 3] = 5  # column 700 now reads column 5, two chunks away
        got.clear()
        with cb.forward():
            loss = _loss_fn(model, tokens)()
        cb.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _loss_fn(model, tokens)().backward()
        for name, p in per_column_block_parameters(model).items():
            g = torch.cat([got[name][s] for s in sorted(got[name])])
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12, msg=name)
        model.zero_grad(set_to_none=True)
