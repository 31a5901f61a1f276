"""Dataset plumbing shared by every source: per-sample seeded augmentation and epoch ordering.

Randomness is keyed by ``(seed, epoch, index)`` — never by worker, rank or call order — so a
resumed run, a multi-worker loader and a multi-process run all see exactly the same samples.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one sample in one epoch."""
    return np.random.default_rng([seed, epoch, index])


class ArrayImageDataset(Dataset):
    """Images held in memory as a float tensor (M, C, H, W) with integer labels (M,).

    ``transform(image, rng) -> image`` is applied with the sample's own generator when
    ``augment`` is true; ``set_epoch`` changes the augmentation of every sample.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
        seed: int = 0,
        classes: list[str] | None = None,
    ):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (M, C, H, W) with one label each; got {tuple(images.shape)} and {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.classes = classes or [str(c) for c in range(int(labels.max()) + 1)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img, sample_rng(self.seed, self.epoch, int(i)))
        return img, self.labels[i]


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices for an epoch, sharded over ranks, resumable mid-epoch.

    The permutation depends only on ``(seed, epoch)``; rank r of w takes every w-th index of it
    (the dataset is padded by wrapping so all ranks get the same count). ``start`` skips the
    first ``start`` samples of this rank's share, which is how a resumed run continues.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = -(-self.n // self.world_size)
        order = (order * 2)[: per_rank * self.world_size]  # pad by wrapping
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return len(self.indices()) - self.start


def build_datasets(data_cfg, model_cfg, seed: int = 0) -> dict[str, Dataset]:
    """Train/val/test datasets for a run, checked against the model's expected image shape."""
    if data_cfg.name == "digits":
        from .digits import digits_datasets

        sets = digits_datasets(data_cfg, seed=seed)
    elif data_cfg.name == "hf":
        from .hf import hf_datasets

        sets = hf_datasets(data_cfg, model_cfg, seed=seed)
    elif data_cfg.name == "folder":
        from .folder import folder_datasets

        sets = folder_datasets(data_cfg, model_cfg, seed=seed)
    else:  # pragma: no cover - config validation lists the allowed names
        raise ValueError(f"unknown dataset {data_cfg.name!r}")
    img, _ = sets["train"][0]
    expected = (model_cfg.in_chans, *model_cfg.image_size)
    if tuple(img.shape) != expected:
        raise ValueError(
            f"dataset '{data_cfg.name}' gives images of shape {tuple(img.shape)} but the model expects {expected}; "
            "set model.image_size / model.in_chans to match"
        )
    return sets
