"""Named model presets: the table.

Each preset is a plain dict of :class:`~columnformer.config.ModelConfig` fields; configs may
start from one (``preset: digits``) and override any key (``config.build_config``), and
``factory.build_model`` builds one by name. ``columnformer presets`` lists them with their
parameter counts, which are part of the contract (tests/test_presets.py). Plain data: this
module imports nothing of the library but its error type.
"""

from __future__ import annotations

import copy

from .errors import ConfigError

_TINY_128 = dict(image_size=(128, 128), in_chans=3, patch=16, num_classes=100)
_PREDECESSOR_HEAD = dict(pool="avg", head_norm="tokens")
_UNTIED_COLUMNS = dict(
    heads=1, qk_dim=64, value_proj=False, mlp_ratio=1 / 6, attn_bias="local", bias_sigma=2.0, bias_min=-8.0,
    untied_attn=True, untied_mlp=True, untied_norm=True, pos_embed=True,
)
_TIED_VIT = dict(
    heads=6, qk_dim=64, value_proj=True, mlp_ratio=4.0, attn_bias="none", pos_embed=True,
    untied_attn=False, untied_mlp=False, untied_norm=False, recurrent=False,
)

PRESETS: dict[str, dict] = {
    # The embedded default: a small recurrent columnformer reading 8x8 digits through 2x2 patches
    # (a 4x4 input layer), three stacked 4x4 layers, unrolled 4 steps; output read from the top layer.
    "digits": dict(
        image_size=(8, 8), in_chans=1, patch=2, num_classes=10, pool="avg",
        geometry=dict(kind="stacked", layers=[(4, 4), (4, 4), (4, 4)], spacing=1.0),
        sheet=dict(
            width=64, steps=4, recurrent=True, heads=1, qk_dim=16, value_proj=False, mlp_ratio=1.0,
            attn_bias="local", bias_sigma=2.0, untied_attn=True, untied_mlp=True, untied_norm=True,
            pos_embed=True, time_embed=True,
        ),
    ),
    # Tied baseline of similar size: a standard ViT (4 blocks) on the same 4x4 patch grid.
    "digits-vit": dict(
        image_size=(8, 8), in_chans=1, patch=2, num_classes=10, pool="avg",
        input_area="all", output_area="all",
        geometry=dict(kind="grid", shape=(4, 4)),
        sheet=dict(_TIED_VIT, width=96, steps=5, heads=4, qk_dim=24, mlp_ratio=4.0),
    ),
    # Predecessor-equivalent tiny presets at 128 px / patch 16 / width 384 / 100 classes: the same function
    # as clane9/columnformers' vision_{transformer,columnformer_ff,columnformer_r}_tiny_patch16_128 (its
    # geometry, `multilayer`, and its head order, LayerNorm on every output column before pooling);
    # tests/test_predecessor.py checks outputs against its own code. `columnformer import-predecessor`
    # loads its checkpoints into them.
    # Tied ViT: 6 heads, value/projection (with biases), MLP ratio 4, average pooling (11.01M).
    "vit-tiny": dict(
        _TINY_128, **_PREDECESSOR_HEAD, input_area="all", output_area="all",
        geometry=dict(kind="multilayer", layers=[(8, 8)], spacing=2.0),
        sheet=dict(_TIED_VIT, width=384, steps=6),
    ),
    # Untied feed-forward columnformer: 6 distinct 8x8 sheets (38.94M).
    "columnformer-ff-tiny": dict(
        _TINY_128, **_PREDECESSOR_HEAD, input_area="all", output_area="all",
        geometry=dict(kind="multilayer", layers=[(8, 8)], spacing=2.0),
        sheet=dict(_UNTIED_COLUMNS, width=384, steps=6, recurrent=False),
    ),
    # Untied recurrent columnformer on 6 stacked 8x8 layers (384 columns), no attention residual (39.19M).
    "columnformer-rec-tiny": dict(
        _TINY_128, **_PREDECESSOR_HEAD, input_area="bottom", output_area="top",
        geometry=dict(kind="multilayer", layers=[(8, 8)] * 6, spacing=2.0),
        sheet=dict(_UNTIED_COLUMNS, width=384, steps=6, recurrent=True, attn_residual=False),
    ),
    # The predecessor's mixture-of-experts models at 128 px (same function given the same weights; checked against
    # fixtures of its own code). Tied recurrent transformer on 6 stacked 8x8 layers whose MLP weights are a static
    # mixture of 24 experts per column, learned per-edge bias (zero init): vision_tut_tiny_patch16_128 (8.33M).
    "tut-tiny": dict(
        _TINY_128, **_PREDECESSOR_HEAD, input_area="bottom", output_area="top",
        geometry=dict(kind="multilayer", layers=[(8, 8)] * 6, spacing=2.0),
        sheet=dict(
            _TIED_VIT, width=384, steps=6, recurrent=True, mlp_ratio=1.0, attn_bias="zero", bias_sigma=2.0,
            mixture="static", experts=24, mixture_parts=["mlp"],
        ),
    ),
    # MLP-Mixer-like: 6 feed-forward blocks on one 8x8 layer, static linear token mixing (linmixing: per-edge plus
    # per-head weights, no softmax, no value projection) and MLPs of 1, 1, 2, 2, 4, 4 experts with the hidden size
    # divided by E (mlp_conserve): vision_moemixer_tiny_patch16_128 (7.63M). Its mixing weights start at zero here
    # (the predecessor draws them from a normal of std 0.02).
    "moemixer-tiny": dict(
        _TINY_128, **_PREDECESSOR_HEAD, input_area="all", output_area="all",
        geometry=dict(kind="multilayer", layers=[(8, 8)], spacing=2.0),
        sheet=dict(
            _TIED_VIT, width=384, steps=6, recurrent=False, value_proj=False, mlp_ratio=4.0, attn_mode="linmixing",
            attn_head_bias=True, attn_bias="zero", mixture="static", experts=[1, 1, 2, 2, 4, 4],
            mixture_parts=["mlp"], mixture_conserve=True,
        ),
    ),
    # The `wide` sheet at 4x the columns: one 128x128 grid (16,384 columns) with the same retinotopic input
    # (overlapping 3x3-pixel receptive fields, stride 1: each of the 6x6 patches covers a ~21x21 block of the
    # sheet), read out everywhere; 16 nearest + 4 long-range edges per column (p ~ exp(-d/16), K = 20), width 16,
    # q/k 8, 4 recurrent steps; sparse attention as `wide`. (Until 2026-12-03 this preset was a 4x4 input layer
    # under a 128x128 sheet, 16,400 columns, width 32, K = 64: its 16 input columns had to reach 16,384 columns
    # through 4 steps of local attention, and it learned nothing in an hour on a 2-core CPU.)
    "scale": dict(
        image_size=(8, 8), in_chans=1, patch=3, stride=1, num_classes=10, pool="avg",
        input_area="retinotopic", output_area="all",
        geometry=dict(kind="grid", shape=(128, 128)),
        connectivity=dict(kind="local_long_range", k=16, k_long=4, long_range_scale=16.0, seed=0),
        sheet=dict(
            width=16, steps=4, recurrent=True, heads=1, qk_dim=8, value_proj=False, mlp_ratio=1.0,
            attn_bias="local", bias_sigma=2.0, untied_attn=True, untied_mlp=True, untied_norm=True,
            pos_embed=True, time_embed=True,
        ),
    ),
    # A wide sheet that trains on a laptop CPU: one 64x64 grid of 4,096 columns with a retinotopic input
    # (overlapping 3x3-pixel receptive fields, stride 1: the 6x6 patches of the 8x8 digit, each covering a ~11x11
    # patch of the sheet; every column receives the embedded patch its position maps to) and read out everywhere
    # (the head averages all columns). Each column reads its 16 nearest columns plus 4 long-range ones drawn
    # from p ~ exp(-d/16) (K = 20); narrow columns (width 16, q/k 8). Sparse attention runs on the fused C++
    # kernel on CPU (sparse_kernel auto picks it; the block-sparse kernel where it cannot be built; its results in
    # RESULTS.md were measured on the block kernel, before the fused one existed).
    "wide": dict(
        image_size=(8, 8), in_chans=1, patch=3, stride=1, num_classes=10, pool="avg",
        input_area="retinotopic", output_area="all",
        geometry=dict(kind="grid", shape=(64, 64)),
        connectivity=dict(kind="local_long_range", k=16, k_long=4, long_range_scale=16.0, seed=0),
        sheet=dict(
            width=16, steps=4, recurrent=True, heads=1, qk_dim=8, value_proj=False, mlp_ratio=1.0,
            attn_bias="local", bias_sigma=2.0, untied_attn=True, untied_mlp=True, untied_norm=True,
            pos_embed=True, time_embed=True,
        ),
    ),
    # A V1-like sheet for natural images (`data.name=photos`, `task=mim`; configs/v1.yaml): one 32x32 grid of 1,024
    # columns under 32x32-pixel grey patches cut into 4x4-pixel patches (an 8x8 patch grid, retinotopic: every
    # column reads the 4x4-pixel patch above it, 16 columns per patch); each column reads its 16 nearest columns
    # (block-sparse kernel); narrow columns (width 32, q/k 8), unrolled 3 steps; read out everywhere.
    "v1": dict(
        image_size=(32, 32), in_chans=1, patch=4, num_classes=1, pool="avg",
        input_area="retinotopic", output_area="all",
        geometry=dict(kind="grid", shape=(32, 32)),
        connectivity=dict(kind="local", k=16),
        sheet=dict(
            width=32, steps=3, recurrent=True, heads=1, qk_dim=8, value_proj=False, mlp_ratio=1.0,
            attn_bias="local", bias_sigma=2.0, untied_attn=True, untied_mlp=True, untied_norm=True,
            pos_embed=True, time_embed=True,
        ),
    ),
}


def get_preset(name: str) -> dict:
    """The ModelConfig fields of a named preset (a copy)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
