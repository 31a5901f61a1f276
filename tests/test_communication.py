"""Communication modes of the attention (attention.py): static_mix, selection, linmixing on every kernel."""

import pytest
import torch

from columnformer import geometry as g
from columnformer.connectivity import Connectivity
from columnformer.sheet import Columnformer, SheetConfig

C, H = 12, 2


def _reference(attn, x, index, mask, wiring_weight):
    """The mode's math written out per edge: (out (N, B, C), wiring)."""
    N, B, _ = x.shape
    v = attn.v(x) if attn.v is not None else x
    vh = v.view(N, B, H, C // H)
    bias = attn.bias  # (N, K) on the edges `index`
    if attn.mode == "linmixing":
        per_head = bias if attn.head_bias is None else bias + attn.head_bias  # (N, K) or (H, N, K)
        w = per_head.masked_fill(~mask, 0.0).expand(B, H, N, -1)  # (B, H, N, K)
        wiring = (w[0].abs() * wiring_weight).sum(-1).mean()
    else:
        d = attn.qk_dim
        if attn.mode == "static_mix":
            scores = torch.zeros(B, H, N, index.shape[1])
        else:
            k = attn.k(x).view(N, B, H, d)
            q = attn.query.unsqueeze(1).expand(N, B, H, d) if attn.mode == "selection" else attn.q(x).view(N, B, H, d)
            scores = torch.einsum("nbhd,nkbhd->bhnk", q, k[index]) / d**0.5
        scores = (scores + bias).masked_fill(~mask, float("-inf"))
        w = scores.softmax(-1)
        wiring = (w * wiring_weight).sum(-1).mean()
    out = torch.einsum("bhnk,nkbhc->nbhc", w, vh[index]).reshape(N, B, C)
    return (attn.proj(out) if attn.proj is not None else out), wiring


def _sheet(mode, connectivity=None, kernel="auto", geom=None, value_proj=True):
    torch.manual_seed(0)
    geom = geom or g.grid(5, 5)
    head_bias = mode == "linmixing-heads"
    cfg = SheetConfig(width=C, heads=H, qk_dim=4, steps=1, attn_mode=mode.removesuffix("-heads"), value_proj=value_proj,
                      sparse_kernel=kernel, attn_head_bias=head_bias)
    sheet = Columnformer(cfg, geom, connectivity, input_area="all", output_area="all")
    attn = sheet.blocks[0].attn
    with torch.no_grad():  # weights that are not the initial ones, so every edge weight matters
        attn.bias.add_(0.3 * torch.randn_like(attn.bias))
        if attn.head_bias is not None:
            attn.head_bias.normal_(0, 0.3)
    return sheet


@pytest.mark.parametrize("mode", ["attention", "static_mix", "selection", "linmixing", "linmixing-heads"])
@pytest.mark.parametrize("kernel", ["dense", "gather", "block", "flex", "fused"])
@pytest.mark.filterwarnings("ignore:.*without torch.compile")  # flex on CPU: torch's eager reference, on purpose
def test_every_mode_matches_its_math_on_every_kernel(mode, kernel, monkeypatch):
    if kernel == "flex":  # as on CUDA, through torch's eager FlexAttention reference (differentiable once allowed)
        import torch.nn.attention.flex_attention as fa
        import columnformer.flex_sparse as fs

        monkeypatch.setattr("columnformer.sheet.flex_runs_on", lambda device: True)
        monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)
        monkeypatch.setattr(fs, "check_backward_supported", lambda *a: None)
    geom = g.grid(5, 5)
    conn = None if kernel == "dense" else Connectivity.local_plus_long_range(geom, 9, 2, seed=0)
    sheet = _sheet(mode, conn, "auto" if kernel == "dense" else kernel, geom)
    block = sheet.blocks[0]
    if kernel in ("block", "flex", "fused"):
        assert type(sheet.block_plan()).__name__ == {"flex": "FlexPlan", "block": "BlockPlan", "fused": "FusedPlan"}[kernel]
    x = torch.randn(25, 3, C)  # (N, B, C), already the attention's input
    if conn is None:
        index, mask = torch.arange(25).expand(25, 25), torch.ones(25, 25, dtype=torch.bool)
    else:
        index, mask = sheet.edge_index, sheet.edge_mask
    out, stats, _ = block.attn(x, sheet.wiring_weight, sheet.edge_index, sheet.edge_mask, plan=sheet.block_plan())
    ref, wiring = _reference(block.attn, x, index, mask, sheet.wiring_weight)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.wiring, wiring, rtol=1e-4, atol=1e-6)
    g_out = torch.randn_like(out)
    params = [p for p in (block.attn.bias, block.attn.head_bias) if p is not None]
    grads = torch.autograd.grad((out * g_out).sum() + stats.wiring, params)
    grads_ref = torch.autograd.grad((ref * g_out).sum() + wiring, params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_static_modes_do_not_depend_on_the_input():
    for mode, static in [("static_mix", True), ("linmixing", True), ("selection", False), ("attention", False)]:
        sheet = _sheet(mode)
        _, t1 = sheet(torch.randn(2, 25, C), record=("attn",))
        _, t2 = sheet(torch.randn(2, 25, C), record=("attn",))
        same = torch.allclose(t1.attn[0], t2.attn[0])
        assert same == static, mode
    sel = _sheet("selection").blocks[0].attn
    assert sel.q is None and sel.query.shape == (25, H, 4)  # one learned query per column and head
    mix = _sheet("static_mix").blocks[0].attn
    assert mix.q is None and mix.k is None


def test_linmixing_starts_as_a_local_average_and_needs_a_bias():
    torch.manual_seed(0)
    fresh = Columnformer(SheetConfig(width=C, heads=H, steps=1, attn_mode="linmixing"), g.grid(5, 5),
                         input_area="all", output_area="all")
    w = fresh.blocks[0].attn.bias
    torch.testing.assert_close(w.sum(-1), torch.ones(25))
    assert (w >= 0).all() and w[0, 0] > w[0, 24]  # nearer columns weigh more
    for mode in ("static_mix", "linmixing"):
        with pytest.raises(ValueError, match=f"attn_mode={mode} weighs the edges"):
            SheetConfig(attn_mode=mode, attn_bias="none")
    with pytest.raises(ValueError, match="attn_head_bias=true applies to attn_mode=linmixing"):
        SheetConfig(attn_head_bias=True)
