"""The one builder: a model, its backbone or its sheet from a ModelConfig, a preset name or a field dict."""

from __future__ import annotations

from torch import nn

from .model_config import ModelConfig
from .presets import get_preset


def model_config(cfg):
    """A validated ModelConfig from a ModelConfig, a preset name or a dict of fields."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    if isinstance(cfg, dict):
        cfg = ModelConfig.model_validate(cfg)
    return cfg


def build_sheet(cfg):
    """The :class:`Columnformer` sheet of a ModelConfig: geometry, connectivity, input and output areas."""
    from .sheet import Columnformer

    cfg = model_config(cfg)
    geometry = cfg.geometry.build()
    connectivity = cfg.connectivity.build(geometry)
    if cfg.input_area == "retinotopic":  # every input column gets the token of the patch its position maps to
        area = "all" if cfg.geometry.kind == "grid" else "bottom"
        return Columnformer(cfg.sheet, geometry, connectivity, area, cfg.output_area, cfg.retinotopic_tokens())
    return Columnformer(cfg.sheet, geometry, connectivity, cfg.input_area, cfg.output_area)


def build_backbone(cfg):
    """The patch embedding and the sheet of a ModelConfig: ``(PatchEmbed, Columnformer)``."""
    from .vision import PatchEmbed

    cfg = model_config(cfg)
    sheet = build_sheet(cfg)
    embed = PatchEmbed(cfg.image_size, cfg.in_chans, cfg.patch, cfg.stride or cfg.patch, cfg.sheet.width)
    return embed, sheet


def build_model(cfg) -> nn.Module:
    """Build a :class:`VisionColumnformer` classifier from a ModelConfig (or a preset name / field dict).

    Other objectives build their own head around :func:`build_backbone` (see ``tasks/``).
    """
    from .vision import ClassifierHead, VisionColumnformer

    cfg = model_config(cfg)
    embed, sheet = build_backbone(cfg)
    head = ClassifierHead(cfg.sheet.width, cfg.num_classes, len(sheet.output_idx), cfg.pool, cfg.head_norm)
    return VisionColumnformer(embed, sheet, head)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
