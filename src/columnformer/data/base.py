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
        pixel_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """``pixel_norm``: (mean, std), each (C, 1, 1), that map [0, 1] pixels to these images (if known)."""
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (M, C, H, W) with one label each; got {tuple(images.shape)} and {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.classes = classes or [str(c) for c in range(int(labels.max()) + 1)]
        self.pixel_norm = pixel_norm

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img, sample_rng(self.seed, self.epoch, int(i)))
        return img, self.labels[i]


class LabelledSubset(Dataset):
    """A subset of an image dataset by index, keeping ``set_epoch``, ``labels`` (and ``images``) in step."""

    def __init__(self, ds, indices: np.ndarray):
        self.ds, self.indices = ds, np.asarray(indices, dtype=np.int64)
        self.labels = ds.labels[torch.from_numpy(self.indices)]
        if hasattr(ds, "images"):
            self.images = ds.images[torch.from_numpy(self.indices)]
        self.classes = getattr(ds, "classes", None)

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    @property
    def bad(self):
        return self.ds.bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.ds[int(self.indices[i])]


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced share of ``labels``: round(fraction * count) of each class, at least one."""
    rng = np.random.default_rng([seed, 0x1ABE1])
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx), max(1, int(round(fraction * len(idx)))))
        keep.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(keep))


def restrict_labels(sets: dict, fraction: float, holdout: float, seed: int) -> dict:
    """Train on a class-balanced ``fraction`` of the training split; with ``holdout`` > 0, a class-balanced
    share of that labelled subset becomes the validation split (so model selection sees no other labels).

    The hold-out is drawn from the labelled subset, then the rest is trained on: train and val never overlap.
    """
    train = sets["train"]
    labels = train.labels.numpy()
    subset = balanced_subset(labels, fraction, seed) if fraction < 1 else np.arange(len(labels))
    out = dict(sets)
    if holdout > 0:
        held = subset[balanced_subset(labels[subset], holdout, seed + 1)]
        if len(held) == len(subset):
            raise ValueError(
                f"data.labels_holdout={holdout} leaves no training images of data.labels_fraction={fraction}; lower it"
            )
        subset = np.setdiff1d(subset, held)
        out["val"] = LabelledSubset(_without_augmentation(train), held)
    out["train"] = LabelledSubset(train, subset)
    return out


def _without_augmentation(train):
    """The training split's images as the validation split would read them (no augmentation)."""
    if isinstance(train, ArrayImageDataset):
        return ArrayImageDataset(
            train.images, train.labels, transform=None, seed=train.seed, classes=train.classes, pixel_norm=train.pixel_norm
        )
    raise ValueError("data.labels_holdout needs an in-memory dataset (data.name=digits)")


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

