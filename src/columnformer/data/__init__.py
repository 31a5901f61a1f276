"""Datasets: the embedded digits set by default; see ``build_datasets`` (registry.py)."""

from .base import ArrayImageDataset, EpochSampler
from .registry import build_datasets

__all__ = ["ArrayImageDataset", "EpochSampler", "build_datasets"]
