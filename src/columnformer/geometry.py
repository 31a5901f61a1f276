"""Geometry: where the columns of a sheet sit, and how far apart they are.

A :class:`Geometry` holds the coordinates of N columns, the metric that turns
coordinates into distances (Euclidean, or great-circle on a sphere), a layer
label per column (all zeros for a single sheet), and the normaliser
``mean(D**p)`` over all pairs used by the wiring cost.

Builders::

    grid(h, w)                      # h x w sheet, unit spacing (any h, w)
    stacked([(16, 16), (8, 8)], 2)  # stack of centred grids, layer i at height i * spacing
    stacked([(8, 8), (64, 64)], 1, span=True)  # every layer stretched over the widest (retinotopic)
    sphere(n)                       # Fibonacci lattice, great-circle distances, ~unit spacing
    from_coords(array)              # user coordinates of any dimension, Euclidean
    multilayer([(8, 8)] * 6, 2.0)   # the predecessor's layout (clane9/columnformers multilayer_geometry)

``gap`` (default 0) is a distance added in quadrature to every connection, a column's
connection to itself included: ``sqrt(d**2 + gap**2)``. It models a feed-forward stack drawn as one
sheet, where each step's sheet reads the one ``gap`` below it (the predecessor's single-layer
"depth offset"). ``distances``/``pair_distances`` return connection lengths (gap included: the
attention-bias initialisation and the wiring cost use them); ``pair_distances(..., along_sheet=True)``
returns positions' distances without it (topography).

Distances are computed on demand (``distances()`` for all pairs, ``pair_distances(i, j)``
for index arrays) so a 10^6-column geometry never forms an N x N matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

EUCLIDEAN = "euclidean"
GREAT_CIRCLE = "great_circle"
_EXACT_NORM_MAX_N = 4096  # above this, mean(D^p) comes from a seeded sample of pairs
_NORM_SAMPLE_PAIRS = 1_000_000


class GeometryError(ValueError):
    """Bad geometry input (empty, NaN coordinates, mismatched sizes)."""


@dataclass(frozen=True, eq=False)
class Geometry:
    """Coordinates of N columns and the metric between them.

    Attributes:
        coords: (N, D) float64 coordinates.
        metric: ``"euclidean"`` or ``"great_circle"`` (coords on a sphere of radius ``radius``).
        layer: (N,) int layer index of each column (0 for single sheets).
        layer_shapes: grid shape of each layer, or ``None`` for unstructured layouts (sphere, user coords).
        name: a short description, e.g. ``"grid(4x4)"``.
        radius: sphere radius for the great-circle metric.
        gap: distance added in quadrature to every connection (see the module docstring).
    """

    coords: np.ndarray
    metric: str = EUCLIDEAN
    layer: np.ndarray | None = None
    layer_shapes: tuple[tuple[int, int], ...] | None = None
    name: str = "coords"
    radius: float = 1.0
    gap: float = 0.0
    _norm_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[0] < 1 or coords.shape[1] < 1:
            raise GeometryError(
                f"coordinates must be an (N, D) array with N >= 1 and D >= 1, got shape {coords.shape}"
            )
        if not np.isfinite(coords).all():
            raise GeometryError("coordinates contain NaN or infinite values; pass finite coordinates")
        if not (math.isfinite(self.gap) and self.gap >= 0):
            raise GeometryError(f"gap must be a finite distance >= 0, got {self.gap}")
        if self.metric not in (EUCLIDEAN, GREAT_CIRCLE):
            raise GeometryError(f"metric must be 'euclidean' or 'great_circle', got {self.metric!r}")
        layer = np.zeros(len(coords), dtype=np.int64) if self.layer is None else np.asarray(self.layer)
        if layer.shape != (len(coords),):
            raise GeometryError(f"layer labels have shape {layer.shape}, expected ({len(coords)},): one per column")
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "layer", layer.astype(np.int64))

    # ------------------------------------------------------------------ basics
    @property
    def n(self) -> int:
        """Number of columns N."""
        return self.coords.shape[0]

    @property
    def num_layers(self) -> int:
        return int(self.layer.max()) + 1

    def layer_indices(self, i: int) -> np.ndarray:
        """Column indices of layer ``i`` (negative counts from the top)."""
        i = i % self.num_layers
        return np.flatnonzero(self.layer == i)

    def pair_distances(
        self, i: np.ndarray | torch.Tensor, j: np.ndarray | torch.Tensor, along_sheet: bool = False
    ) -> np.ndarray:
        """Connection lengths between columns ``i[k]`` and ``j[k]`` (broadcasting index arrays).

        ``along_sheet=True``: the distance between the two positions, without the ``gap``.
        """
        i = np.asarray(i)
        j = np.asarray(j)
        a, b = self.coords[i], self.coords[j]
        if self.metric == GREAT_CIRCLE:
            cos = np.clip((a * b).sum(-1) / self.radius**2, -1.0, 1.0)
            d = self.radius * np.arccos(cos)
        else:
            d = np.sqrt(((a - b) ** 2).sum(-1))
        if self.gap and not along_sheet:
            d = np.sqrt(d**2 + self.gap**2)
        return d

    def distances(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All pairwise connection lengths (gap included), (N, N). Only for sheets small enough for dense attention."""
        if self.n > 32768:
            raise GeometryError(
                f"refusing to form a {self.n}x{self.n} distance matrix; use Connectivity.local(...) "
                "and pair_distances() for wide sheets"
            )
        c = torch.from_numpy(self.coords)
        if self.metric == GREAT_CIRCLE:
            cos = (c @ c.T / self.radius**2).clamp(-1.0, 1.0)
            d = self.radius * torch.arccos(cos)
        else:
            d = torch.cdist(c, c)
        d.fill_diagonal_(0.0)
        if self.gap:
            d = torch.sqrt(d**2 + self.gap**2)
        return d.to(dtype)

    def mean_distance_power(self, p: float = 1.0) -> float:
        """The wiring-cost normaliser ``mean(D**p)`` over all N*N ordered pairs (diagonal included).

        Exact for N <= 4096; for larger sheets a seeded sample of 10^6 pairs (seed 0), so the
        value is a fixed property of the geometry and dense and sparse runs share it.
        """
        key = float(p)
        if key not in self._norm_cache:
            if self.n <= _EXACT_NORM_MAX_N:
                value = float((self.distances(torch.float64) ** p).mean())
            else:
                rng = np.random.default_rng(0)
                i = rng.integers(0, self.n, _NORM_SAMPLE_PAIRS)
                j = rng.integers(0, self.n, _NORM_SAMPLE_PAIRS)
                value = float((self.pair_distances(i, j) ** p).mean())
            if value <= 0:
                raise GeometryError("all columns coincide (mean distance is 0): the wiring cost is undefined")
            self._norm_cache[key] = value
        return self._norm_cache[key]

    def to_dict(self) -> dict:
        out = {"name": self.name, "metric": self.metric, "n": self.n, "layer_shapes": self.layer_shapes}
        if self.gap:
            out["gap"] = self.gap
        return out


