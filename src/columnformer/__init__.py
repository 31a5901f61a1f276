"""Columnformer: brain-inspired transformers — a recurrent sheet of untied columns in a geometry."""

from .attention import ColumnAttention, dense_attention
from .connectivity import Connectivity
from .factory import build_model, count_parameters
from .geometry import Geometry, from_coords, grid, sphere, stacked
from .layers import UntiedLayerNorm, UntiedLinear
from .presets import PRESETS
from .run import load_run
from .sheet import ColumnBlock, Columnformer, SheetConfig, Trace
from .tasks import build_task

__version__ = "0.1.0"

__all__ = [
    "ColumnAttention", "ColumnBlock", "Columnformer", "Connectivity", "Geometry", "PRESETS", "SheetConfig",
    "Trace", "UntiedLayerNorm", "UntiedLinear", "build_model", "build_task", "count_parameters", "dense_attention",
    "from_coords", "grid", "load_run", "sphere", "stacked",
]
