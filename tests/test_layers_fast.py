"""The fast paths (deferred untied weight gradients, fused q/k, fused dense attention) against plain autograd."""

from __future__ import annotations

import pytest
import torch

from columnformer.attention import dense_attention, dense_attention_reference
from columnformer.layers import UntiedLinear, native_kernels, untied_linear_fused, untied_session


@pytest.fixture(autouse=True, params=["C++ kernels", "torch"])
def layer_kernels(request):
    """Every test here runs twice: with the per-column C++ kernels where they apply and with torch's ops (the path
    on GPUs and where the kernels cannot be built)."""
    with native_kernels(request.param != "torch"):
        yield request.param


def _plain(x, layer):
    return torch.baddbmm(layer.bias.unsqueeze(1), x, layer.weight)


def _recurrent(x0, layers, steps, fused_fn):
    """A little recurrent net reusing the same untied layers every step (like the sheet)."""
    a, b, c = layers
    x = x0
    for _ in range(steps):
        qa, qb = fused_fn(x, [a, b])
        x = x + torch.tanh(c(torch.tanh(qa) * qb))
    return x


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("steps,fuse", [(1, True), (3, True), (3, False)])
def test_deferred_weight_grads_match_autograd(steps, fuse):
    torch.manual_seed(0)
    n, bsz, c = 5, 4, 6
    layers = [UntiedLinear(n, c, 7), UntiedLinear(n, c, 7), UntiedLinear(n, 7, c)]
    params = [p for layer in layers for p in layer.parameters()]
    x0 = torch.randn(n, bsz, c, requires_grad=True)

    def plain_fused(x, ls):
        return [_plain(x, layer) for layer in ls]

    ref = _recurrent(x0, layers, steps, plain_fused)
    ref.square().sum().backward()
    g_ref, gx_ref = _grads(params), x0.grad.clone()
    for p in params:
        p.grad = None
    x0.grad = None
    with untied_session(fuse=fuse):
        out = _recurrent(x0, layers, steps, untied_linear_fused)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    for g, r in zip(_grads(params), g_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x0.grad, gx_ref, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_and_retain_graph():
    torch.manual_seed(1)
    n, bsz, c = 3, 2, 4
    layers = [UntiedLinear(n, c, 5), UntiedLinear(n, c, 5), UntiedLinear(n, 5, c)]
    params = [p for layer in layers for p in layer.parameters()]
    xs = [torch.randn(n, bsz, c) for _ in range(2)]

    def plain_fused(x, ls):
        return [_plain(x, layer) for layer in ls]

    for x in xs:  # reference: two backward calls accumulate
        _recurrent(x, layers, 3, plain_fused).sum().backward()
    g_ref = _grads(params)
    for p in params:
        p.grad = None
    for x in xs:
        with untied_session():
            out = _recurrent(x, layers, 3, untied_linear_fused)
        out.sum().backward()
    for g, r in zip(_grads(params), g_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)

    # the same graph twice (retain_graph) doubles the gradients; a grad() call w.r.t. the input in
    # between must not leak stashed products into the weights' gradients
    for p in params:
        p.grad = None
    x = xs[0].clone().requires_grad_(True)
    with untied_session():
        out = _recurrent(x, layers, 3, untied_linear_fused).sum()
    torch.autograd.grad(out, x, retain_graph=True)
    out.backward(retain_graph=True)
    out.backward()
    for g, r in zip(_grads(params), _grads_single(layers, xs[0], params)):
        torch.testing.assert_close(g, 2 * r, rtol=1e-5, atol=1e-6)


def _grads_single(layers, x, params):
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    _recurrent(x, layers, 3, lambda x, ls: [_plain(x, layer) for layer in ls]).sum().backward()
    out = _grads(params)
    for p, g in zip(params, saved):
        p.grad = g
    return out


def test_no_grad_and_outside_session():
    torch.manual_seed(2)
    layer = UntiedLinear(4, 3, 2)
    x = torch.randn(4, 5, 3)
    ref = _plain(x, layer)
    with torch.no_grad(), untied_session():
        torch.testing.assert_close(layer(x), ref)
    torch.testing.assert_close(layer(x), ref)  # no session: the plain baddbmm path


def test_autocast_runs_bf16_matmuls():
    torch.manual_seed(3)
    layers = [UntiedLinear(4, 8, 8), UntiedLinear(4, 8, 8)]
    x = torch.randn(4, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), untied_session():
        ya, yb = untied_linear_fused(x, layers)
    assert ya.dtype == yb.dtype == torch.bfloat16
    (ya.float().sum() + yb.float().sum()).backward()
    assert layers[0].weight.grad.dtype == torch.float32
    ref = x.sum(1)  # d(sum y)/dW[n] = sum_b x[n, b]^T 1
    torch.testing.assert_close(layers[0].weight.grad, ref.unsqueeze(-1).expand(4, 8, 8), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_dense_attention_matches_reference(heads, with_bias):
    torch.manual_seed(4)
    n, bsz, d, dv = 7, 3, 4, 5
    q = torch.randn(n, bsz, heads, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, bsz, heads, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, bsz, heads, dv, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, n, dtype=torch.float64, requires_grad=True) if with_bias else None
    w = torch.rand(n, n, dtype=torch.float64)
    inputs = [t for t in (q, k, v, bias) if t is not None]
    results = []
    for fn in (dense_attention, dense_attention_reference):
        out, stats = fn(q, k, v, bias, w, record_attn=True)
        loss = (out * torch.linspace(-1, 1, dv, dtype=torch.float64)).sum() + 3.0 * stats.wiring
        grads = torch.autograd.grad(loss, inputs)
        results.append((out, stats, grads))
    (o1, s1, g1), (o2, s2, g2) = results
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(s1.wiring, s2.wiring)
    torch.testing.assert_close(s1.entropy, s2.entropy)
    torch.testing.assert_close(s1.attn, s2.attn)
    assert not s1.entropy.requires_grad
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_columnformer_fast_path_matches_plain_layers():
    """The whole recurrent sheet: fast path (session) vs the same model with sessions disabled."""
    import columnformer.sheet as sheet_mod
    from columnformer import build_model

    torch.manual_seed(5)
    model = build_model("digits").double()
    img = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    out, trace = model(img)
    (out.square().sum() + 0.05 * trace.wiring_cost).backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    import contextlib

    original = sheet_mod.untied_session
    sheet_mod.untied_session = lambda fuse=True: contextlib.nullcontext()  # plain autograd through UntiedLinear.forward
    try:
        out2, trace2 = model(img)
        (out2.square().sum() + 0.05 * trace2.wiring_cost).backward()
    finally:
        sheet_mod.untied_session = original
    torch.testing.assert_close(out, out2)
    for k, p in model.named_parameters():
        torch.testing.assert_close(fast[k], p.grad, msg=k)


def test_only_sheets_that_reuse_their_layers_concatenate_weights():
    """q and k weights are concatenated once per forward when the unrolled sheet reuses them; a feed-forward
    sheet uses each layer once, where the copy would cost more than it saves, and a checkpointing sheet (the memory
    mode) keeps them separate: the copy would stay alive through the whole backward (4 KiB per column of the
    benchmark sheet), and measured at 65,536 columns the two separate matmuls cost no time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from columnformer.config import build_config
    from columnformer.factory import build_model

    class CatSizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.cat.default:
                self.sizes.append(sum(t.numel() for t in args[0]))
            return func(*args, **(kwargs or {}))

    img = torch.randn(2, 1, 8, 8)
    for recurrent, checkpoint in ((False, False), (True, False), (True, True)):
        flag = str(recurrent).lower()
        cfg = build_config({}, ["preset=digits", f"model.sheet.recurrent={flag}", f"model.sheet.time_embed={flag}",
                                f"model.sheet.checkpoint={str(checkpoint).lower()}"]).model
        model = build_model(cfg)
        qk = 2 * model.sheet.blocks[0].attn.q.weight.numel()
        with CatSizes() as mode:
            out, _ = model(img)
        assert (qk in mode.sizes) == (recurrent and not checkpoint), (recurrent, checkpoint, mode.sizes)
        out.sum().backward()  # both paths train
        assert model.sheet.blocks[0].attn.q.weight.grad.abs().sum() > 0


def test_recomputed_mlp_matches_the_stored_one_and_saves_less(layer_kernels):
    """Mlp(recompute=True) in a session: the same output and gradients (MLP reused over 3 steps, fc1/fc2 weight
    and bias gradients accumulated), and its graph saves fewer bytes (no hidden activations). The stored MLP keeps
    two hidden tensors per use with torch's ops (pre-activation and GELU output) and one with the C++ kernels (whose
    second layer applies GELU to its input itself)."""
    from columnformer.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(5, 8, 12, untied=True)
    with torch.no_grad():
        for p in (mlp.fc1.bias, mlp.fc2.bias):
            p.normal_()
    x0 = torch.randn(5, 4, 8)
    results = []
    for recompute in (False, True):
        mlp.recompute = recompute
        mlp.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), untied_session():
            h = x
            for _ in range(3):
                h = h + mlp(h)
        (h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum().backward()
        results.append((h.detach(), x.grad, [p.grad.clone() for p in mlp.parameters()], sum(saved)))
    (y0, gx0, gp0, bytes0), (y1, gx1, gp1, bytes1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b)
    hidden = 3 * 5 * 4 * 12 * 4  # bytes of one (N, B, hidden) tensor per use, 3 uses
    kept = 1 if layer_kernels == "C++ kernels" else 2
    assert bytes1 <= bytes0 - kept * hidden + 3 * 5 * 12 * 4  # the hidden tensors gone (the recompute keeps fc1's bias)
