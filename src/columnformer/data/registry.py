"""The dataset registry: ``data.name`` -> the loader of that source (each loader module imported only when
named, so optional packages stay optional), label restriction, and the check against the model's input shape."""

from __future__ import annotations

from torch.utils.data import Dataset

from .base import restrict_labels


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
    elif data_cfg.name == "photos":
        from .photos import photo_datasets

        sets = photo_datasets(data_cfg, model_cfg, seed=seed)
    else:  # pragma: no cover - config validation lists the allowed names
        raise ValueError(f"unknown dataset {data_cfg.name!r}")
    if data_cfg.labels_fraction < 1 or data_cfg.labels_holdout > 0:
        sets = restrict_labels(sets, data_cfg.labels_fraction, data_cfg.labels_holdout, data_cfg.labels_seed)
    img, _ = sets["train"][0]
    expected = (model_cfg.in_chans, *model_cfg.image_size)
    if tuple(img.shape) != expected:
        raise ValueError(
            f"dataset '{data_cfg.name}' gives images of shape {tuple(img.shape)} but the model expects {expected}; "
            "set model.image_size / model.in_chans to match"
        )
    return sets
