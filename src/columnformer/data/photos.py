"""Natural-image patches available offline: the two photographs that ship inside scikit-learn.

``sklearn.datasets.load_sample_images()`` holds two 427 x 640 RGB photos (a temple in China, a flower; Pillow
decodes them). Every photo is cut into three horizontal bands, top to bottom: train (the first 1 - val - test
share of its rows), validation and test; every patch lies wholly inside one band, so patches of different splits
never share a pixel (disjoint regions). Patch positions are drawn per split from ``split_seed``; the patch size
is the model's ``image_size``; ``in_chans=1`` takes the luminance (ITU-R 601), 3 keeps colour. Pixels are
scaled to [0, 1], then normalised with the training split's mean and std. Training augmentation: a random
horizontal flip. Labels are all 0 (one class, "patch"): the data are for self-supervised training
(``task: mim``) and for analyses that need natural images (orientation maps).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ArrayImageDataset

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def load_photos(in_chans: int = 1) -> list[np.ndarray]:
    """The bundled photos as float32 arrays (C, H, W) in [0, 1] (luminance when ``in_chans`` is 1)."""
    from sklearn.datasets import load_sample_images  # decodes the JPEGs with Pillow (a core dependency)

    photos = []
    for img in load_sample_images().images:
        x = img.astype(np.float32) / 255.0  # (H, W, 3)
        x = (x @ LUMA)[None] if in_chans == 1 else x.transpose(2, 0, 1)
        photos.append(np.ascontiguousarray(x))
    return photos


def band_rows(height: int, val_fraction: float, test_fraction: float) -> dict[str, tuple[int, int]]:
    """Row ranges [start, stop) of the train / val / test bands of a photo of ``height`` rows."""
    train_end = int(round(height * (1 - val_fraction - test_fraction)))
    val_end = int(round(height * (1 - test_fraction)))
    return {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, height)}


def photo_patches(
    size: tuple[int, int], count: dict[str, int], in_chans: int = 1, val_fraction: float = 0.1,
    test_fraction: float = 0.2, split_seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Patches (M, C, h, w) in [0, 1] and their top-left corners (M, 3: photo, row, col) per split."""
    h, w = size
    photos = load_photos(in_chans)
    out = {}
    for k, split in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([split_seed, k])
        rows_ok = []
        for p, photo in enumerate(photos):
            r0, r1 = band_rows(photo.shape[1], val_fraction, test_fraction)[split]
            if r1 - r0 < h or photo.shape[2] < w:
                raise ValueError(
                    f"the {split} band of photo {p} ({r1 - r0} rows) is smaller than a {h}x{w} patch; lower "
                    "model.image_size or raise data.val_fraction / data.test_fraction"
                )
            rows_ok.append((r0, r1 - h + 1, photo.shape[2] - w + 1))
        which = rng.integers(0, len(photos), count[split])
        corners = np.stack([which,
                            [rng.integers(rows_ok[i][0], rows_ok[i][1]) for i in which],
                            [rng.integers(0, rows_ok[i][2]) for i in which]], axis=1)
        patches = np.stack([photos[i][:, r : r + h, c : c + w] for i, r, c in corners]).astype(np.float32)
        out[split] = (patches, corners)
    return out


def hflip(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return img.flip(-1) if rng.random() < 0.5 else img


def photo_datasets(data_cfg, model_cfg, seed: int = 0) -> dict[str, ArrayImageDataset]:
    n = data_cfg.photo_patches
    count = {"train": n, "val": max(1, n // 16), "test": max(1, n // 8)}
    arrays = photo_patches(tuple(model_cfg.image_size), count, model_cfg.in_chans, data_cfg.val_fraction,
                           data_cfg.test_fraction, data_cfg.split_seed)
    mean, std = float(arrays["train"][0].mean()), float(arrays["train"][0].std())
    sets = {}
    for split, (x, _) in arrays.items():
        images = torch.from_numpy((x - mean) / std)
        norm = (torch.full((x.shape[1], 1, 1), mean), torch.full((x.shape[1], 1, 1), std))
        transform = hflip if (split == "train" and data_cfg.augment) else None
        sets[split] = ArrayImageDataset(images, torch.zeros(len(x), dtype=torch.long), transform=transform, seed=seed,
                                        classes=["patch"], pixel_norm=norm)
    return sets
