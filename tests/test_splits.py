"""Splits of the embedded digits data are disjoint and cover the data set (no test image is trained on)."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from columnformer.config import build_config
from columnformer.data import build_datasets


def _rows(images) -> set[bytes]:
    return {row.tobytes() for row in images.reshape(len(images), -1).numpy()}


def test_digits_splits_are_disjoint_and_cover_the_data():
    assert len(np.unique(load_digits().data, axis=0)) == 1797  # every source image is distinct: rows identify images
    for split_seed in (0, 3):
        cfg = build_config({}, [f"data.split_seed={split_seed}", "data.augment=false"])
        sets = build_datasets(cfg.data, cfg.model, seed=0)
        rows = {name: _rows(ds.images) for name, ds in sets.items()}
        assert {k: len(v) for k, v in rows.items()} == {"train": 1257, "val": 180, "test": 360}
        assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
        assert len(rows["train"] | rows["val"] | rows["test"]) == 1797
