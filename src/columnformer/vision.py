"""Image front end and task heads around a :class:`Columnformer` sheet.

    images (B, C_img, H, W)
      -> PatchEmbed: conv(patch, stride)         (B, n_in, C)   stride < patch: overlapping patches
      -> [mask: masked tokens -> mask token]     (B, n_in, C)   masked image modeling only
      -> Columnformer sheet                      (B, n_out, C)  tokens enter the input area
      -> head: a task's read-out                 e.g. ClassifierHead (B, num_classes), tasks.mim.PatchDecoder
"""

from __future__ import annotations

import torch
from torch import nn

from .sheet import Columnformer, Trace


class PatchEmbed(nn.Module):
    """Split an image into (possibly overlapping) patches and embed each: (B, C_img, H, W) -> (B, n, C)."""

    def __init__(self, image_size: tuple[int, int], in_chans: int, patch: int, stride: int, dim: int):
        super().__init__()
        h, w = image_size
        if patch > min(h, w) or stride < 1:
            raise ValueError(f"patch={patch}, stride={stride} do not fit a {h}x{w} image")
        self.image_size, self.in_chans = (h, w), in_chans
        self.grid = ((h - patch) // stride + 1, (w - patch) // stride + 1)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=stride)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_chans or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"images have shape {tuple(images.shape)}, expected (B, {self.in_chans}, "
                f"{self.image_size[0]}, {self.image_size[1]})"
            )
        x = self.proj(images)  # (B, C, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, C)


class ClassifierHead(nn.Module):
    """Pool the output area, normalise and classify.

    ``pool="avg"``: mean over output columns, then a linear layer.
    ``pool="spatial"``: one learned softmax pooling map over the output columns per class; each
    class reads its own pooled vector (per-class spatial pooling).
    ``norm="pooled"``: LayerNorm the pooled vector (the default); ``norm="tokens"``: LayerNorm every
    output column, then pool (the predecessor's order; LayerNorm does not commute with pooling).
    """

    def __init__(self, dim: int, num_classes: int, n_out: int, pool: str = "avg", norm: str = "pooled"):
        super().__init__()
        if pool not in ("avg", "spatial"):
            raise ValueError(f"pool must be 'avg' or 'spatial', got {pool!r}")
        if norm not in ("pooled", "tokens"):
            raise ValueError(f"norm must be 'pooled' or 'tokens', got {norm!r}")
        self.pool, self.norm_order = pool, norm
        self.pool_weight = nn.Parameter(torch.empty(num_classes, n_out)) if pool == "spatial" else None
        if self.pool_weight is not None:
            nn.init.trunc_normal_(self.pool_weight, std=0.2)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.bias)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, n_out, C)
        if self.norm_order == "tokens":
            x = self.norm(x)  # (B, n_out, C)
        if self.pool == "avg":
            pooled = x.mean(dim=1)  # (B, C)
        else:
            pooled = self.pool_weight.softmax(-1) @ x  # (B, K, C)
        if self.norm_order == "pooled":
            pooled = self.norm(pooled)
        if self.pool == "avg":
            return self.fc(pooled)  # (B, K)
        return (pooled * self.fc.weight).sum(-1) + self.fc.bias  # (B, K)

    def extra_repr(self) -> str:
        return f"pool={self.pool}, norm={self.norm_order}"


class VisionColumnformer(nn.Module):
    """Patch embedding -> Columnformer sheet -> head. ``forward`` returns (head output, trace).

    ``mask_token=True`` adds a learned token that replaces the embeddings of masked patches
    (``forward(images, mask=...)``, mask (B, n_in) bool, True = masked).
    """

    def __init__(self, embed: PatchEmbed, sheet: Columnformer, head: nn.Module, mask_token: bool = False):
        super().__init__()
        if embed.num_patches != sheet.num_tokens:
            raise ValueError(
                f"the image gives {embed.num_patches} patches ({embed.grid[0]}x{embed.grid[1]}) but the sheet "
                f"takes {sheet.num_tokens} tokens (its input area has {len(sheet.input_idx)} columns); change "
                "patch/stride or the geometry"
            )
        self.embed, self.sheet, self.head = embed, sheet, head
        self.mask_token = nn.Parameter(torch.zeros(sheet.cfg.width)) if mask_token else None
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def features(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, record=(), steps: int | None = None
    ) -> tuple[torch.Tensor, Trace]:
        """The sheet's output area before the head: (B, n_out, C), and the trace (``steps``: see the sheet)."""
        tokens = self.embed(images)  # (B, n_in, C)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token; build it for masked image modeling (task: mim)")
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (B, n_in) = {tuple(tokens.shape[:2])}")
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)  # (B, n_in, C)
        return self.sheet(tokens, record=record, steps=steps)  # (B, n_out, C)

    def forward(
        self, images: torch.Tensor, record=(), mask: torch.Tensor | None = None, steps: int | None = None
    ) -> tuple[torch.Tensor, Trace]:
        features, trace = self.features(images, mask, record, steps)  # (B, n_out, C)
        return self.head(features), trace
