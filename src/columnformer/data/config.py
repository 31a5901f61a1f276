"""The data section of a run config (``DataConfig``): owned by the data layer, read by its loaders."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    """Dataset and loading. ``digits`` is the embedded default (scikit-learn's 8x8 digits)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Literal["digits", "hf", "folder", "photos"] = Field(
        "digits", description="digits (embedded 8x8 digits), photos (patches of the photos bundled with scikit-learn, "
        "disjoint train/val/test regions; see data/photos.py), hf (Hugging Face), folder (image folders)",
    )
    path: str | None = Field(None, description="hub name or local path (hf), root folder (folder)")
    split_seed: int = Field(0, description="seed of the fixed train/val/test split (digits, photos' patch positions)")
    photo_patches: int = Field(8192, ge=16, description="photos: training patches (validation 1/16, test 1/8 of it)")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    augment: bool = True
    num_workers: int = Field(0, ge=0)
    labels_fraction: float = Field(
        1.0, gt=0, le=1, description="train on a class-balanced share of the training split (label-efficiency studies)"
    )
    labels_holdout: float = Field(
        0.0, ge=0, lt=1,
        description="hold out this class-balanced share of the training labels as the validation split (0: the val split)",
    )
    labels_seed: int = Field(0, description="seed of the labelled subset and its hold-out")
    # ---- image sources (hf, folder); see data/hf.py, data/folder.py, data/transforms.py
    hf_config: str | None = Field(None, description="Hugging Face dataset configuration name (hf)")
    train_split: str = Field("train", description="split (hf) or sub-folder (folder) to train on")
    val_split: str | None = Field(
        None, description="None: 'validation'/'val' if present and not used as test, else val_fraction of train"
    )
    test_split: str | None = Field(
        None, description="None: 'test' if present, else 'validation'/'val', else test_fraction of train"
    )
    image_column: str | None = Field(None, description="hf image column; None: 'image'/'img' or the Image feature")
    label_column: str | None = Field(None, description="hf label column; None: 'label'/'labels' or the ClassLabel feature")
    bad_images: Literal["skip", "fail"] = Field(
        "fail", description="an undecodable image: fail with its name, or skip it (replaced by the next one, counted and logged)"
    )
    crop_scale: tuple[float, float] = Field((0.35, 1.0), description="random resized crop: area fraction range")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random resized crop: aspect ratio range")
    eval_crop_frac: float = Field(0.875, gt=0, le=1, description="evaluation: resize to size/frac, centre-crop size")
    hflip: bool = Field(True, description="random horizontal flip (training)")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation jitter strength (training)")
    mean: list[float] | None = Field(None, description="per-channel normalisation mean; None: ImageNet (RGB) or 0.5 (grey)")
    std: list[float] | None = Field(None, description="per-channel normalisation std; None: ImageNet (RGB) or 0.5 (grey)")

    @model_validator(mode="after")
    def _check_images(self) -> "DataConfig":
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1 (got {self.crop_scale})")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"data.crop_ratio must satisfy 0 < min <= max (got {self.crop_ratio})")
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError("data.mean and data.std must be given together, with one value per channel")
        if self.std is not None and any(not (0 < s < math.inf) for s in self.std):
            raise ValueError(f"data.std must be positive and finite (got {self.std})")
        if self.mean is not None and any(not math.isfinite(m) for m in self.mean):
            raise ValueError(f"data.mean must be finite (got {self.mean})")
        return self
