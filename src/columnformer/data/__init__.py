"""Datasets: the embedded digits set by default; see ``build_datasets``."""

from .base import ArrayImageDataset, EpochSampler, build_datasets

__all__ = ["ArrayImageDataset", "EpochSampler", "build_datasets"]
