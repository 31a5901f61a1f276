"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (1,797 images).

A fixed, seeded, stratified train/val/test split; pixels scaled to [0, 1] and normalised with the
training mean and std. Training augmentation: a random shift of up to one pixel (padded with background).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .base import ArrayImageDataset
from .config import DataConfig


def digits_arrays(split_seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2):
    """(x, y) numpy arrays per split: x (M, 64) in [0, 1], y (M,). Deterministic in ``split_seed``."""
    data = load_digits()
    x, y = data.data.astype(np.float32) / 16.0, data.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), random_state=split_seed, stratify=y_rest
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def random_shift(img: torch.Tensor, rng: np.random.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift an image (C, H, W) by up to ``max_shift`` pixels in each direction, padding with background."""
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
    background = float(img.min())  # the blank pixel value after normalisation
    padded = torch.nn.functional.pad(img, (max_shift,) * 4, value=background)
    h, w = img.shape[1:]
    return padded[:, max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def digits_datasets(data_cfg, seed: int = 0) -> dict[str, ArrayImageDataset]:
    arrays = digits_arrays(data_cfg.split_seed, data_cfg.val_fraction, data_cfg.test_fraction)
    mean, std = arrays["train"][0].mean(), arrays["train"][0].std()
    sets = {}
    for split, (x, y) in arrays.items():
        images = torch.from_numpy((x - mean) / std).view(-1, 1, 8, 8)
        transform = random_shift if (split == "train" and data_cfg.augment) else None
        norm = (torch.tensor(mean).view(1, 1, 1), torch.tensor(std).view(1, 1, 1))  # [0, 1] pixels -> images
        sets[split] = ArrayImageDataset(images, torch.from_numpy(y), transform=transform, seed=seed, pixel_norm=norm)
    return sets


def load_digits_split(split: str = "test", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (M, 1, 8, 8), normalised as in training, and labels of one split (no augmentation)."""
    ds = digits_datasets(DataConfig(augment=False, split_seed=seed))[split]
    return ds.images, ds.labels
