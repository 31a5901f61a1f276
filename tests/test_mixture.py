"""Weight banks (mixture.py): tied and untied as the two ends, dynamic and topographic coefficients."""

import math

import pytest
import torch

from columnformer import geometry as g
from columnformer.connectivity import Connectivity
from columnformer.sheet import Columnformer, SheetConfig

N, C = 12, 16


def _sheet(seed=0, geometry=None, connectivity=None, **kw):
    torch.manual_seed(seed)
    base = dict(width=C, steps=2, qk_dim=8, value_proj=True, heads=2)
    geometry = geometry or g.grid(3, 4)
    return Columnformer(SheetConfig(**{**base, **kw}), geometry, connectivity, input_area="all", output_area="all")


def _copy_into_mixture(mix, untied):
    """Load ``untied``'s per-column weights into ``mix``'s N experts (expert e = column e) with one-hot coefficients."""
    out = {k: untied.state_dict()[k] for k in mix.state_dict() if ".coef." not in k}
    missing, _ = mix.load_state_dict(out, strict=False)
    assert all(".coef." in k for k in missing)
    with torch.no_grad():  # column n uses expert n only: softmax(100 * e_n) = e_n in float32
        for block in mix.blocks:
            block.coef.logits.copy_(torch.eye(N))
            block.coef.scale.fill_(math.log(100.0))


@pytest.mark.parametrize("mode", ["static", "topo", "dynamic"])
def test_one_expert_is_the_tied_sheet(mode):
    """E = 1 builds the tied layers themselves (same parameters, no coefficients), so it computes the tied sheet."""
    tied = _sheet(untied_attn=False, untied_mlp=False, untied_norm=False)
    mix = _sheet(mixture=mode, experts=1)
    assert {k: v.shape for k, v in mix.state_dict().items()} == {k: v.shape for k, v in tied.state_dict().items()}
    x = torch.randn(3, N, C)
    torch.testing.assert_close(mix(x)[0], tied(x)[0], rtol=1e-5, atol=1e-6)


def test_per_block_experts_and_conserve():
    """A list gives every feed-forward block its own E; E = 1 blocks are tied and keep the full MLP."""
    sheet = _sheet(recurrent=False, steps=3, mixture="static", experts=[1, 2, 4], mixture_parts=["mlp"],
                   mixture_conserve=True, mlp_ratio=4.0, untied_attn=False, untied_norm=False)
    assert sheet.blocks[0].coef is None and sheet.blocks[1].coef.experts == 2 and sheet.blocks[2].coef.experts == 4
    assert [b.mlp.fc1.weight.shape for b in sheet.blocks] == [(4 * C, C), (2, C, 2 * C), (4, C, C)]
    with pytest.raises(ValueError, match="experts lists one E per block: 2 given, the sheet has 3"):
        SheetConfig(recurrent=False, steps=3, mixture="static", experts=[1, 2])


def test_n_experts_with_one_hot_coefficients_equal_the_untied_sheet():
    untied = _sheet()
    mix = _sheet(seed=1, mixture="static", experts=N)
    _copy_into_mixture(mix, untied)
    x = torch.randn(3, N, C)
    out, trace = mix(x)
    torch.testing.assert_close(out, untied(x)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trace.expert_load[0], torch.full((N,), 1 / N))  # every expert used by one column
    assert trace.mix_entropy[0] < 1e-6


def test_dynamic_coefficients_depend_on_the_input_and_respect_top_k():
    sheet = _sheet(mixture="dynamic", experts=6, mixture_top_k=2)
    coef = sheet.blocks[0].coef
    x1, x2 = torch.randn(4, N, C), torch.randn(4, N, C)
    sheet(x1)
    c1 = coef.last.clone()
    sheet(x2)
    c2 = coef.last
    assert c1.shape == (N, 4, 6) and not torch.allclose(c1, c2, atol=1e-4)
    assert ((c1 > 0).sum(-1) == 2).all()  # top-2 of 6 experts, renormalised
    torch.testing.assert_close(c1.sum(-1), torch.ones(N, 4))
    out, trace = sheet(x1)
    out.square().mean().backward()
    assert coef.query.weight.grad.abs().sum() > 0 and coef.keys.grad.abs().sum() > 0
    assert 0 <= trace.mix_entropy[0] <= math.log(2) + 1e-6


