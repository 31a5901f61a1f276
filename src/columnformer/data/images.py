"""Decoded-image datasets shared by the Hugging Face and image-folder sources.

``ImageDataset`` reads a raw item (path, bytes, PIL image, or HF ``{"bytes", "path"}`` dict) from
a picklable *source*, decodes it with Pillow and applies a transform with the generator of
``(seed, epoch, index)``. It is picklable, so ``DataLoader(num_workers>0)`` works.

Undecodable images (``data.bad_images``):
  ``fail``  raise :class:`BadImageError` naming the item and the decoder's message;
  ``skip``  warn once per image on stderr, return the next decodable item of the split instead
            (deterministic: the same substitute whatever the worker count), and mark the index in a
            shared-memory mask, so ``bad_count()`` counts every distinct bad image seen by any worker.
            The trainer logs the count with each epoch (``bad_images``) and in summary.json.

Split resolution (``resolve_splits``) is shared too: explicit split names must exist; otherwise
``test`` falls back to ``validation``/``val``, and a missing val/test split is carved out of the
training split with a seeded permutation (``data.split_seed``, ``val_fraction``, ``test_fraction``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import sample_rng
from .transforms import BadImageError, decode_image, describe_raw

MAX_CONSECUTIVE_BAD = 64
VAL_NAMES = ("validation", "valid", "val")
TEST_NAMES = ("test",)


class DataError(ValueError):
    """A dataset that cannot be used as configured (missing split or column, wrong labels)."""


class ListSource:
    """Raw items held in a list (file paths of an image folder)."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def raw(self, i: int) -> Any:
        return self.items[i]


class ImageDataset(Dataset):
    """(image tensor (C, H, W), label) pairs decoded on access; ``set_epoch`` re-keys augmentation."""

    def __init__(
        self,
        source,
        labels: torch.Tensor | np.ndarray,
        transform: Callable,
        *,
        seed: int = 0,
        split: str = "train",
        classes: list[str] | None = None,
        bad_images: str = "fail",
        indices: np.ndarray | None = None,
    ):
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = labels if self.indices is None else labels[torch.from_numpy(self.indices)]
        self.split, self.bad_images = split, bad_images
        self.classes = classes or [str(c) for c in range(int(self.labels.max()) + 1 if len(self.labels) else 0)]
        if len(self.labels) == 0:
            raise DataError(f"split '{split}' has no images")
        # shared across DataLoader workers (inherited by fork, passed by handle under spawn)
        self.bad = torch.zeros(len(self.labels), dtype=torch.bool).share_memory_()
        draft = getattr(transform, "draft_size", None)
        self._draft = draft() if callable(draft) else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def _raw(self, j: int) -> Any:
        return self.source.raw(int(j if self.indices is None else self.indices[j]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        j = i
        for _ in range(min(MAX_CONSECUTIVE_BAD, len(self))):
            raw = self._raw(j)
            try:
                img = decode_image(raw, self.transform.mode, self._draft)
            except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
                msg = f"image {j} of split '{self.split}' ({describe_raw(raw)}) cannot be decoded: {type(exc).__name__}: {exc}"
                if self.bad_images == "fail":
                    raise BadImageError(f"{msg}; set data.bad_images=skip to skip such images (they are counted and logged)") from None
                if not bool(self.bad[j]):
                    self.bad[j] = True
                    print(f"warning: skipping {msg}", file=sys.stderr, flush=True)
                j = (j + 1) % len(self)
                continue
            return self.transform(img, sample_rng(self.seed, self.epoch, i)), self.labels[j]
        raise BadImageError(
            f"{min(MAX_CONSECUTIVE_BAD, len(self))} consecutive images of split '{self.split}' from index {i} cannot be "
            "decoded; the dataset looks broken (check the image column / files)"
        )

    def bad_count(self) -> int:
        """How many distinct images of this split were found undecodable (and skipped) so far."""
        return int(self.bad.sum())

    def bad_indices(self) -> list[int]:
        return torch.nonzero(self.bad).flatten().tolist()


def resolve_splits(available: Sequence[str], data_cfg, where: str) -> dict[str, str | None]:
    """Map roles train/val/test to split names of the source; None = carve out of train."""
    available = list(available)

    def need(name: str, key: str) -> str:
        if name not in available:
            raise DataError(
                f"{where} has no split {name!r} (data.{key}); available splits: {', '.join(available) or '(none)'}"
            )
        return name

    train = need(data_cfg.train_split, "train_split")
    val = need(data_cfg.val_split, "val_split") if data_cfg.val_split is not None else None
    test = need(data_cfg.test_split, "test_split") if data_cfg.test_split is not None else None
    if test is None:
        test = next((s for s in (*TEST_NAMES, *VAL_NAMES) if s in available and s not in (train, val)), None)
    if val is None and data_cfg.val_split is None:
        val = next((s for s in VAL_NAMES if s in available and s not in (train, test)), None)
    return {"train": train, "val": val, "test": test}


def carve(n: int, data_cfg, need_val: bool, need_test: bool) -> dict[str, np.ndarray]:
    """Seeded split of ``range(n)`` into train (+ val) (+ test) index arrays (sorted)."""
    order = np.random.default_rng(data_cfg.split_seed).permutation(n)
    n_test = int(round(n * data_cfg.test_fraction)) if need_test else 0
    n_val = int(round(n * data_cfg.val_fraction)) if need_val else 0
    if n - n_test - n_val < 1 or (need_test and n_test < 1) or (need_val and n_val < 1):
        raise DataError(
            f"the training split has {n} images: too few to carve out val/test fractions "
            f"({data_cfg.val_fraction}, {data_cfg.test_fraction}); provide val/test splits"
        )
    out = {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test : n_test + n_val])}
    out["train"] = np.sort(order[n_test + n_val :])
    return out


def check_labels(labels: np.ndarray, classes: list[str] | None, model_cfg, where: str) -> None:
    if len(labels) and (labels.min() < 0):
        raise DataError(f"{where}: labels must be non-negative class indices (found {int(labels.min())})")
    n_classes = len(classes) if classes else (int(labels.max()) + 1 if len(labels) else 0)
    if n_classes > model_cfg.num_classes:
        raise DataError(
            f"{where} has {n_classes} classes but model.num_classes={model_cfg.num_classes}; "
            f"set model.num_classes={n_classes}"
        )


def build_split_datasets(
    sources: dict[str, Any],
    labels: dict[str, np.ndarray],
    roles: dict[str, str | None],
    train_tf,
    eval_tf,
    data_cfg,
    seed: int,
    classes: list[str] | None,
) -> dict[str, ImageDataset]:
    """Datasets for train/val/test from per-split sources, carving missing val/test from train."""
    train_name = roles["train"]
    cut = None
    if roles["val"] is None or roles["test"] is None:
        cut = carve(len(labels[train_name]), data_cfg, roles["val"] is None, roles["test"] is None)
    out = {}
    for role in ("train", "val", "test"):
        name = roles[role]
        tf = train_tf if role == "train" else eval_tf
        common = dict(seed=seed, classes=classes, bad_images=data_cfg.bad_images)
        if name is None or (role == "train" and cut is not None):
            out[role] = ImageDataset(
                sources[train_name], labels[train_name], tf, split=f"{train_name}[{role}]", indices=cut[role], **common
            )
        else:
            out[role] = ImageDataset(sources[name], labels[name], tf, split=name, **common)
    return out
