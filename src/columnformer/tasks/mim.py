"""``task: mim`` — masked image modeling: hide patches, let the sheet run, reconstruct their pixels.

    images (B, C_img, H, W), mask (B, L) bool          L = number of patches, mask_fraction * L True
      -> patch embedding; masked tokens replaced by a learned mask token
      -> the sheet runs its T steps                     (B, n_out, C)   the read-out area = model.output_area
      -> PatchDecoder: one learned query per patch attends over the read-out columns, MLP
                                                        (B, L, C_img * patch * patch)
    loss = mean over masked patches of the squared error against the patch's pixels,
           normalised per patch (zero mean, unit variance: MAE's norm_pix_loss) when ``norm_pix``.

Masks are drawn per sample from ``(seed, epoch, index)`` like the augmentation (so resumed and
multi-process runs see the same masks); every image gets exactly ``round(mask_fraction * L)``
masked patches, so a mean over samples is the mean over all masked patches. ``mask: block``
masks rectangles of patches (BEiT-style blockwise masking) instead of independent patches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from ..factory import build_backbone
from ..vision import VisionColumnformer
from .base import Task, TaskConfig

MASK_STREAM = 0x6D696D  # keeps mask draws apart from the augmentation's (seed, epoch, index) stream


class MimConfig(TaskConfig):
    """Masked image modeling options."""

    name: Literal["mim"] = "mim"
    mask_fraction: float = Field(0.5, description="share of the patches masked in every image, in (0, 1)")
    mask: Literal["random", "block"] = Field("random", description="independent patches, or rectangles of patches")
    norm_pix: bool = Field(True, description="targets normalised per patch (mean 0, variance 1)")
    decoder_hidden: int = Field(128, ge=1, description="hidden width of the decoder MLP")

    @field_validator("mask_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(
                "task.mask_fraction must lie strictly between 0 and 1: 0 masks nothing (no loss to learn from), "
                "1 masks every patch (nothing to reconstruct from)"
            )
        return v


# ------------------------------------------------------------------ masks
def num_masked(fraction: float, num_patches: int) -> int:
    m = int(round(fraction * num_patches))
    if not 1 <= m <= num_patches - 1:
        raise ValueError(
            f"task.mask_fraction={fraction} masks {m} of {num_patches} patches; choose a fraction that masks at "
            f"least one patch and leaves at least one visible (between {1 / num_patches:.3g} and "
            f"{1 - 1 / num_patches:.3g} here)"
        )
    return m


def random_mask(grid: tuple[int, int], m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` of the grid's patches chosen uniformly: (gh * gw,) bool."""
    n = grid[0] * grid[1]
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=m, replace=False)] = True
    return mask


def block_mask(grid: tuple[int, int], m: int, rng: np.random.Generator) -> np.ndarray:
    """Rectangles of patches (area up to a quarter of the grid, aspect ratio 0.3-3.3) until ``m`` are masked.

    The last rectangle may overshoot; its excess patches are unmasked again at random, so every mask
    has exactly ``m`` patches.
    """
    gh, gw = grid
    mask = np.zeros((gh, gw), dtype=bool)
    max_area = max(1, gh * gw // 4)
    while mask.sum() < m:
        area = rng.uniform(1, max_area)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h = int(np.clip(round(math.sqrt(area * aspect)), 1, gh))
        w = int(np.clip(round(math.sqrt(area / aspect)), 1, gw))
        top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
        before = mask.copy()
        mask[top : top + h, left : left + w] = True
        excess = int(mask.sum()) - m
        if excess > 0:
            new = np.flatnonzero(mask & ~before)
            mask.flat[rng.choice(new, size=excess, replace=False)] = False
    return mask.reshape(-1)


class MaskedImages(Dataset):
    """``(image, mask)`` pairs from a labelled image dataset; labels are dropped."""

    def __init__(self, ds, grid: tuple[int, int], m: int, kind: str, seed: int):
        self.ds, self.grid, self.m, self.kind, self.seed = ds, grid, m, kind, seed
        self.epoch = 0
        self._draw = random_mask if kind == "random" else block_mask

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.ds.set_epoch(epoch)

    @property
    def bad(self):  # undecodable-image counts of the underlying dataset (image folders / HF)
        return self.ds.bad

    def __len__(self) -> int:
        return len(self.ds)

    def mask(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, int(i), MASK_STREAM])
        return torch.from_numpy(self._draw(self.grid, self.m, rng))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, _ = self.ds[i]
        return img, self.mask(i)


