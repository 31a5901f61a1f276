"""Typed configuration: model, data, optimisation and run settings, with readable errors.

A run is described by one :class:`RunConfig`. It is built from (in order) a named preset,
a YAML file and ``key=value`` command-line overrides with dotted keys::

    columnformer train --config configs/digits.yaml train.epochs=5 model.sheet.steps=6

Every key is validated before any work starts; an unknown key, a wrong type or an impossible
combination raises :class:`ConfigError` with one message naming the key and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .errors import ConfigError  # noqa: F401  (re-exported: columnformer.config.ConfigError)
from .presets import get_preset
from .data.config import DataConfig
from .model_config import ConnectivityConfig, GeometryConfig, ModelConfig, _Strict
from .tasks import ArithmeticConfig, ClassifyConfig, MimConfig

_TASK_CLASSES = {
    "classify": ClassifyConfig, "mim": MimConfig,
    "addition": ArithmeticConfig, "multiplication": ArithmeticConfig, "switch": ArithmeticConfig,
}
TaskSection = Annotated[Union[ClassifyConfig, MimConfig, ArithmeticConfig], Field(discriminator="name")]

CONFIG_SCHEMA_VERSION = 1


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay to ``min_lr_frac * lr``."""

    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    min_lr_frac: float = Field(0.05, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    accum_steps: int = Field(1, ge=1, description="gradient accumulation steps per optimizer step")
    position_lr: float | None = Field(
        None, gt=0, description="learning rate of learned column positions (model.sheet.learn_positions; None: lr)"
    )
    state_dtype: Literal["fp32", "bf16", "8bit"] = Field(
        "fp32", description="dtype of AdamW's two moments (optim.AdamW, float32 math): bf16 halves the optimizer state "
        "(stochastic rounding when stored), 8bit quarters it (block-wise: e4m3 first moment, the second moment's root in "
        "a logarithmic code)"
    )


class RewireConfig(_Strict):
    """Train, prune, grow: every ``every`` optimizer steps replace the weakest edges of a sparse sheet."""

    every: int | None = Field(None, ge=1, description="optimizer steps between rewirings; None: never")
    fraction: float = Field(0.1, gt=0, le=1, description="share of each column's edges replaced")
    batches: int = Field(4, ge=1, description="training batches used to measure mean attention per edge")


class PenaltyConfig(_Strict):
    """One regulariser: its weight and when it is on (fractions of the run's optimizer steps)."""

    weight: float = Field(0.0, ge=0, description="weight in the loss; 0: off")
    start: float = Field(0.0, ge=0, le=1, description="fraction of training before the penalty turns on")
    ramp: float = Field(0.0, ge=0, le=1, description="fraction of training over which its weight rises linearly to `weight`")


class PenaltiesConfig(_Strict):
    """Regularisers of the sheet's activity and weights (see regularizers.py); all off by default."""

    activity_l1: PenaltyConfig = Field(default_factory=PenaltyConfig, description="L1 on the column states")
    response_smoothness: PenaltyConfig = Field(
        default_factory=PenaltyConfig, description="TDANN-style spatial correlation loss on the column responses"
    )
    weight_smoothness: PenaltyConfig = Field(
        default_factory=PenaltyConfig, description="TopoLoss-style smoothness of the untied weights on the sheet"
    )
    radius: float | None = Field(
        None, gt=0, description="response_smoothness: pairs of columns within this distance (None: 3x the spacing)"
    )
    max_pairs: int = Field(4096, ge=3, description="response_smoothness: at most this many pairs (a fixed random subset)")
    neighbours: int = Field(8, ge=1, description="weight_smoothness: nearest columns averaged into the smoothed weights")


class TrainConfig(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    seed: int = 0
    wiring_lambda: float = Field(0.0, ge=0, description="weight of the wiring cost in the loss")
    log_every: int = Field(10, ge=1, description="optimizer steps between metrics lines")
    ckpt_every: int = Field(50, ge=1, description="optimizer steps between 'last' checkpoints (also each epoch)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    compile: bool = False
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch default)")
    keep_host_memory: bool = Field(
        False, description="keep freed host memory for reuse (glibc: large tensors are not mmap'd and zeroed anew each "
        "step): 1.6-2.2x faster steps of sheets of 65,536+ columns on CPU for 30-60 % more peak RSS; changes no result",
    )
    cache_host_memory: bool = Field(
        False, description="reuse freed large host tensors whole (a caching allocator from the C++ kernels): no page "
        "faults after the first step, at about the peak RSS of the default; 1.7x faster steps of the 65,536-column "
        "benchmark sheet with checkpointing on CPU; changes no result",
    )
    chunked_backward: int | None = Field(
        None, ge=256, description="columns per chunk of the chunked backward (columnformer.chunked_backward): the "
        "sheet's steps keep no graph, backward through time and the per-column weights' gradients run chunk by chunk "
        "and each chunk's weights are stepped at once, so no gradient or activation of the whole sheet is stored "
        "(34.5 KiB per column of the benchmark sheet at 262,144 columns with optim.state_dtype=8bit, against 49-50 "
        "without); same gradients and update up to float rounding, 2.5-4x the step time of checkpointing. Needs "
        "optim.grad_clip=null, optim.accum_steps=1, train.precision=fp32, train.compile=false, one process, a sparse "
        "connectivity and untied blocks; activation sparsity is not logged",
    )
    progress: bool = True
    figures: bool = Field(True, description="write figures/ when a run ends (false: skip them, e.g. in large sweeps)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (debugging)")
    rewire: RewireConfig = Field(default_factory=RewireConfig)
    reconnect_every: int | None = Field(
        None, ge=1, description="learned positions on a sparse sheet: every this many optimizer steps rebuild each "
        "column's local edges from the moved positions (kept edges keep their bias, new ones start by distance)",
    )
    penalties: PenaltiesConfig = Field(default_factory=PenaltiesConfig)
    log_sparsity: bool = Field(
        True, description="log activation sparsity of the column states (near_zero, hoyer, population/lifetime sparseness)"
    )
    sparsity_tol: float = Field(0.1, gt=0, description="a unit is near zero when |x| < sparsity_tol * rms(|x|)")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: replicate (DDP) or shard parameters/gradients/optimizer state (FSDP2)"
    )
    tracking: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="extra trackers besides metrics.jsonl (pip install 'columnformer[tracking]')"
    )
    wandb_project: str = "columnformer"
    wandb_entity: str | None = None