def test_topographic_coefficients_are_smooth_on_the_sheet():
    geom = g.grid(10, 10)
    sheet = _sheet(geometry=geom, mixture="topo", experts=8)
    c = sheet.blocks[0].coef.static_coefficients().detach()  # (100, 8)
    d = torch.as_tensor(geom.distances())
    diff = torch.cdist(c, c, p=1)
    near, far = diff[(d > 0) & (d <= 1.01)].mean(), diff[d >= 5].mean()
    assert near < 0.5 * far
    static = _sheet(geometry=geom, mixture="static", experts=8).blocks[0].coef.static_coefficients().detach()
    sdiff = torch.cdist(static, static, p=1)
    assert sdiff[(d > 0) & (d <= 1.01)].mean() > 0.8 * sdiff[d >= 5].mean()  # static maps are not smooth by design


@pytest.mark.parametrize("kernel", ["gather", "block", "fused"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_mixture_runs_on_the_sparse_kernels_like_dense_reference(kernel, mode):
    geom = g.grid(6, 6)
    conn = Connectivity.local(geom, 9)
    sparse = _sheet(geometry=geom, connectivity=conn, mixture=mode, experts=3, sparse_kernel=kernel)
    other = _sheet(geometry=geom, connectivity=conn, mixture=mode, experts=3, sparse_kernel="gather" if kernel == "block" else "block")
    other.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 36, C, requires_grad=True)
    a, b = sparse(x)[0], other(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(other(x)[0].sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_conserve_divides_the_mlp_and_options_are_checked():
    assert SheetConfig(width=64, mlp_ratio=4, mixture="static", experts=4, mixture_conserve=True).mlp_hidden() == 64
    assert SheetConfig(width=64, mlp_ratio=4, mixture="static", experts=4).mlp_hidden() == 256
    with pytest.raises(ValueError, match="mixture_top_k=2 needs mixture=dynamic"):
        SheetConfig(mixture="static", mixture_top_k=2)
    with pytest.raises(ValueError, match="apply to a mixture"):
        SheetConfig(mixture_conserve=True)
    with pytest.raises(ValueError, match="at least one entry"):
        SheetConfig(mixture="static", mixture_parts=[])
    with pytest.raises(ValueError, match="experts, mixture_parts apply only when mixture is on"):
        SheetConfig(experts=8, mixture_parts=["mlp"])  # would be silently ignored


@pytest.mark.parametrize("mode,batch", [("static", 7), ("static", 1), ("dynamic", 7)])
def test_mixture_linear_and_norm_match_a_per_column_per_sample_reference(mode, batch):
    torch.manual_seed(0)
    from columnformer.mixture import MixtureCoefficients

    coef = MixtureCoefficients(5, 6, experts=3, mode=mode)
    lin, norm = coef.linear(6, 4), coef.layer_norm(6)
    with torch.no_grad():
        lin.bias.normal_()
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(5, batch, 6)  # (N, B, C); a static bank mixes weights at B = 7, outputs at B = 1
    c = coef.update(x)
    y, z = lin(x), norm(x)
    cc = c if c.ndim == 3 else c[:, None, :].expand(5, batch, 3)  # (N, B, E)
    for n in range(5):
        for b in range(batch):
            w = torch.einsum("e,eio->io", cc[n, b], lin.weight)
            torch.testing.assert_close(y[n, b], x[n, b] @ w + cc[n, b] @ lin.bias, rtol=1e-5, atol=1e-6)
            ln = torch.nn.functional.layer_norm(x[n, b], (6,))
            torch.testing.assert_close(z[n, b], ln * (cc[n, b] @ norm.weight) + cc[n, b] @ norm.bias, rtol=1e-5, atol=1e-6)


def test_static_bank_materialises_per_column_matrices_only_for_batches_where_that_is_cheaper():
    """B = 1: the experts' outputs are mixed (no (N, in, out) tensor); B = 32: the weights are mixed (measured
    faster, benchmarks/mixture_strategies.py). Both give the same gradients as each other's math."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from columnformer.mixture import MixtureCoefficients, mix_outputs

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.numels.append(out.numel())
            return out

    n, i, o, e = 40, 12, 10, 4
    coef = MixtureCoefficients(n, i, experts=e, mode="static")
    lin = coef.linear(i, o)
    per_column = n * i * o
    for batch in (1, 32):
        coef.update(None)
        with Sizes() as mode:
            lin(torch.randn(n, batch, i))
        assert (per_column in mode.numels) == (not mix_outputs(batch, e)), batch
    assert mix_outputs(1, 24) and mix_outputs(2, 24) and not mix_outputs(32, 4) and not mix_outputs(64, 16)