# ------------------------------------------------------------------ decoder
class PatchDecoder(nn.Module):
    """Read-out columns (B, n_read, C) -> pixels of every patch (B, L, P).

    Patch ``l`` has a learned query; it attends over the (normalised) read-out columns with a
    learned per-(patch, column) bias, and an MLP maps the result to the patch's pixels.
    """

    def __init__(self, dim: int, n_read: int, num_patches: int, patch_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query_embed = nn.Parameter(torch.zeros(num_patches, dim))
        self.bias = nn.Parameter(torch.zeros(num_patches, n_read))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, patch_dim))
        nn.init.trunc_normal_(self.query_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.norm(x)  # (B, n_read, C)
        scores = self.query_embed @ f.transpose(1, 2) / math.sqrt(f.shape[-1]) + self.bias  # (B, L, n_read)
        y = scores.softmax(-1) @ f + self.query_embed  # (B, L, C)
        return self.mlp(y)  # (B, L, P)


def patch_pixels(images: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """The pixels of every patch, in the patch embedding's order: (B, C, H, W) -> (B, L, C * patch^2)."""
    return F.unfold(images, kernel_size=patch, stride=stride).transpose(1, 2)  # (B, L, P)


# ------------------------------------------------------------------ the task
class MimTask(Task):
    """Batches ``(images, mask)``; outputs predicted patch pixels (B, L, P); loss on masked patches only."""

    name = "mim"
    select = ("loss", "min")

    def __init__(self, cfg: MimConfig, model_cfg):
        super().__init__(cfg, model_cfg)
        mc = self.model_cfg
        self.patch, self.stride, self.grid = mc.patch, mc.stride or mc.patch, mc.patch_grid
        self.num_masked = num_masked(cfg.mask_fraction, self.grid[0] * self.grid[1])  # 0 or all patches: error

    def build_model(self):
        mc = self.model_cfg
        embed, sheet = build_backbone(mc)
        patch_dim = mc.in_chans * mc.patch**2
        head = PatchDecoder(mc.sheet.width, len(sheet.output_idx), embed.num_patches, patch_dim, self.cfg.decoder_hidden)
        return VisionColumnformer(embed, sheet, head, mask_token=True)

    def dataset(self, ds, split, seed: int = 0):
        return MaskedImages(ds, self.grid, self.num_masked, self.cfg.mask, seed)

    def forward(self, model, batch, record=(), steps=None):
        images, mask = batch
        extra = {} if steps is None else {"steps": steps}
        return model(images, record=record, mask=mask, **extra)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction targets (B, L, P): patch pixels, normalised per patch when ``norm_pix``."""
        target = patch_pixels(images.float(), self.patch, self.stride)
        if self.cfg.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def per_sample_loss(self, outputs: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,): mean squared error over the masked patches of each image (visible patches do not count)."""
        err = (outputs.float() - self.targets(images)).pow(2).mean(-1)  # (B, L)
        m = mask.float()
        return (err * m).sum(-1) / m.sum(-1).clamp_min(1)

    def loss(self, outputs, batch, reduction="mean", train=True):
        per_sample = self.per_sample_loss(outputs, batch[0], batch[1])
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    # ---- figures
    @torch.no_grad()
    def reconstruct(self, model, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction) images (B, C, H, W): masked patches blanked / filled by the model.

        With ``norm_pix`` the prediction is mapped back to pixels with each patch's own mean and std
        (as MAE's visualisation does); visible patches show the original pixels.
        """
        model.eval()
        pred, _ = model(images, mask=mask)  # (B, L, P)
        pix = patch_pixels(images.float(), self.patch, self.stride)  # (B, L, P)
        if self.cfg.norm_pix:
            pred = pred * (pix.var(-1, keepdim=True) + 1e-6).sqrt() + pix.mean(-1, keepdim=True)
        m = mask.unsqueeze(-1).float()  # (B, L, 1)
        blank = torch.full_like(pix, float(images.min() + images.max()) / 2)  # grey: masked
        size, fold = images.shape[-2:], dict(kernel_size=self.patch, stride=self.stride)
        cover = F.fold(torch.ones_like(pix).transpose(1, 2), size, **fold)  # overlapping patches: average them
        as_image = lambda p: F.fold(p.transpose(1, 2), size, **fold) / cover  # noqa: E731
        return as_image(pix * (1 - m) + blank * m), as_image(pix * (1 - m) + pred * m)

    def figures(self, fig_dir, model, ds, device, count: int = 8) -> None:
        """figures/reconstructions.png: originals, masked inputs and reconstructions of test images (one mosaic)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        items = [ds[i] for i in range(min(count, len(ds)))]
        images = torch.stack([x for x, _ in items]).to(device)
        mask = torch.stack([m for _, m in items]).to(device)
        masked, recon = self.reconstruct(model, images, mask)
        lo, hi = float(images.min()), float(images.max())
        rows = [((b.detach().cpu().float() - lo) / (hi - lo)).clamp(0, 1) for b in (images, masked, recon)]
        c, h, w = images.shape[1:]
        mosaic = torch.ones(c, 3 * (h + 1) - 1, len(items) * (w + 1) - 1)  # white 1-pixel gaps
        for r, batch in enumerate(rows):
            for i in range(len(items)):
                mosaic[:, r * (h + 1) : r * (h + 1) + h, i * (w + 1) : i * (w + 1) + w] = batch[i]
        fig, ax = plt.subplots(figsize=(1.1 * len(items) + 1, 3.8))
        ax.imshow(mosaic[0].numpy() if c == 1 else mosaic.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([(h + 1) * r + h / 2 for r in range(3)], ["original", "masked", "reconstruction"], fontsize=8)
        ax.set_title(f"masked image modeling: {self.cfg.mask} masks, {self.num_masked} of {mask.shape[1]} patches", fontsize=9)
        fig.tight_layout()
        fig.savefig(Path(fig_dir) / "reconstructions.png", dpi=110)
        plt.close(fig)
