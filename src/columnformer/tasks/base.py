"""What a task is: the objective a model is trained for, separate from the loop that trains it.

A :class:`Task` owns everything that differs between objectives:

    datasets(data, model, seed) the splits {"train", "val", "test"}: labelled images by default (data.*),
                              generated examples for the algorithmic tasks
    dataset(ds, split, seed)  the batches: wraps one split, yields a tuple of tensors
    data_warnings(sets)       problems with the data that make a result meaningless (printed, not fatal)
    build_model()             the backbone (patch embedding + sheet) with the head this task needs
    forward(model, batch)     -> (outputs (B, ...), Trace)
    loss(outputs, batch, reduction, train)   "mean" over the batch, or "sum" over its samples
                              (the torchrun path divides sums by the *global* sample count: exact)
    metric_sums(outputs, batch)              additive statistics (e.g. correct predictions)
    metrics(sums, n)          the logged metrics made from those sums (e.g. acc = correct / n)
    select                    (metric, "max"|"min"): which validation metric picks checkpoints/best.pt

The :class:`~columnformer.train.Trainer` only calls these; :func:`evaluate` is the one evaluation
loop for every task (used by the trainer, ``columnformer eval`` and anything that scores a run).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..data import build_datasets
from ..factory import model_config
from ..runtime import autocast_context


class TaskConfig(BaseModel):
    """Options of one task; ``name`` selects the task (``task: classify | mim | addition | multiplication | switch``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Task:
    """Base class of the objectives; see the module docstring for the contract."""

    name: ClassVar[str]
    sum_keys: ClassVar[tuple[str, ...]] = ()
    select: ClassVar[tuple[str, str]] = ("loss", "min")

    def __init__(self, cfg: TaskConfig, model_cfg):
        self.cfg, self.model_cfg = cfg, model_config(model_cfg)

    # ---- data
    def datasets(self, data_cfg, model_cfg, seed: int = 0) -> dict:
        """The splits this task trains and evaluates on (default: the labelled images of ``data``)."""
        return build_datasets(data_cfg, model_cfg, seed=seed)

    def dataset(self, ds, split: str, seed: int = 0):
        """This task's view of a labelled image dataset (default: unchanged, (image, label) pairs)."""
        return ds

    def data_warnings(self, sets) -> list[str]:
        """Problems with the data that do not stop training but make its result meaningless (default: none)."""
        return []

    # ---- model
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: list[torch.Tensor], record=(), steps: int | None = None) -> tuple[torch.Tensor, Any]:
        """``steps``: run a recurrent sheet for this many steps (the maximum, with halting); None: as trained."""
        extra = {} if steps is None else {"steps": steps}  # models without a steps option still work
        return model(batch[0], record=record, **extra)

    # ---- objective and metrics
    def loss(self, outputs: torch.Tensor, batch: list[torch.Tensor], reduction: str = "mean", train: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def metric_sums(self, outputs: torch.Tensor, batch: list[torch.Tensor]) -> dict[str, float]:
        return {}

    def metrics(self, sums: dict[str, float], n: int) -> dict[str, float]:
        return {}

    # ---- analysis
    @property
    def analysis_classes(self) -> int:
        """Number of classes of :meth:`analysis_labels` (the topography's per-class responses)."""
        return self.model_cfg.num_classes

    def analysis_labels(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """The (B,) class of each sample for ``columnformer analyze`` (default: the labels, ``batch[1]``)."""
        return batch[1]

    def baseline(self, sets) -> dict | None:
        """A reference result on the same data written into summary.json (None: none)."""
        return None

    def figures(self, fig_dir, model: nn.Module, ds, device) -> None:
        """Task-specific figures of a finished run (default: none)."""
        return None

    def better(self, value: float, best: float | None) -> bool:
        """Whether a validation ``select`` metric beats the best so far."""
        if best is None:
            return True
        return value > best if self.select[1] == "max" else value < best


@torch.no_grad()
def evaluate(
    task: Task, model: nn.Module, loader, device, precision: str = "fp32", steps: int | None = None
) -> dict[str, float]:
    """The task's loss and metrics, wiring cost and attention entropy over a loader (means per sample).

    ``steps``: unroll a recurrent sheet for this many steps (an evaluation budget; with halting the
    maximum number of steps); None: as trained."""
    model.eval()
    totals = {"loss": 0.0, **{k: 0.0 for k in task.sum_keys}, "wiring_cost": 0.0, "attn_entropy": 0.0, "n": 0}
    for batch in loader:
        batch = [t.to(device) for t in batch]
        with autocast_context(precision, device):
            outputs, trace = task.forward(model, batch, steps=steps)
        b = len(batch[0])
        totals["loss"] += task.loss(outputs, batch, reduction="sum", train=False).item()
        for k, v in task.metric_sums(outputs, batch).items():
            totals[k] += v
        totals["wiring_cost"] += trace.wiring_cost.item() * b
        totals["attn_entropy"] += trace.attn_entropy.item() * b
        if trace.halt_steps is not None:  # halting sheets: mean steps run per column, and the ponder term
            totals["ponder_steps"] = totals.get("ponder_steps", 0.0) + trace.halt_steps.float().mean(1).sum().item()
            totals["ponder_cost"] = totals.get("ponder_cost", 0.0) + trace.ponder.item() * b
        if trace.mix_entropy is not None:  # weight banks: mixing entropy, the busiest expert's share
            totals["mix_entropy"] = totals.get("mix_entropy", 0.0) + torch.stack(trace.mix_entropy).mean().item() * b
            load_max = torch.stack([x.max() for x in trace.expert_load]).mean().item()
            totals["expert_load_max"] = totals.get("expert_load_max", 0.0) + load_max * b
        totals["n"] += b
    model.train()
    n = max(1, totals["n"])
    return {
        "loss": totals["loss"] / n,
        **task.metrics(totals, n),
        "wiring_cost": totals["wiring_cost"] / n,
        "attn_entropy": totals["attn_entropy"] / n,
        **{k: totals[k] / n for k in ("ponder_steps", "ponder_cost", "mix_entropy", "expert_load_max") if k in totals},
        "n": totals["n"],
    }