class RunConfig(_Strict):
    """Everything that defines a run."""

    name: str = Field(
        "digits", pattern=r"^[^/\\.\x00][^/\\\x00]*$", max_length=200,
        description="run name: one folder inside out_dir (no '/' or '\\', not starting with '.')",
    )
    out_dir: str = "runs"
    preset: str | None = Field(None, description="named model preset the 'model' section starts from")
    init_from: str | None = Field(
        None, description="run directory whose final weights initialise this run (fine-tuning; a new optimiser)"
    )
    task: TaskSection = Field(default_factory=ClassifyConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.train.precision == "fp16" and self.train.device == "cpu":
            raise ValueError("train.precision=fp16 needs a GPU (gradient scaling); use bf16 on CPU")
        if self.task.name == "mim":
            from .tasks.mim import num_masked

            gh, gw = self.model.patch_grid
            num_masked(self.task.mask_fraction, gh * gw)
        conn, n = self.model.connectivity, self.model.geometry.num_columns
        if conn.kind != "dense" and conn.k + (conn.k_long if conn.kind == "local_long_range" else 0) > n:
            extra = f" + k_long={conn.k_long}" if conn.kind == "local_long_range" else ""
            raise ValueError(
                f"model.connectivity.k={conn.k}{extra} edges per column exceed the sheet's {n} columns; lower them "
                "(or use model.connectivity.kind=dense for all pairs)"
            )
        if self.train.rewire.every and self.model.connectivity.kind == "dense":
            raise ValueError(
                "train.rewire.every needs a sparse sheet: set model.connectivity.kind to 'local' or 'local_long_range'"
            )
        if self.optim.state_dtype != "fp32" and self.train.parallel == "fsdp":
            raise ValueError(
                f"optim.state_dtype={self.optim.state_dtype} is not supported with train.parallel=fsdp (sharded optimizer "
                "state); use train.parallel=ddp or optim.state_dtype=fp32"
            )
        if self.train.chunked_backward:
            clash = [f"{key}={value}" for key, value, ok in (
                ("optim.grad_clip", self.optim.grad_clip, self.optim.grad_clip is None),
                ("optim.accum_steps", self.optim.accum_steps, self.optim.accum_steps == 1),
                ("train.precision", self.train.precision, self.train.precision == "fp32"),
                ("model.connectivity.kind", conn.kind, conn.kind != "dense"),
                ("train.compile", self.train.compile, not self.train.compile),
            ) if not ok]
            if clash:
                raise ValueError(
                    f"train.chunked_backward={self.train.chunked_backward} cannot run with {', '.join(clash)}: it "
                    "needs optim.grad_clip=null (the whole gradient's norm is known only after every chunk has "
                    "stepped), optim.accum_steps=1, train.precision=fp32, train.compile=false and a sparse "
                    "connectivity; change those or drop train.chunked_backward"
                )
        if self.model.sheet.sparse_kernel != "auto" and conn.kind == "dense":
            raise ValueError(
                f"model.sheet.sparse_kernel={self.model.sheet.sparse_kernel} (the {self.model.sheet.sparse_kernel} "
                "backend of sparse attention) needs a sparse connectivity: set model.connectivity.kind to 'local' or "
                "'local_long_range', or leave sparse_kernel=auto for a dense sheet"
            )
        return self


# ------------------------------------------------------------------ what resume may change
# Every config key is classified (a key, or a whole section, by its dotted prefix; the longest match wins):
# "safe" keys may differ between a run's checkpoint and the config.yaml it is resumed with (where and how
# the run is shown or executed: logging, progress, figures, trackers, workers, threads, device, compile,
# the run's name and location); every other key changes what the run computes, and resume refuses it.
# Bitwise-identical continuation additionally needs the same device and threads.
RESUME_CLASSES: dict[str, str] = {
    "name": "safe", "out_dir": "safe", "preset": "alters", "init_from": "alters",
    "task": "alters", "model": "alters", "optim": "alters",
    "data": "alters", "data.num_workers": "safe",
    "train.epochs": "alters", "train.batch_size": "alters", "train.eval_batch_size": "alters", "train.seed": "alters",
    "train.wiring_lambda": "alters", "train.precision": "alters", "train.max_steps": "alters", "train.rewire": "alters",
    "train.parallel": "alters", "train.penalties": "alters", "train.reconnect_every": "alters",
    "train.log_sparsity": "safe", "train.sparsity_tol": "safe",  # what is logged, not what is trained
    "train.log_every": "safe", "train.ckpt_every": "safe", "train.device": "safe", "train.compile": "safe",
    "train.threads": "safe", "train.keep_host_memory": "safe", "train.cache_host_memory": "safe",
    "train.progress": "safe", "train.figures": "safe",
    "train.chunked_backward": "safe",  # the same gradients and update, up to float rounding (as threads)
    "train.tracking": "safe",
    "train.wandb_project": "safe", "train.wandb_entity": "safe",
}


def resume_class(key: str) -> str | None:
    """``"safe"`` / ``"alters"`` for a dotted config key (longest classified prefix), None if unclassified."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = RESUME_CLASSES.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


def _leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_leaves(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def run_altering_changes(saved: "RunConfig", current: "RunConfig") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of the keys that differ and change what the run computes."""
    a, b = _leaves(saved.model_dump(mode="json")), _leaves(current.model_dump(mode="json"))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and resume_class(k) != "safe")
    return [(k, a.get(k), b.get(k)) for k in keys]


