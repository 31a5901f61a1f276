"""The model section of a run config: where the columns sit, how they connect, the sheet, the image classifier
around it (``ModelConfig``). Below ``config`` (the whole run) and ``factory`` (which builds models from it), so
neither the tasks nor the factory import the run config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .connectivity import Connectivity
from .geometry import grid, multilayer, sphere, stacked
from .sheet import SheetConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GeometryConfig(_Strict):
    """Where the columns sit. ``grid``: shape [h, w]; ``stacked``: layers [[h, w], ...]; ``sphere``: n;
    ``multilayer``: layers as for stacked, laid out as the predecessor did (see ``geometry.multilayer``)."""

    kind: Literal["grid", "stacked", "sphere", "multilayer"] = "grid"
    shape: tuple[int, int] = (4, 4)
    layers: list[tuple[int, int]] = Field(default_factory=lambda: [(4, 4), (4, 4)])
    spacing: float = Field(
        1.0, gt=0, description="distance between stacked layers (multilayer: the predecessor's depth_offset)"
    )
    n: int = Field(64, ge=1)
    span: bool = Field(
        False, description="stacked only: stretch every layer over the widest one's extent (a retinotopic input map)"
    )

    @model_validator(mode="after")
    def _span_only_stacked(self) -> "GeometryConfig":
        if self.span and self.kind != "stacked":
            raise ValueError(f"geometry.span=true applies to kind=stacked only (got kind={self.kind}); remove span")
        return self

    @property
    def num_columns(self) -> int:
        if self.kind == "grid":
            return self.shape[0] * self.shape[1]
        if self.kind in ("stacked", "multilayer"):
            return sum(h * w for h, w in self.layers)
        return self.n

    def build(self):
        if self.kind == "grid":
            return grid(*self.shape)
        if self.kind == "stacked":
            return stacked(self.layers, self.spacing, span=self.span)
        if self.kind == "multilayer":
            return multilayer(self.layers, self.spacing)
        return sphere(self.n)


class ConnectivityConfig(_Strict):
    """Which columns each column reads: all pairs, k nearest, or k nearest + sampled long-range edges."""

    kind: Literal["dense", "local", "local_long_range"] = "dense"
    k: int = Field(64, ge=1, description="edges per column (local ones for local_long_range)")
    k_long: int = Field(0, ge=0, description="long-range edges per column")
    long_range_scale: float = Field(8.0, gt=0, description="length scale of the exponential distance rule")
    seed: int = 0

    def build(self, geometry):
        if self.kind == "dense":
            return Connectivity.dense(geometry)
        if self.kind == "local":
            return Connectivity.local(geometry, self.k)
        return Connectivity.local_plus_long_range(
            geometry, self.k, self.k_long, scale=self.long_range_scale, seed=self.seed
        )


class ModelConfig(_Strict):
    """An image classifier built around a sheet (see ``vision.py``)."""

    image_size: tuple[int, int] = (8, 8)
    in_chans: int = Field(1, ge=1)
    patch: int = Field(2, ge=1)
    stride: int | None = Field(None, ge=1, description="patch stride; None = patch (no overlap)")
    num_classes: int = Field(10, ge=1)
    pool: Literal["avg", "spatial"] = "avg"
    head_norm: Literal["pooled", "tokens"] = Field(
        "pooled", description="classifier LayerNorm after pooling (pooled) or on every output column before it "
        "(tokens: the predecessor's order)",
    )
    input_area: Literal["bottom", "all", "retinotopic"] = Field(
        "bottom", description="where patch tokens enter: the bottom layer (one column per patch), all columns, or "
        "retinotopic (every column of a grid sheet, or of the bottom layer of a stacked one, receives the token of "
        "the image patch its position maps to)",
    )
    output_area: Literal["top", "all", "bottom"] = Field("top", description="columns the task head reads (MIM: the read-out area)")
    geometry: GeometryConfig = Field(default_factory=GeometryConfig)
    connectivity: ConnectivityConfig = Field(default_factory=ConnectivityConfig)
    sheet: SheetConfig = Field(default_factory=SheetConfig)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches per image along (height, width)."""
        stride = self.stride or self.patch
        return tuple((s - self.patch) // stride + 1 for s in self.image_size)

    @model_validator(mode="after")
    def _check_retinotopic(self) -> "ModelConfig":
        if self.input_area == "retinotopic":
            if self.geometry.kind == "sphere":
                raise ValueError(
                    "input_area=retinotopic maps image patches onto a grid: set geometry.kind to grid, stacked or "
                    "multilayer (got sphere)"
                )
            (h, w), (gh, gw) = self.retinotopic_shape, self.patch_grid
            if h < gh or w < gw:
                raise ValueError(
                    f"input_area=retinotopic needs at least one column per patch: the {h}x{w} sheet is smaller than "
                    f"the {gh}x{gw} patch grid; enlarge geometry.shape or the patch size"
                )
        return self

    @property
    def retinotopic_shape(self) -> tuple[int, int]:
        """The (h, w) grid that input_area=retinotopic writes into: the grid, or a stacked sheet's bottom layer."""
        return tuple(self.geometry.shape if self.geometry.kind == "grid" else self.geometry.layers[0])

    def retinotopic_tokens(self):
        """For input_area=retinotopic: the patch token of every column of the (h, w) input grid, row-major (numpy)."""
        import numpy as np

        (h, w), (gh, gw) = self.retinotopic_shape, self.patch_grid
        ty = np.arange(h) * gh // h  # (h,) patch row under each sheet row
        tx = np.arange(w) * gw // w
        return (ty[:, None] * gw + tx[None, :]).reshape(-1)