# ---------------------------------------------------------------------- builders
def nearest_neighbour_spacing(
    coords: np.ndarray, layer: np.ndarray | None = None, sample: int | None = None
) -> float:
    """Median distance from a column to its nearest other column (euclidean on ``coords`` (N, dim)), the
    neighbour sought within the column's own layer when ``layer`` (N,) is given; 1.0 when no column has a
    neighbour or all coincide. ``sample``: measure it from at most this many seeded columns per layer."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    groups = [np.arange(len(coords))] if layer is None else [np.flatnonzero(layer == g) for g in np.unique(layer)]
    dists = []
    for idx in groups:
        if len(idx) < 2:
            continue
        pts = coords[idx]
        query = pts
        if sample is not None and len(pts) > sample:
            query = pts[np.random.default_rng(0).choice(len(pts), sample, replace=False)]
        dists.append(cKDTree(pts).query(query, k=2)[0][:, 1])
    s = float(np.median(np.concatenate(dists))) if dists else 0.0
    return s if s > 0 else 1.0


def _grid_coords(h: int, w: int) -> np.ndarray:
    if h < 1 or w < 1:
        raise GeometryError(f"grid size must be at least 1x1, got {h}x{w}")
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1)  # (h*w, 2), row-major


def grid(h: int, w: int | None = None) -> Geometry:
    """A flat ``h x w`` sheet with unit spacing; columns in row-major order."""
    w = h if w is None else w
    return Geometry(_grid_coords(h, w), layer_shapes=((h, w),), name=f"grid({h}x{w})")


def stacked(layers: Sequence[tuple[int, int] | int], spacing: float = 1.0, span: bool = False) -> Geometry:
    """A stack of grids (e.g. ``[(16, 16), (8, 8), (4, 4)]``), each centred, layer i at height i*spacing.

    ``span=True`` stretches every layer to the extent of the widest one (a retinotopic map: an 8 x 8
    input layer under a 64 x 64 sheet has spacing 9, each input column below the sheet area it
    covers); by default layers keep unit spacing. Columns are ordered layer by layer (bottom first),
    row-major inside a layer.
    """
    if len(layers) < 1:
        raise GeometryError("stacked() needs at least one layer, e.g. stacked([(8, 8), (8, 8)])")
    if spacing <= 0:
        raise GeometryError(f"layer spacing must be > 0, got {spacing}")
    shapes = tuple((s, s) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in layers)
    extent = np.array([max(h for h, _ in shapes) - 1, max(w for _, w in shapes) - 1], dtype=np.float64)
    coords, labels = [], []
    for i, (h, w) in enumerate(shapes):
        xy = _grid_coords(h, w)
        xy -= xy.mean(axis=0, keepdims=True)  # centre every layer over the same point
        if span:
            xy *= extent / np.maximum(np.array([h - 1, w - 1], dtype=np.float64), 1.0)
        z = np.full((len(xy), 1), i * spacing)
        coords.append(np.concatenate([xy, z], axis=1))
        labels.append(np.full(len(xy), i))
    desc = ",".join(f"{h}x{w}" for h, w in shapes) + (", span" if span else "")
    return Geometry(
        np.concatenate(coords), layer=np.concatenate(labels), layer_shapes=shapes, name=f"stacked({desc})"
    )


def sphere(n: int, radius: float | None = None) -> Geometry:
    """``n`` nearly uniform points (Fibonacci lattice) on a sphere, great-circle distances.

    The default radius ``sqrt(n / 4pi)`` gives each column about unit area, so neighbour
    spacing is ~1 as on a grid and one ``sigma`` means the same on every geometry.
    """
    if n < 1:
        raise GeometryError(f"sphere needs n >= 1 points, got {n}")
    radius = math.sqrt(n / (4 * math.pi)) if radius is None else float(radius)
    if radius <= 0:
        raise GeometryError(f"sphere radius must be > 0, got {radius}")
    k = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = math.pi * (3.0 - math.sqrt(5.0)) * k
    rho = np.sqrt(1.0 - z**2)
    unit = np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)
    return Geometry(unit * radius, metric=GREAT_CIRCLE, name=f"sphere({n})", radius=radius)


def from_coords(coords: np.ndarray | Sequence[Sequence[float]], layer: np.ndarray | None = None) -> Geometry:
    """User coordinates of any dimension (N, D); Euclidean distances."""
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    return Geometry(arr, layer=layer, name=f"coords({arr.shape[0]}x{arr.shape[1]})")


def multilayer(layers: Sequence[tuple[int, int] | int], depth_offset: float = 2.0) -> Geometry:
    """The predecessor's layout (clane9/columnformers ``multilayer_geometry``), reproduced exactly.

    Layer i is an ``h x w`` grid spanning ``[-h/2, h/2] x [-w/2, w/2]`` (``linspace``: spacing
    ``h / (h - 1)``, i.e. 8/7 for an 8-wide layer), at height ``i * depth_offset``. A single layer
    is the feed-forward reading: every connection, a column's to itself included, gets
    ``gap = depth_offset`` in quadrature (self-distance ``depth_offset``). Compare :func:`stacked`
    (unit spacing, no gap), the library's choice for new presets.
    """
    if len(layers) < 1:
        raise GeometryError("multilayer() needs at least one layer, e.g. multilayer([(8, 8)])")
    if not (depth_offset > 0 and math.isfinite(depth_offset)):
        raise GeometryError(f"depth_offset must be > 0, got {depth_offset}")
    shapes = tuple((s, s) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in layers)
    coords, labels = [], []
    for i, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise GeometryError(f"layer size must be at least 1x1, got {h}x{w}")
        ys, xs = np.meshgrid(np.linspace(-h / 2, h / 2, h), np.linspace(-w / 2, w / 2, w), indexing="ij")
        z = np.full(h * w, i * depth_offset)
        coords.append(np.stack([ys.ravel(), xs.ravel(), z], axis=1))  # row-major within the layer
        labels.append(np.full(h * w, i))
    desc = ",".join(f"{h}x{w}" for h, w in shapes)
    return Geometry(
        np.concatenate(coords), layer=np.concatenate(labels), layer_shapes=shapes,
        name=f"multilayer({desc})", gap=depth_offset if len(shapes) == 1 else 0.0,
    )