# ------------------------------------------------------------------ loading
def _format_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if len(loc) > 1 and loc[0] == "task" and loc[1] in _TASK_CLASSES:  # drop the union's tag from the key
            loc = ("task", *loc[2:])
            e = {**e, "loc": loc, "task": loc and e["loc"][1]}
        key = ".".join(str(p) for p in loc if p != "__root__")
        key = f"{prefix}{key}" if key else prefix.rstrip(".") or "(config)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'{_allowed_hint(e['loc'], e.get('task'))}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e.get('input')!r})" if loc and not isinstance(e.get("input"), dict) else ""
            lines.append(f"config key '{key}': {msg}{got}" if loc else msg)
    return "; ".join(lines)


def _allowed_hint(loc: tuple, task: str | None = None) -> str:
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = _TASK_CLASSES[task] if (part == "task" and task) else field.annotation
    fields = getattr(model, "model_fields", None)
    return f"; allowed keys here: {', '.join(fields)}" if fields else ""


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a', 'b', 'c'], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; use dotted keys like model.sheet.width=64")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r} ({exc})") from None
    return key.split("."), value


def build_config(raw: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Merge preset <- raw dict <- overrides, validate, and return a :class:`RunConfig`."""
    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError("a config file must hold a mapping of sections (model, data, optim, train)")
    _normalise_task(raw)
    set_by: dict[str, str] = {}  # dotted key -> the override that set it (to blame the right source)
    for item in overrides:
        path, value = parse_override(item)
        if path == ["task"] and isinstance(value, str) and isinstance(raw.get("task"), dict):
            raw["task"]["name"] = value  # `task=mim` keeps task options given before it
            continue
        _normalise_task(raw)
        node = raw
        for depth, p in enumerate(path[:-1], start=1):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                prefix = ".".join(path[:depth])
                source = (f"the override {set_by[prefix]!r}" if prefix in set_by
                          else "the config file (or its preset)")
                raise ConfigError(
                    f"{source} sets {prefix!r} to {node!r}, a value, so {item!r} cannot set a key inside it "
                    f"({prefix!r} is not a section there); if {prefix!r} should hold settings, make it a mapping "
                    "of keys to values"
                )
        node[path[-1]] = value
        set_by[".".join(path)] = item
    _normalise_task(raw)
    preset = raw.get("preset")
    if preset is not None:
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"config key 'model' must be a section of model settings, got {model!r}")
        raw["model"] = deep_merge(get_preset(preset), model)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _normalise_task(raw: dict) -> None:
    """``task: mim`` -> ``task: {name: mim}``; the former ``train.label_smoothing`` -> ``task.label_smoothing``."""
    task = raw.get("task")
    if isinstance(task, str):
        raw["task"] = {"name": task}
    elif isinstance(task, dict):
        task.setdefault("name", "classify")
    elif task is not None and not isinstance(task, dict):
        raise ConfigError(f"config key 'task' must be a task name ({', '.join(_TASK_CLASSES)}) or a section, got {task!r}")
    train = raw.get("train")
    if isinstance(train, dict) and "label_smoothing" in train:
        smoothing = train.pop("label_smoothing")
        task = raw.setdefault("task", {"name": "classify"})
        if task.get("name", "classify") != "classify" and smoothing:
            raise ConfigError("train.label_smoothing belongs to classification; it cannot be set for task "
                              f"{task.get('name')!r}")
        if task.get("name", "classify") == "classify":
            task.setdefault("name", "classify")
            task.setdefault("label_smoothing", smoothing)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config file (or none) and apply overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    return build_config(raw, overrides)


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")
