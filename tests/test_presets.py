"""Preset parameter counts are part of the contract: totals and the per-component breakdown."""

from __future__ import annotations

import functools

import pytest
import torch

from columnformer.config import ConfigError
from columnformer.factory import build_model, count_parameters
from columnformer.presets import PRESETS, get_preset

C = 384  # width of the tiny presets


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return build_model(name)


def _component(name: str) -> str:
    if name.startswith("embed."):
        return "patch_embed"
    if name == "sheet.pos_embed":
        return "pos_embed"
    if name == "sheet.time_embed":
        return "time_embed"
    if name.startswith("sheet.blocks."):
        rest = name.split(".", 3)[3]
        for prefix, comp in [
            ("attn.q.", "qk"), ("attn.k.", "qk"), ("attn.v.", "v_proj"), ("attn.proj.", "v_proj"),
            ("attn.bias", "attn_bias"), ("mlp.", "mlp"), ("norm1.", "norms"), ("norm2.", "norms"),
        ]:
            if rest.startswith(prefix):
                return comp
    if name.startswith("head.norm."):
        return "final_norm"
    if name.startswith("head.fc."):
        return "head"
    raise AssertionError(f"parameter {name} belongs to no known component")


def _breakdown(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        comp = _component(name)
        out[comp] = out.get(comp, 0) + p.numel()
    return out


def _lin(i: int, o: int) -> int:  # a linear layer with bias
    return i * o + o


# expected breakdowns, written from DESIGN.md's "How those counts arise"
VIT_TINY = dict(
    patch_embed=295_296,
    pos_embed=64 * C,
    qk=6 * 2 * _lin(C, C),  # 6 heads x 64 = 384
    v_proj=6 * 2 * _lin(C, C),
    mlp=6 * (_lin(C, 4 * C) + _lin(4 * C, C)),
    norms=6 * 2 * 2 * C,
    final_norm=768,
    head=38_500,
)


def _untied(n: int, blocks: int) -> dict[str, int]:
    hidden = int(C / 6)
    assert hidden == 64
    return dict(
        patch_embed=295_296,
        pos_embed=n * C,
        qk=blocks * 2 * n * _lin(C, 64),  # 1 head, q/k dim 64, per column
        mlp=blocks * n * (_lin(C, hidden) + _lin(hidden, C)),
        norms=blocks * 2 * n * 768,  # two untied LayerNorms per block, N x 768 each
        attn_bias=blocks * n * n,  # learned N x N bias
        final_norm=768,
        head=38_500,
    )


EXPECTED = {
    "vit-tiny": (11_005_924, VIT_TINY),
    "columnformer-ff-tiny": (38_943_460, _untied(64, 6)),
    "columnformer-rec-tiny": (39_189_220, _untied(384, 1)),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tiny_preset_totals_and_breakdown(name):
    total, parts = EXPECTED[name]
    assert sum(parts.values()) == total  # the hand breakdown adds up to the contract number
    model = _model(name)
    assert count_parameters(model) == total
    assert _breakdown(model) == parts


def test_reported_millions():
    assert f"{count_parameters(_model('vit-tiny')) / 1e6:.2f}M" == "11.01M"
    assert f"{count_parameters(_model('columnformer-ff-tiny')) / 1e6:.2f}M" == "38.94M"
    assert f"{count_parameters(_model('columnformer-rec-tiny')) / 1e6:.2f}M" == "39.19M"


def test_patch_embedding_is_16px_stride_16_conv_with_bias():
    conv = _model("vit-tiny").embed.proj
    assert conv.kernel_size == (16, 16) and conv.stride == (16, 16)
    assert conv.weight.shape == (C, 3, 16, 16) and conv.bias.shape == (C,)


def test_rec_tiny_areas_are_bottom_and_top_layers():
    sheet = _model("columnformer-rec-tiny").sheet
    assert sheet.n == 384
    assert sheet.input_idx.tolist() == list(range(64))
    assert sheet.output_idx.tolist() == list(range(320, 384))
    assert not sheet.cfg.attn_residual and sheet.cfg.recurrent
    assert len(sheet.blocks) == 1


def test_digits_count_matches_hand_formula():
    # stacked 3 x (4x4) = 48 columns, width 64, q/k 16, MLP hidden 64, 4 steps with time embedding
    n, c, dqk, hid, steps = 48, 64, 16, 64, 4
    expected = (
        _lin(1 * 2 * 2, c)  # 2x2 patch conv from 1 channel
        + n * c  # position embedding
        + steps * c  # time embedding
        + 2 * n * 2 * c  # two untied LayerNorms
        + 2 * n * _lin(c, dqk)  # untied q, k
        + n * n  # attention bias
        + n * (_lin(c, hid) + _lin(hid, c))  # untied MLP
        + 2 * c  # final LayerNorm
        + _lin(c, 10)  # head
    )
    model = build_model("digits")
    assert count_parameters(model) == expected == 518_218


def test_digits_vit_count_matches_hand_formula():
    # tied ViT: 4x4 grid, width 96, 5 blocks, 4 heads x 24, value/projection, MLP ratio 4
    n, c, blocks = 16, 96, 5
    block = 2 * 2 * c + 2 * _lin(c, 4 * 24) + 2 * _lin(c, c) + _lin(c, 4 * c) + _lin(4 * c, c)
    expected = _lin(1 * 2 * 2, c) + n * c + blocks * block + 2 * c + _lin(c, 10)
    model = build_model("digits-vit")
    assert count_parameters(model) == expected == 562_378


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_run_forward(name):
    cfg = get_preset(name)
    model = _model(name) if name in EXPECTED else build_model(name)
    images = torch.randn(1, cfg["in_chans"], *cfg["image_size"])
    with torch.no_grad():
        logits, trace = model(images)
    assert logits.shape == (1, cfg["num_classes"])
    assert torch.isfinite(logits).all()
    assert len(trace.wiring) == cfg["sheet"]["steps"]


def test_get_preset_returns_a_copy_and_unknown_names_fail():
    p = get_preset("digits")
    p["sheet"]["width"] = 1
    assert PRESETS["digits"]["sheet"]["width"] == 64
    with pytest.raises(ConfigError, match="available presets: digits"):
        get_preset("vit-huge")
