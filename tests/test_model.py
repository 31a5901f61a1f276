"""The sheet (Columnformer): every SheetConfig option, equivalences, wiring cost, Trace, errors."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from columnformer.attention import local_bias_init
from columnformer.connectivity import Connectivity
from columnformer.geometry import from_coords, grid, sphere, stacked
from columnformer.layers import TiedLinear, UntiedLayerNorm, UntiedLinear
from columnformer.factory import build_model
from columnformer.presets import get_preset
from columnformer.sheet import RECORDABLE, Columnformer, SheetConfig

BASE = dict(width=8, steps=2, qk_dim=4)


def _stack():
    return stacked([(2, 2), (2, 3)], spacing=1.0)  # N = 10: bottom layer 4 columns, top layer 6


def _tokens(model: Columnformer, b: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(b, len(model.input_idx), model.cfg.width, dtype=dtype)


# ------------------------------------------------------------------ every option: structure, shapes, gradients
OPTIONS = {
    "default": {},
    "tied_attn": dict(untied_attn=False),
    "tied_mlp": dict(untied_mlp=False),
    "tied_norm": dict(untied_norm=False),
    "all_tied": dict(untied_attn=False, untied_mlp=False, untied_norm=False),
    "tied_attn_untied_norm": dict(untied_attn=False, untied_mlp=False, untied_norm=True),
    "heads2": dict(heads=2),
    "heads4_value_proj": dict(heads=4, value_proj=True),
    "qk_dim1": dict(qk_dim=1),
    "qk_dim12": dict(qk_dim=12),
    "value_proj": dict(value_proj=True),
    "value_proj_tied": dict(value_proj=True, untied_attn=False),
    "mlp_ratio_quarter": dict(mlp_ratio=0.25),
    "mlp_ratio_tiny": dict(mlp_ratio=1 / 6),
    "mlp_ratio_2.5": dict(mlp_ratio=2.5),
    "bias_local": dict(attn_bias="local", bias_sigma=1.0, bias_min=-3.0),
    "bias_zero": dict(attn_bias="zero"),
    "bias_none": dict(attn_bias="none"),
    "no_pos_embed": dict(pos_embed=False),
    "time_embed": dict(time_embed=True, steps=3),
    "feed_forward": dict(recurrent=False, steps=3),
    "feed_forward_tied": dict(recurrent=False, steps=3, untied_attn=False, untied_mlp=False, untied_norm=False),
    "no_attn_residual": dict(attn_residual=False),
    "inject_every": dict(inject="every", steps=3),
    "wiring_p2": dict(wiring_p=2.0),
    "steps1": dict(steps=1),
}
AREAS = {
    "stacked_default": (_stack, "bottom", "top"),
    "all_all": (_stack, "all", "all"),
    "indices": (_stack, [0, 3, 7], [9, 1]),
    "grid_default": (lambda: grid(2, 3), "bottom", "top"),
    "sphere_all": (lambda: sphere(7), "all", "all"),
}


def _check_structure(model: Columnformer, cfg: SheetConfig) -> None:
    n, c = model.n, cfg.width
    assert len(model.blocks) == (1 if cfg.recurrent else cfg.steps)
    for block in model.blocks:
        attn_cls = UntiedLinear if cfg.untied_attn else TiedLinear
        mlp_cls = UntiedLinear if cfg.untied_mlp else TiedLinear
        norm_cls = UntiedLayerNorm if cfg.untied_norm else torch.nn.LayerNorm
        assert isinstance(block.attn.q, attn_cls) and isinstance(block.attn.k, attn_cls)
        assert isinstance(block.mlp.fc1, mlp_cls) and isinstance(block.mlp.fc2, mlp_cls)
        assert isinstance(block.norm1, norm_cls) and isinstance(block.norm2, norm_cls)
        assert block.attn.q.out_features == cfg.heads * cfg.qk_dim
        assert block.mlp.fc1.out_features == int(c * cfg.mlp_ratio)
        if cfg.untied_attn:
            assert block.attn.q.weight.shape == (n, c, cfg.heads * cfg.qk_dim)
        if cfg.untied_norm:
            assert block.norm1.weight.shape == (n, c)
        assert (block.attn.v is not None) == cfg.value_proj
        assert (block.attn.proj is not None) == cfg.value_proj
        if cfg.attn_bias == "none":
            assert block.attn.bias is None
        elif cfg.attn_bias == "zero":
            assert block.attn.bias.shape == (n, n) and block.attn.bias.abs().sum() == 0
        else:
            ref = local_bias_init(model.geometry.distances(), cfg.bias_sigma, cfg.bias_min)
            torch.testing.assert_close(block.attn.bias.detach(), ref)
            assert block.attn.bias.min() >= cfg.bias_min
    assert (model.pos_embed is not None) == cfg.pos_embed
    if cfg.pos_embed:
        assert model.pos_embed.shape == (n, c)
    assert (model.time_embed is not None) == cfg.time_embed
    if cfg.time_embed:
        assert model.time_embed.shape == (cfg.steps, c)


_AREA_OPTIONS = ("default", "feed_forward", "all_tied", "inject_every")
OPTION_AREA = [(o, "stacked_default") for o in OPTIONS] + [
    (o, a) for a in AREAS if a != "stacked_default" for o in _AREA_OPTIONS
]


@pytest.mark.parametrize("option,area", OPTION_AREA, ids=[f"{o}-{a}" for o, a in OPTION_AREA])
def test_every_option_shapes_and_finite_gradients(option, area):
    make_geom, inp, out = AREAS[area]
    cfg = SheetConfig(**{**BASE, **OPTIONS[option]})
    geom = make_geom()
    model = Columnformer(cfg, geom, input_area=inp, output_area=out)
    _check_structure(model, cfg)
    n_in = {"bottom": len(geom.layer_indices(0)), "all": geom.n}.get(inp, None) if isinstance(inp, str) else len(inp)
    n_out = {"top": len(geom.layer_indices(-1)), "all": geom.n}.get(out, None) if isinstance(out, str) else len(out)
    assert len(model.input_idx) == n_in and len(model.output_idx) == n_out

    tokens = _tokens(model, b=3)
    y, trace = model(tokens)
    assert y.shape == (3, n_out, cfg.width)
    assert torch.isfinite(y).all()
    assert len(trace.wiring) == len(trace.entropy) == cfg.steps
    loss = (y * torch.randn_like(y)).sum() + trace.wiring_cost
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_stacked_default_areas_are_bottom_and_top_layers():
    model = Columnformer(SheetConfig(**BASE), _stack())
    assert model.input_idx.tolist() == [0, 1, 2, 3]
    assert model.output_idx.tolist() == [4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("inject", ["first", "every"])
def test_explicit_areas_equal_scattered_all_to_all_model(inject, randomize):
    cfg = SheetConfig(**{**BASE, "steps": 3, "inject": inject})
    geom = _stack()
    sub = randomize(Columnformer(cfg, geom, input_area=[0, 3, 7], output_area=[9, 1]))
    full = Columnformer(cfg, geom, input_area="all", output_area="all")
    full.load_state_dict(sub.state_dict())
    tokens = torch.randn(2, 3, cfg.width)
    scattered = torch.zeros(2, geom.n, cfg.width)
    scattered[:, [0, 3, 7]] = tokens
    y_sub, _ = sub(tokens)
    y_full, _ = full(scattered)
    torch.testing.assert_close(y_sub, y_full[:, [9, 1]])


def test_inject_every_differs_from_first_only_after_step_one(randomize):
    geom = _stack()
    outs = {}
    tokens = torch.randn(1, 4, 8)  # not a constant vector: LayerNorm would remove that
    for steps in (1, 3):
        for inject in ("first", "every"):
            m = randomize(Columnformer(SheetConfig(**{**BASE, "steps": steps, "inject": inject}), geom))
            outs[steps, inject] = m(tokens)[0]
    torch.testing.assert_close(outs[1, "first"], outs[1, "every"])
    assert (outs[3, "first"] - outs[3, "every"]).abs().max() > 1e-3


def test_attn_residual_changes_the_output(randomize):
    geom = _stack()
    a = randomize(Columnformer(SheetConfig(**BASE, attn_residual=True), geom))
    b = Columnformer(SheetConfig(**BASE, attn_residual=False), geom)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 8)
    assert (a(x)[0] - b(x)[0]).abs().max() > 1e-3


# ------------------------------------------------------------------ permutation equivariance
EQUIVARIANT = {
    "recurrent": dict(steps=3),
    "recurrent_time_embed": dict(steps=3, time_embed=True),
    "feed_forward_value_proj_heads2": dict(steps=2, recurrent=False, value_proj=True, heads=2),
    "no_residual_inject_every": dict(steps=3, attn_residual=False, inject="every", mlp_ratio=0.5),
}
TIED_PLAIN = dict(untied_attn=False, untied_mlp=False, untied_norm=False, attn_bias="none", pos_embed=False)


def _perm_check(model, n, width):
    tokens = torch.randn(2, n, width, dtype=torch.float64)
    perm = torch.randperm(n)
    y, trace = model(tokens)
    y_perm, trace_perm = model(tokens[:, perm])
    return y, y_perm, perm, trace, trace_perm


@pytest.mark.parametrize("extra", list(EQUIVARIANT.values()), ids=list(EQUIVARIANT))
def test_tied_model_without_geometry_is_permutation_equivariant(extra, randomize):
    cfg = SheetConfig(**{**BASE, **TIED_PLAIN, **extra})
    model = randomize(Columnformer(cfg, grid(3, 3), input_area="all", output_area="all"), std=0.5).double()
    # no shortcut: every parameter is random and non-zero
    for name, p in model.named_parameters():
        assert p.abs().min() > 0 and p.std() > 0.2, name
    y, y_perm, perm, trace, trace_perm = _perm_check(model, 9, cfg.width)
    assert y.abs().max() > 0.1  # a non-trivial output
    torch.testing.assert_close(y_perm, y[:, perm], rtol=1e-9, atol=1e-9)
    # relabelling queries leaves the attention entropy unchanged
    for e, ep in zip(trace.entropy, trace_perm.entropy):
        torch.testing.assert_close(e, ep, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("breaker", [dict(pos_embed=True), dict(attn_bias="zero"), dict(untied_mlp=True)])
def test_geometry_position_or_untying_break_equivariance(breaker, randomize):
    """Negative control: the equivariance test above can fail."""
    cfg = SheetConfig(**{**BASE, **TIED_PLAIN, **breaker})
    model = randomize(Columnformer(cfg, grid(3, 3), input_area="all", output_area="all")).double()
    y, y_perm, perm, _, _ = _perm_check(model, 9, cfg.width)
    assert (y_perm - y[:, perm]).abs().max() > 1e-3


# ------------------------------------------------------------------ untied with equal columns == tied
def _copy_tied_into_untied(tied: Columnformer, untied: Columnformer) -> None:
    tied_mods = dict(tied.named_modules())
    with torch.no_grad():
        for name, mod in untied.named_modules():
            src = tied_mods[name]
            if isinstance(mod, UntiedLinear):
                mod.weight.copy_(src.weight.T.unsqueeze(0).expand_as(mod.weight))  # (out,in) -> (N,in,out)
                mod.bias.copy_(src.bias.unsqueeze(0).expand_as(mod.bias))
            elif isinstance(mod, UntiedLayerNorm):
                mod.weight.copy_(src.weight.expand_as(mod.weight))
                mod.bias.copy_(src.bias.expand_as(mod.bias))
        tied_params = dict(tied.named_parameters())
        for name in ("pos_embed", "time_embed"):
            if getattr(untied, name) is not None:
                getattr(untied, name).copy_(tied_params[name])
        for bt, bu in zip(tied.blocks, untied.blocks):
            if bu.attn.bias is not None:
                bu.attn.bias.copy_(bt.attn.bias)


@pytest.mark.parametrize(
    "extra",
    [
        dict(steps=3, time_embed=True, heads=2, value_proj=True),
        dict(steps=2, recurrent=False, attn_bias="local", mlp_ratio=0.5),
        dict(steps=2, attn_residual=False, inject="every", attn_bias="zero"),
    ],
    ids=["recurrent", "feed_forward", "no_residual"],
)
def test_untied_with_identical_columns_equals_tied(extra, randomize):
    geom = _stack()
    tied_cfg = SheetConfig(**{**BASE, **extra, "untied_attn": False, "untied_mlp": False, "untied_norm": False})
    untied_cfg = SheetConfig(**{**BASE, **extra, "untied_attn": True, "untied_mlp": True, "untied_norm": True})
    tied = randomize(Columnformer(tied_cfg, geom)).double()
    untied = Columnformer(untied_cfg, geom).double()
    _copy_tied_into_untied(tied, untied)
    tokens = torch.randn(2, 4, BASE["width"], dtype=torch.float64)
    y_t, tr_t = tied(tokens)
    y_u, tr_u = untied(tokens)
    assert y_t.abs().max() > 0.1
    torch.testing.assert_close(y_u, y_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.stack(tr_u.wiring), torch.stack(tr_t.wiring), rtol=1e-10, atol=1e-10)
    # and perturbing one column's weights breaks the equality (the test can fail)
    with torch.no_grad():
        untied.blocks[0].mlp.fc1.weight[5] += 0.3
    assert (untied(tokens)[0] - y_t).abs().max() > 1e-4


# ------------------------------------------------------------------ recurrent vs feed-forward
def test_recurrent_one_step_equals_feed_forward_one_block(randomize):
    geom = _stack()
    rec = randomize(Columnformer(SheetConfig(**{**BASE, "steps": 1, "recurrent": True}), geom))
    ff = Columnformer(SheetConfig(**{**BASE, "steps": 1, "recurrent": False}), geom)
    ff.load_state_dict(rec.state_dict())
    tokens = torch.randn(3, 4, 8)
    y_r, tr_r = rec(tokens)
    y_f, tr_f = ff(tokens)
    torch.testing.assert_close(y_r, y_f, rtol=0, atol=0)
    torch.testing.assert_close(tr_r.wiring[0], tr_f.wiring[0])


def test_recurrent_equals_feed_forward_with_repeated_block(randomize):
    geom = _stack()
    rec = randomize(Columnformer(SheetConfig(**{**BASE, "steps": 3}), geom))
    ff = Columnformer(SheetConfig(**{**BASE, "steps": 3, "recurrent": False}), geom)
    state = {k: v for k, v in rec.state_dict().items() if not k.startswith("blocks.")}
    for t in range(3):
        state.update({k.replace("blocks.0.", f"blocks.{t}."): v for k, v in rec.state_dict().items() if k.startswith("blocks.0.")})
    ff.load_state_dict(state)
    tokens = torch.randn(2, 4, 8)
    torch.testing.assert_close(rec(tokens)[0], ff(tokens)[0])
    with torch.no_grad():
        ff.blocks[2].mlp.fc2.bias.add_(0.5)
    assert (rec(tokens)[0] - ff(tokens)[0]).abs().max() > 1e-3


# ------------------------------------------------------------------ wiring cost by hand
A_KNOWN = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)


def _known_attention_model(p: float, untied: bool) -> Columnformer:
    cfg = SheetConfig(width=4, steps=2, qk_dim=2, attn_bias="zero", wiring_p=p, untied_attn=untied)
    model = Columnformer(cfg, from_coords([[0.0], [1.0], [3.0]]), input_area="all", output_area="all").double()
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.q, block.attn.k):  # scores = bias only
                lin.weight.zero_()
                lin.bias.zero_()
            block.attn.bias.copy_(A_KNOWN.log())
    return model


@pytest.mark.parametrize("untied", [True, False])
@pytest.mark.parametrize(
    "p,expected_w,expected_cost",
    [
        # D = [[0,1,3],[1,0,2],[3,2,0]], mean D over 9 ordered pairs = 12/9 -> W = 0.75 D
        # sum_k W A per row: 0.75*(0.25+0.75), 0.75*(0.1+0.2), 0.75*(0.6+0.4) -> mean 0.575
        (1.0, 0.75 * torch.tensor([[0, 1, 3], [1, 0, 2], [3, 2, 0]]), 0.575),
        # D^2 mean = 28/9; rows 2.5, 0.5, 2.6 -> 5.6/3 * 9/28 = 0.6
        (2.0, 9 / 28 * torch.tensor([[0, 1, 9], [1, 0, 4], [9, 4, 0]]), 0.6),
    ],
)
def test_wiring_cost_equals_hand_computation(p, expected_w, expected_cost, untied):
    model = _known_attention_model(p, untied)
    torch.testing.assert_close(model.wiring_weight, expected_w.to(model.wiring_weight.dtype))
    _, trace = model(torch.randn(5, 3, 4, dtype=torch.float64), record=("attn",))
    for t in range(2):
        torch.testing.assert_close(trace.attn[t], A_KNOWN.expand(5, 1, 3, 3))
        assert trace.wiring[t].item() == pytest.approx(expected_cost, rel=1e-6)
    assert trace.wiring_cost.item() == pytest.approx(expected_cost, rel=1e-6)
    entropy = -(A_KNOWN * A_KNOWN.log()).sum(-1).mean().item()
    assert trace.attn_entropy.item() == pytest.approx(entropy, rel=1e-9)


def test_wiring_cost_is_differentiable_wrt_attention_bias():
    model = _known_attention_model(1.0, True)
    _, trace = model(torch.randn(2, 3, 4, dtype=torch.float64))
    trace.wiring_cost.backward()
    g = model.blocks[0].attn.bias.grad
    # pushing mass toward far columns raises the cost: d cost / d bias[0, 2] > 0 (column 2 is the farthest)
    assert g[0, 2] > 0 and g[0, 0] < 0


# ------------------------------------------------------------------ Trace
def test_trace_scalars_always_and_tensors_only_on_request():
    cfg = SheetConfig(**{**BASE, "steps": 3, "heads": 2})
    model = Columnformer(cfg, _stack())
    tokens = _tokens(model, b=2)
    _, trace = model(tokens)
    assert len(trace.wiring) == len(trace.entropy) == 3
    assert trace.attn is None and trace.features is None and trace.qk is None
    assert all(w.dim() == 0 and w.requires_grad for w in trace.wiring)
    assert all(e.dim() == 0 and not e.requires_grad for e in trace.entropy)
    assert all(0 <= e.item() <= math.log(model.n) + 1e-5 for e in trace.entropy)
    assert trace.wiring_cost.item() == pytest.approx(sum(w.item() for w in trace.wiring) / 3, rel=1e-6)

    _, trace = model(tokens, record=("attn", "features", "qk"))
    n = model.n
    assert len(trace.attn) == len(trace.features) == len(trace.qk) == 3
    for a, f, (q, k) in zip(trace.attn, trace.features, trace.qk):
        assert a.shape == (2, 2, n, n)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, n))
        assert f.shape == (2, n, cfg.width)
        assert q.shape == k.shape == (2, 2, n, cfg.qk_dim)
        assert not (a.requires_grad or f.requires_grad or q.requires_grad)
    # the last features are the output read at the output area
    y, _ = model(tokens)
    torch.testing.assert_close(trace.features[-1][:, model.output_idx], y.detach())

    _, trace = model(tokens, record=["features"])
    assert trace.features is not None and trace.attn is None and trace.qk is None


@pytest.mark.parametrize("record", [("maps",), ("attn", "attention"), ("ATTN",)])
def test_invalid_record_names_raise(record):
    model = Columnformer(SheetConfig(**BASE), _stack())
    with pytest.raises(ValueError, match="allowed entries"):
        model(_tokens(model), record=record)
    assert set(RECORDABLE) == {"attn", "features", "qk", "states"}


# ------------------------------------------------------------------ invalid options
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(width=10, heads=3), "divisible by heads"),
        (dict(time_embed=True, recurrent=False), "time_embed"),
        (dict(width=8, mlp_ratio=0.1), "mlp_ratio"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(foo=1), "foo"),
        (dict(attn_bias="gaussian"), "attn_bias"),
        (dict(inject="sometimes"), "inject"),
        (dict(steps=0), "steps"),
        (dict(bias_min=1.0), "bias_min"),
    ],
)
def test_invalid_sheet_options_raise_validation_error_naming_the_key(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        SheetConfig(**kwargs)


def test_unknown_option_error_says_extra_forbidden():
    with pytest.raises(ValidationError) as info:
        SheetConfig(widht=8)
    err = info.value.errors()[0]
    assert err["type"] == "extra_forbidden" and err["loc"] == ("widht",)


@pytest.mark.parametrize(
    "shape",
    [(2, 5, 8), (2, 4, 7), (2, 10, 8), (2, 3, 8)],
)
def test_tokens_of_wrong_shape_raise(shape):
    model = Columnformer(SheetConfig(**BASE), _stack())  # expects (B, 4, 8)
    with pytest.raises(ValueError, match=r"\(B, 4, 8\)"):
        model(torch.randn(*shape))


@pytest.mark.parametrize("shape", [(4, 8), (1, 2, 4, 8)])
def test_tokens_of_wrong_rank_raise_clear_error(shape):
    model = Columnformer(SheetConfig(**BASE), _stack())
    with pytest.raises(ValueError, match=r"\(B, 4, 8\)"):
        model(torch.randn(*shape))


@pytest.mark.parametrize(
    "area,match",
    [("middle", "input_area must be"), ([], "distinct column indices"), ([0, 0], "distinct"), ([10], r"\[0, 10\)"), ([-1], "distinct")],
)
def test_bad_areas_raise(area, match):
    with pytest.raises(ValueError, match=match):
        Columnformer(SheetConfig(**BASE), _stack(), input_area=area)


def test_connectivity_of_another_geometry_raises():
    with pytest.raises(ValueError, match="connectivity has 4 columns"):
        Columnformer(SheetConfig(**BASE), _stack(), connectivity=Connectivity.dense(grid(2, 2)))


def test_patch_grid_not_matching_input_area_names_the_fix():
    cfg = get_preset("digits")
    cfg["patch"] = 4  # 2x2 patches, but the bottom layer has 16 columns
    with pytest.raises(ValueError, match="change patch/stride or the geometry") as info:
        build_model(cfg)
    assert "4 patches" in str(info.value) and "16 columns" in str(info.value)


@pytest.mark.parametrize("inject", ["first", "every"])
def test_whole_sheet_areas_skip_the_scatter_and_gather_with_the_same_result(inject):
    """input_area = output_area = all in column order takes the shortcut (no index_add / index_select); the
    general path gives the same outputs and gradients."""
    cfg = SheetConfig(**{**BASE, "inject": inject})
    torch.manual_seed(0)
    fast = Columnformer(cfg, grid(3, 4), input_area="all", output_area="all").double()
    assert fast._input_is_sheet and fast._output_is_sheet
    slow = Columnformer(cfg, grid(3, 4), input_area="all", output_area="all").double()
    slow.load_state_dict(fast.state_dict())
    slow._input_is_sheet = slow._output_is_sheet = False
    tokens = torch.randn(2, 12, cfg.width, dtype=torch.float64, requires_grad=True)
    results = []
    for m in (fast, slow):
        out, _ = m(tokens)
        results.append((out, *torch.autograd.grad(out.square().sum(), [tokens, *m.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    part = Columnformer(cfg, grid(3, 4), input_area=[0, 2, 5], output_area=[11, 3])
    assert not part._input_is_sheet and not part._output_is_sheet
    assert part(torch.randn(2, 3, cfg.width))[0].shape == (2, 2, cfg.width)
