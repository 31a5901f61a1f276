"""Objectives as objects: each task owns its batches, head, loss, metrics and evaluation.

    classify   supervised image classification (tasks/classify.py)
    mim        masked image modeling: reconstruct hidden patches (tasks/mim.py)
    addition, multiplication, switch
               algorithmic probes on digit strings, with length generalisation (tasks/arithmetic.py)

``build_task(task_cfg, model_cfg)`` makes the task of a config's ``task`` section;
:func:`evaluate` scores a model on a loader for any task.
"""

from __future__ import annotations

from .arithmetic import ArithmeticConfig, ArithmeticTask
from .base import Task, TaskConfig, evaluate
from .classify import ClassifyConfig, ClassifyTask
from .mim import MimConfig, MimTask

TASKS: dict[str, type[Task]] = {
    "classify": ClassifyTask, "mim": MimTask,
    "addition": ArithmeticTask, "multiplication": ArithmeticTask, "switch": ArithmeticTask,
}
TASK_CONFIGS = (ClassifyConfig, MimConfig, ArithmeticConfig)


def build_task(task_cfg: TaskConfig, model_cfg) -> Task:
    """The :class:`Task` for a task config (``task.name`` picks the class)."""
    return TASKS[task_cfg.name](task_cfg, model_cfg)


__all__ = ["TASKS", "TASK_CONFIGS", "ArithmeticConfig", "ArithmeticTask", "ClassifyConfig", "ClassifyTask", "MimConfig", "MimTask", "Task", "TaskConfig",
           "build_task", "evaluate"]
