"""2D drawing layout of any sheet geometry.

* single grids: the grid as-is (x = column index, y = row index, row 0 at the top);
* stacked layers: one panel per layer, panels side by side (``x`` offset by the widths before it);
* spheres (great-circle metric): equirectangular projection, x = longitude, y = latitude (degrees);
* user coordinates: the first two coordinates (a 1-D layout gets y = 0), one panel per layer label.

:func:`sheet_layout` returns per-column panel-local positions (for one-panel-per-layer figures),
global positions (for the single-canvas report explorer), the panel of each column and a marker
size that roughly tiles each panel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..geometry import GREAT_CIRCLE, nearest_neighbour_spacing


@dataclass
class Layout:
    local: np.ndarray  # (N, 2) position inside its panel, y pointing down
    xy: np.ndarray  # (N, 2) global position (panels side by side), y pointing down
    panel: np.ndarray  # (N,) panel index
    panel_names: list[str]
    panel_boxes: list[tuple[float, float, float, float]]  # (x0, y0, x1, y1) of each panel in global coords
    cell: float  # marker size (in layout units) that roughly tiles the panels
    projection: str  # "grid", "layers", "equirectangular", "coords"

    def to_dict(self) -> dict:
        return {"projection": self.projection, "panels": self.panel_names, "cell": self.cell}


def sheet_layout(geometry, gap: float = 1.5) -> Layout:
    n = geometry.n
    coords = geometry.coords
    if geometry.metric == GREAT_CIRCLE:
        unit = coords / np.linalg.norm(coords, axis=1, keepdims=True)
        lat = np.degrees(np.arcsin(np.clip(unit[:, 2], -1, 1)))
        lon = np.degrees(np.arctan2(unit[:, 1], unit[:, 0]))
        local = np.stack([lon, -lat], axis=1)  # y down: north at the top
        # marker ~ the area per column on a 360 x 180 map, stretched near the poles is acceptable
        cell = math.sqrt(360.0 * 180.0 / max(n, 1)) * 0.9
        box = (-180.0, -90.0, 180.0, 90.0)
        return Layout(local, local.copy(), np.zeros(n, int), [geometry.name], [box], cell, "equirectangular")

    layer = geometry.layer
    num_layers = int(layer.max()) + 1
    if coords.shape[1] == 1:
        local = np.concatenate([coords, np.zeros((n, 1))], axis=1)
    else:
        # grids are (row, col[, z]) -> x = col, y = row (downwards); user coords: first two dims
        local = coords[:, [1, 0]].copy() if geometry.layer_shapes is not None else coords[:, :2].copy()
    local = local.astype(np.float64)
    if geometry.layer_shapes is None and coords.shape[1] >= 2:
        local[:, 1] = -local[:, 1]  # user coords: y up -> y down
    cell = min(nearest_neighbour_spacing(local[layer == g], sample=4096) for g in range(num_layers) if (layer == g).any())
    xy = np.empty_like(local)
    boxes, names, x_off = [], [], 0.0
    shapes = geometry.layer_shapes or ()
    for g in range(num_layers):
        idx = np.flatnonzero(layer == g)
        if len(idx) == 0:
            boxes.append((x_off, 0.0, x_off, 0.0))
            names.append(f"layer {g} (empty)")
            continue
        p = local[idx]
        lo = p.min(0) - cell / 2
        hi = p.max(0) + cell / 2
        xy[idx, 0] = p[:, 0] - lo[0] + x_off
        xy[idx, 1] = p[:, 1] - lo[1]
        boxes.append((x_off, 0.0, x_off + hi[0] - lo[0], hi[1] - lo[1]))
        shape = f" {shapes[g][0]}x{shapes[g][1]}" if g < len(shapes) else ""
        names.append(f"layer {g}{shape}" if num_layers > 1 else geometry.name)
        x_off += hi[0] - lo[0] + gap * cell
    projection = "coords" if geometry.layer_shapes is None else ("layers" if num_layers > 1 else "grid")
    return Layout(local, xy, layer.copy(), names, boxes, float(cell), projection)
