"""Connectivity: which columns each column reads.

``Connectivity.dense(geometry)`` lists all pairs; sparse connectivities store, for each of the
N columns, a padded list of K incoming edges:

    index  (N, K) long   source column of each edge
    mask   (N, K) bool   which entries are real edges (padding is False)
    dist   (N, K) float  length of each edge in the geometry

Dense connectivity keeps ``index = mask = None`` and ``dist`` as the (N, N) distance matrix.
The attention kernel is chosen from ``is_dense``; parameters (the learned per-edge bias) take
the shape of ``dist``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import Geometry


@dataclass(eq=False)
class Connectivity:
    """Incoming edges of every column. See the module docstring for the layout."""

    geometry: Geometry
    dist: torch.Tensor  # (N, N) dense, or (N, K)
    index: torch.Tensor | None = None  # (N, K) long, None when dense
    mask: torch.Tensor | None = None  # (N, K) bool, None when dense
    kind: str = "dense"

    @property
    def n(self) -> int:
        return self.geometry.n

    @property
    def is_dense(self) -> bool:
        return self.index is None

    @property
    def k(self) -> int:
        """Edges per column (N for dense)."""
        return self.n if self.is_dense else self.index.shape[1]

    @classmethod
    def dense(cls, geometry: Geometry) -> "Connectivity":
        """All pairs: every column reads every column (itself included)."""
        return cls(geometry=geometry, dist=geometry.distances())

    def num_edges(self) -> int:
        return self.n * self.n if self.is_dense else int(self.mask.sum())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "k": self.k, "edges": self.num_edges()}
