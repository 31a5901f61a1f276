"""Image decoding and transforms written with Pillow + torch (no torchvision).

Training: random resized crop (area fraction in ``crop_scale``, aspect ratio in ``crop_ratio``),
horizontal flip, colour jitter (brightness, contrast, saturation; fixed order), normalisation.
Evaluation: resize so the image covers ``image_size / eval_crop_frac``, centre crop, normalisation
— deterministic. Every random choice is drawn from the generator handed in, which the datasets
key by ``(seed, epoch, index)`` (``data.base.sample_rng``), so augmentation does not depend on the
number of workers or processes.

Transforms are small picklable objects: ``transform(pil_image, rng) -> float tensor (C, H, W)``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..extras import require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImageError(ValueError):
    """An image that Pillow cannot decode (and ``data.bad_images=fail``)."""


def _pil():
    return require("PIL.Image", "image files (data.name=folder or hf)", "hf")


def decode_image(raw: Any, mode: str, draft_size: tuple[int, int] | None = None):
    """A decoded PIL image in ``mode`` ('RGB' or 'L') from a PIL image, bytes, a path, or a
    Hugging Face ``{"bytes": ..., "path": ...}`` dict. ``draft_size`` (w, h) lets JPEG decoding
    skip resolution the transform would throw away (never below ``draft_size``). Raises on failure."""
    Image = _pil()
    if isinstance(raw, Image.Image):
        img = raw
    else:
        if isinstance(raw, dict):
            raw = raw.get("bytes") or raw.get("path")
        if isinstance(raw, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(raw)))
        elif isinstance(raw, (str, Path)):
            img = Image.open(raw)
        else:
            raise TypeError(f"cannot decode an image from {type(raw).__name__}")
        if draft_size is not None and img.format == "JPEG":
            img.draft(mode, draft_size)
        img.load()  # decode now, so errors surface here
    if img.mode != mode:
        if img.mode in ("P", "PA"):  # palette images (maybe with transparency): expand first
            img = img.convert("RGBA")
        img = img.convert(mode)
    return img


def describe_raw(raw: Any) -> str:
    """A short name for an undecodable item in error messages (its path when known)."""
    if isinstance(raw, dict) and raw.get("path"):
        return repr(raw["path"])
    if isinstance(raw, (str, Path)):
        return repr(str(raw))
    if isinstance(raw, dict) and raw.get("bytes") is not None:
        return f"<{len(raw['bytes'])} bytes>"
    if isinstance(raw, (bytes, bytearray)):
        return f"<{len(raw)} bytes>"
    return f"<{type(raw).__name__}>"


def pil_to_tensor(img) -> torch.Tensor:
    """PIL image -> float tensor (C, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


def default_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering a random area fraction in ``scale`` with a random
    aspect ratio (w/h, log-uniform) in ``ratio``; after 10 failed tries a centre crop (torchvision's rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def color_jitter(x: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors each uniform in [1 - s, 1 + s] (fixed order), on [0, 1] images."""
    lo, hi = max(0.0, 1 - strength), 1 + strength
    b, c, s = rng.uniform(lo, hi, size=3)
    x = x * float(b)
    gray = x.mean(0, keepdim=True) if x.shape[0] != 3 else (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    x = (x - gray.mean()) * float(c) + gray.mean()
    if x.shape[0] == 3:
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        x = gray + (x - gray) * float(s)
    return x.clamp_(0.0, 1.0)


class _Base:
    def __init__(self, image_size, mean, std):
        self.size = (int(image_size[0]), int(image_size[1]))  # (H, W)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.channels = len(mean)
        self.mode = "RGB" if self.channels == 3 else "L"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TrainTransform(_Base):
    """Random resized crop -> optional flip -> optional colour jitter -> tensor -> normalise."""

    def __init__(self, image_size, mean, std, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, jitter=0.0):
        super().__init__(image_size, mean, std)
        self.scale, self.ratio, self.hflip, self.jitter = tuple(scale), tuple(ratio), hflip, jitter

    def draft_size(self) -> tuple[int, int]:
        # a crop of the smallest area fraction must still have at least the output resolution
        f = 1 / math.sqrt(self.scale[0])
        return int(math.ceil(self.size[1] * f)), int(math.ceil(self.size[0] * f))

    def __call__(self, img, rng: np.random.Generator) -> torch.Tensor:
        Image = _pil()
        box = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        img = img.resize((self.size[1], self.size[0]), Image.BILINEAR, box=box)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = pil_to_tensor(img)
        if self.jitter > 0:
            x = color_jitter(x, self.jitter, rng)
        return self.normalize(x)


class EvalTransform(_Base):
    """Resize so the image covers ``size / crop_frac`` (aspect kept), centre crop ``size``, normalise. Deterministic."""

    def __init__(self, image_size, mean, std, crop_frac=0.875):
        super().__init__(image_size, mean, std)
        self.crop_frac = crop_frac

    def draft_size(self) -> tuple[int, int]:
        return int(math.ceil(self.size[1] / self.crop_frac)), int(math.ceil(self.size[0] / self.crop_frac))

    def __call__(self, img, rng=None) -> torch.Tensor:
        Image = _pil()
        h, w = self.size
        s = max(h / self.crop_frac / img.height, w / self.crop_frac / img.width)
        new_w, new_h = max(w, int(round(img.width * s))), max(h, int(round(img.height * s)))
        img = img.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - w) // 2, (new_h - h) // 2
        img = img.crop((left, top, left + w, top + h))
        return self.normalize(pil_to_tensor(img))


def build_transforms(data_cfg, model_cfg) -> tuple[Any, EvalTransform]:
    """(train transform, eval transform) for an image source; train == eval when ``data.augment`` is false."""
    channels = model_cfg.in_chans
    if channels not in (1, 3):
        raise ValueError(f"image datasets give 1 (grey) or 3 (RGB) channels; model.in_chans={channels}")
    mean, std = (data_cfg.mean, data_cfg.std) if data_cfg.mean is not None else default_mean_std(channels)
    if len(mean) != channels:
        raise ValueError(f"data.mean/data.std have {len(mean)} values but model.in_chans={channels}")
    ev = EvalTransform(model_cfg.image_size, mean, std, data_cfg.eval_crop_frac)
    if not data_cfg.augment:
        return ev, ev
    tr = TrainTransform(
        model_cfg.image_size, mean, std, data_cfg.crop_scale, data_cfg.crop_ratio, data_cfg.hflip, data_cfg.color_jitter
    )
    return tr, ev
