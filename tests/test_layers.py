"""Per-column layers and the dense attention kernel against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from columnformer.attention import ColumnAttention, dense_attention, local_bias_init
from columnformer.layers import Mlp, TiedLinear, UntiedLayerNorm, UntiedLinear, layer_norm, linear


# ------------------------------------------------------------------ UntiedLinear
@pytest.mark.parametrize("bias", [True, False])
def test_untied_linear_equals_per_column_loop(bias, randomize):
    n, b, cin, cout = 5, 3, 7, 4
    layer = randomize(UntiedLinear(n, cin, cout, bias=bias))
    assert layer.weight.shape == (n, cin, cout)
    assert (layer.bias is None) == (not bias)
    x = torch.randn(n, b, cin)
    y = layer(x)
    assert y.shape == (n, b, cout)
    for i in range(n):
        ref = x[i] @ layer.weight[i]
        if bias:
            ref = ref + layer.bias[i]
        torch.testing.assert_close(y[i], ref)
    # columns really are independent: changing column 2's weight changes only column 2's output
    with torch.no_grad():
        layer.weight[2] += 1.0
    y2 = layer(x)
    changed = (y2 - y).abs().amax(dim=(1, 2)) > 1e-6
    assert changed.tolist() == [False, False, True, False, False]


def test_untied_linear_gradients_match_loop(randomize):
    n, b, cin, cout = 4, 2, 3, 5
    layer = randomize(UntiedLinear(n, cin, cout)).double()
    x = torch.randn(n, b, cin, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    bb = layer.bias.detach().clone().requires_grad_(True)
    g = torch.randn(n, b, cout, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.stack([x2[i] @ w[i] + bb[i] for i in range(n)])
    (ref * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.bias.grad, bb.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_untied_linear_init_and_shape_errors():
    layer = UntiedLinear(64, 32, 16)
    assert layer.bias.abs().sum() == 0
    assert 0.01 < layer.weight.std().item() < 0.03  # trunc_normal std 0.02
    with pytest.raises(ValueError, match="N=64"):
        layer(torch.randn(63, 2, 32))
    with pytest.raises(ValueError, match="32"):
        layer(torch.randn(64, 2, 31))


# ------------------------------------------------------------------ UntiedLayerNorm
def test_untied_layer_norm_equals_per_column_functional(randomize):
    n, b, c = 6, 4, 9
    ln = randomize(UntiedLayerNorm(n, c))
    x = torch.randn(n, b, c) * 3 + 1
    y = ln(x)
    assert y.shape == (n, b, c)
    for i in range(n):
        ref = F.layer_norm(x[i], (c,), weight=ln.weight[i], bias=ln.bias[i], eps=ln.eps)
        torch.testing.assert_close(y[i], ref)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_untied_layer_norm_gradients_equal_per_column_functional(randomize, dtype, recompute):
    """Input, weight and bias gradients equal those of F.layer_norm applied column by column, whether the
    normalised input is stored or recomputed in backward."""
    n, b, c = 5, 3, 7
    ln = randomize(UntiedLayerNorm(n, c, recompute=recompute)).to(dtype)
    x = (torch.randn(n, b, c, dtype=dtype) * 3 + 1).requires_grad_()
    g = torch.randn(n, b, c, dtype=dtype)
    (ln(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w2, b2 = ln.weight.detach().clone().requires_grad_(), ln.bias.detach().clone().requires_grad_()
    ref = torch.stack([F.layer_norm(x2[i], (c,), weight=w2[i], bias=b2[i], eps=ln.eps) for i in range(n)])
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ln.weight.grad, w2.grad)
    torch.testing.assert_close(ln.bias.grad, b2.grad)


def test_untied_layer_norm_saves_only_its_input_and_the_statistics():
    """Memory for wide sheets (recompute, set by checkpointing sheets): besides the input (which the residual
    stream keeps anyway), only (N, B) statistics and the (N, C) weight are saved for backward; no second (N, B, C)
    tensor. A sheet with checkpoint=true switches it on in its norms, one without leaves it off."""
    from columnformer import Columnformer, SheetConfig, grid

    for ckpt in (False, True):
        sheet = Columnformer(SheetConfig(width=8, qk_dim=4, steps=2, checkpoint=ckpt), grid(2, 2))
        norms = [m for m in sheet.modules() if isinstance(m, UntiedLayerNorm)]
        assert norms and all(m.recompute == ckpt for m in norms)
    n, b, c = 6, 4, 16
    ln = UntiedLayerNorm(n, c, recompute=True)
    x = torch.randn(n, b, c, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ln(x)
    big = [t for t in saved if t.numel() >= n * b * c]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved) <= n * b * c + 2 * n * b + n * c


def test_untied_layer_norm_under_bf16_autocast_normalises_in_float32():
    ln = UntiedLayerNorm(3, 8, recompute=True)
    x = torch.randn(3, 2, 8).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.layer_norm(x.float(), (8,)))
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_untied_layer_norm_default_is_plain_layer_norm():
    ln = UntiedLayerNorm(3, 8)
    x = torch.randn(3, 2, 8)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (8,)))
    assert ln.weight.shape == (3, 8) and ln.bias.shape == (3, 8)


def test_layer_factories_choose_tied_or_untied():
    assert isinstance(linear(4, 3, 2, untied=True), UntiedLinear)
    tied = linear(4, 3, 2, untied=False)
    assert isinstance(tied, TiedLinear) and tied.weight.shape == (2, 3)
    assert isinstance(layer_norm(4, 3, untied=True), UntiedLayerNorm)
    assert isinstance(layer_norm(4, 3, untied=False), torch.nn.LayerNorm)


@pytest.mark.parametrize("untied", [True, False])
def test_mlp_equals_reference(untied, randomize):
    n, b, c, h = 3, 2, 6, 2
    mlp = randomize(Mlp(n, c, h, untied))
    x = torch.randn(n, b, c)
    y = mlp(x)
    for i in range(n):
        if untied:
            hid = F.gelu(x[i] @ mlp.fc1.weight[i] + mlp.fc1.bias[i])
            ref = hid @ mlp.fc2.weight[i] + mlp.fc2.bias[i]
        else:
            ref = F.linear(F.gelu(F.linear(x[i], mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
        torch.testing.assert_close(y[i], ref)


# ------------------------------------------------------------------ dense attention
def _reference_attention(q, k, v, bias, w):
    """Explicit loops over batch, head and query. q, k: (N, B, H, d); v: (N, B, H, dv)."""
    n, b, h, d = q.shape
    out = torch.zeros(n, b, h, v.shape[-1], dtype=q.dtype)
    attn = torch.zeros(b, h, n, n, dtype=q.dtype)
    wiring, entropy = 0.0, 0.0
    for bi in range(b):
        for hi in range(h):
            for qi in range(n):
                scores = torch.stack([(q[qi, bi, hi] * k[ki, bi, hi]).sum() / math.sqrt(d) for ki in range(n)])
                if bias is not None:
                    scores = scores + bias[qi]
                e = torch.exp(scores - scores.max())
                a = e / e.sum()
                attn[bi, hi, qi] = a
                out[qi, bi, hi] = sum(a[ki] * v[ki, bi, hi] for ki in range(n))
                wiring = wiring + (w[qi] * a).sum()
                entropy = entropy - (a * torch.log(a)).sum()
    count = b * h * n
    return out, attn, wiring / count, entropy / count


@pytest.mark.parametrize("heads,use_bias", [(1, True), (2, True), (3, False)])
def test_dense_attention_equals_loop_reference(heads, use_bias):
    n, b, d, dv = 5, 2, 4, 3
    g = torch.Generator().manual_seed(heads)
    q = torch.randn(n, b, heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, b, heads, d, generator=g, dtype=torch.float64)
    v = torch.randn(n, b, heads, dv, generator=g, dtype=torch.float64)
    bias = torch.randn(n, n, generator=g, dtype=torch.float64) * 2 if use_bias else None
    w = torch.rand(n, n, generator=g, dtype=torch.float64)
    out, stats = dense_attention(q, k, v, bias, w, record_attn=True)
    ref_out, ref_attn, ref_wiring, ref_entropy = _reference_attention(q, k, v, bias, w)
    assert out.shape == (n, b, heads, dv)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(stats.attn, ref_attn)
    torch.testing.assert_close(stats.wiring, ref_wiring)
    torch.testing.assert_close(stats.entropy, ref_entropy)
    assert not stats.entropy.requires_grad


def test_dense_attention_einsum_reference_and_gradients():
    n, b, h, d, dv = 6, 3, 2, 5, 4
    dt = torch.float64
    q = torch.randn(n, b, h, d, dtype=dt, requires_grad=True)
    k = torch.randn(n, b, h, d, dtype=dt, requires_grad=True)
    v = torch.randn(n, b, h, dv, dtype=dt, requires_grad=True)
    bias = torch.randn(n, n, dtype=dt, requires_grad=True)
    w = torch.rand(n, n, dtype=dt)
    out, stats = dense_attention(q, k, v, bias, w)
    assert stats.attn is None  # not recorded by default
    loss = (out * torch.linspace(-1, 1, dv, dtype=dt)).sum() + 3 * stats.wiring
    grads = torch.autograd.grad(loss, (q, k, v, bias))

    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(d) + bias
    a = scores.softmax(-1)
    ref = torch.einsum("bhqk,kbhe->qbhe", a, v)
    ref_wiring = (a * w).sum(-1).mean()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(stats.wiring, ref_wiring)
    ref_loss = (ref * torch.linspace(-1, 1, dv, dtype=dt)).sum() + 3 * ref_wiring
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, bias))
    for g1, g2 in zip(grads, ref_grads):
        torch.testing.assert_close(g1, g2)
    assert grads[3].abs().sum() > 0  # the bias is learned


def test_dense_attention_edge_mask_restricts_keys():
    n, b, h, d = 4, 1, 1, 2
    q, k, v = torch.randn(n, b, h, d), torch.randn(n, b, h, d), torch.randn(n, b, h, 3)
    mask = torch.eye(n, dtype=torch.bool)  # each column reads only itself
    out, stats = dense_attention(q, k, v, None, torch.ones(n, n), edge_mask=mask, record_attn=True)
    torch.testing.assert_close(out, v)
    torch.testing.assert_close(stats.attn[0, 0], torch.eye(n))
    assert stats.entropy.item() == pytest.approx(0.0, abs=1e-6)


def test_local_bias_init_formula():
    d = torch.tensor([0.0, 1.0, 2.0, 4.0, 10.0])
    expected = torch.tensor([0.0, -1 / 8, -0.5, -2.0, -8.0])  # sigma 2: -d^2/8, floor -8
    torch.testing.assert_close(local_bias_init(d), expected)
    torch.testing.assert_close(local_bias_init(d, sigma=1.0, min_value=-3.0), torch.tensor([0.0, -0.5, -2.0, -3.0, -3.0]))


# ------------------------------------------------------------------ ColumnAttention
@pytest.mark.parametrize("untied", [True, False])
@pytest.mark.parametrize("value_proj", [True, False])
def test_column_attention_equals_reference(untied, value_proj, randomize):
    n, b, c, heads, dqk = 4, 2, 6, 2, 3
    mod = randomize(ColumnAttention(n, c, heads, dqk, value_proj, untied, edge_shape=(n, n))).double()
    x = torch.randn(n, b, c, dtype=torch.float64)
    w = torch.rand(n, n, dtype=torch.float64)
    out, stats, qk = mod(x, w, record_attn=True, record_qk=True)

    def lin(layer, inp):
        if untied:
            return torch.einsum("nbi,nio->nbo", inp, layer.weight) + layer.bias[:, None]
        return inp @ layer.weight.T + layer.bias

    q = lin(mod.q, x).view(n, b, heads, dqk)
    k = lin(mod.k, x).view(n, b, heads, dqk)
    v = (lin(mod.v, x) if value_proj else x).view(n, b, heads, c // heads)
    ref, ref_attn, ref_wiring, _ = _reference_attention(q, k, v, mod.bias, w)
    ref = ref.reshape(n, b, c)
    if value_proj:
        ref = lin(mod.proj, ref)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(stats.attn, ref_attn)
    torch.testing.assert_close(stats.wiring, ref_wiring)
    assert qk[0].shape == (b, heads, n, dqk) and qk[1].shape == (b, heads, n, dqk)
    torch.testing.assert_close(qk[0], q.permute(1, 2, 0, 3))
    assert (mod.v is None) == (not value_proj) and (mod.proj is None) == (not value_proj)


def test_column_attention_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="divisible by heads=4"):
        ColumnAttention(4, 6, heads=4)
