"""The per-column layers' C++ kernels (csrc/column_ops.cpp) against the same layers in torch (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from columnformer import Columnformer, SheetConfig, grid, native
from columnformer.connectivity import Connectivity
from columnformer.layers import UntiedLayerNorm, UntiedLinear, native_kernels, untied_linear_fused, untied_session

pytestmark = pytest.mark.skipif(not native.available(), reason=f"C++ kernels not built: {native.load_error()}")


@pytest.fixture
def calls(monkeypatch):
    """Counts the C++ kernels' calls (so a test cannot pass by comparing torch with torch)."""
    ext, counts = native.load(), {}
    for name in ("linear_forward", "linear_backward", "norm_forward", "norm_backward"):
        def counted(*a, _f=getattr(ext, name), _n=name):
            counts[_n] = counts.get(_n, 0) + 1
            return _f(*a)
        monkeypatch.setattr(ext, name, counted)
    return counts


def _grads(params, x, run):
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    outs = run(x)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], x.grad, [p.grad.clone() for p in params]


def _same(run, params, x, tol):
    with native_kernels(False):
        ref = _grads(params, x, run)
    got = _grads(params, x, run)
    for a, b in zip(ref[0] + [ref[1]] + ref[2], got[0] + [got[1]] + got[2]):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("n,b,i,o", [(6, 8, 32, 32), (5, 3, 5, 13), (4, 11, 7, 40)])
def test_untied_linears_reused_in_a_session_match_torch(calls, dtype, tol, n, b, i, o):
    """Query and key concatenated (split weight gradients), each used 3 times (accumulated gradients), biases;
    batch and widths that are not whole vectors (remainder rows and columns)."""
    torch.manual_seed(0)
    q, k = UntiedLinear(n, i, o).to(dtype), UntiedLinear(n, i, o // 2 + 1).to(dtype)
    with torch.no_grad():
        for p in (q.bias, k.bias):
            p.normal_()
    mlp = UntiedLinear(n, o, i, bias=False).to(dtype)
    params = [q.weight, k.weight, q.bias, k.bias, mlp.weight]

    def run(x):
        outs = []
        with untied_session():
            h = x
            for _ in range(3):
                a, c = untied_linear_fused(h, [q, k])
                h = h + torch.tanh(mlp(a))
                outs += [c]
        return outs + [h]

    _same(run, params, torch.randn(n, b, i, dtype=dtype), tol)
    assert calls["linear_forward"] == 6 and calls["linear_backward"] == 6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_untied_layer_norm_matches_torch(calls, dtype, tol):
    torch.manual_seed(0)
    norm = UntiedLayerNorm(5, 12).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    _same(lambda x: [norm(x) * 1.5, norm(x.flip(1))], [norm.weight, norm.bias], 3 * torch.randn(5, 7, 12, dtype=dtype) + 1, tol)
    assert calls["norm_forward"] == 2 and calls["norm_backward"] == 2


def test_a_recurrent_sparse_sheet_matches_torch_layers(calls):
    """A whole training step's gradients through the sheet (norms, query/key, MLP over 3 steps) agree."""
    torch.manual_seed(0)
    conn = Connectivity.local(grid(6, 6), 8)
    sheet = Columnformer(SheetConfig(width=8, steps=3, qk_dim=4, sparse_kernel="gather"), conn.geometry, conn, "all", "all")
    params = [p for p in sheet.parameters() if p.requires_grad]
    _same(lambda x: [sheet(x)[0]], params, torch.randn(4, sheet.num_tokens, 8), 5e-5)
    assert calls["linear_backward"] > 0 and calls["norm_backward"] > 0


def test_low_precision_and_disabled_kernels_run_torch(calls):
    lin, norm = UntiedLinear(3, 8, 8), UntiedLayerNorm(3, 8)
    with untied_session(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 weights and inputs: torch's GEMM
        lin(torch.randn(3, 2, 8)).float().sum().backward()
    with native_kernels(False):
        norm(torch.randn(3, 2, 8)).sum().backward()
    assert calls == {}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_the_kernels_gelu_input_is_torchs_exact_gelu_and_its_derivative(dtype, tol):
    """With identity weights the layer's output is GELU(x) itself and its input gradient GELU'(x): checked over
    [-12, 12], where the float erf approximation and the exp polynomial have to hold."""
    ext = native.load()
    x = torch.linspace(-12, 12, 4 * 8 * 64, dtype=dtype).view(4, 8, 64)
    eye = torch.eye(64, dtype=dtype).expand(4, 64, 64).contiguous()
    y = ext.linear_forward(x, eye, x.new_empty(0), True)
    torch.testing.assert_close(y, torch.nn.functional.gelu(x), rtol=tol, atol=tol)
    g = torch.randn_like(x)
    dx = ext.linear_backward(x, eye, g, [], x.new_empty(0), True, False, True)
    torch.testing.assert_close(dx, torch.ops.aten.gelu_backward(g, x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("recompute", [False, True])
def test_an_untied_mlp_reading_gelu_inside_the_kernel_matches_torch(calls, dtype, tol, recompute):
    """Mlp(untied) used 3 times in a session: the second layer applies GELU to its input inside the C++ kernel
    (forward, input gradient, recomputed for the weight gradient); values and every gradient as torch's layers."""
    from columnformer.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(5, 12, 20, True, recompute=recompute).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(std=0.2)  # pre-activations of spread ~1.4: GELU far from linear

    def run(x):
        with untied_session():
            h = x
            for _ in range(3):
                h = h + mlp(h)
        return [h]

    _same(run, list(mlp.parameters()), 2 * torch.randn(5, 7, 12, dtype=dtype), tol)
    assert calls["linear_forward"] == (9 if recompute else 6) and calls["linear_backward"] == 6
