"""``task: classify`` — supervised image classification (cross-entropy, accuracy)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from ..factory import build_model
from .base import Task, TaskConfig


class ClassifyConfig(TaskConfig):
    """Image classification from the pooled output area (``model.pool``, ``model.num_classes``)."""

    name: Literal["classify"] = "classify"
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the training cross-entropy")
    baseline: bool = Field(True, description="fit logistic regression on the training pixels as a reference "
                                             "(summary.json baseline.logreg_test_acc); false skips it")


class ClassifyTask(Task):
    """Batches ``(images, labels)``; outputs logits (B, num_classes); loss cross-entropy; metric acc."""

    name = "classify"
    sum_keys = ("correct",)
    select = ("acc", "max")

    def build_model(self):
        return build_model(self.model_cfg)

    def loss(self, outputs, batch, reduction="mean", train=True):
        smoothing = self.cfg.label_smoothing if train else 0.0
        return F.cross_entropy(outputs.float(), batch[1], reduction=reduction, label_smoothing=smoothing)

    def metric_sums(self, outputs, batch):
        return {"correct": (outputs.argmax(-1) == batch[1]).sum().item()}

    def metrics(self, sums, n):
        return {"acc": sums["correct"] / n}

    def data_warnings(self, sets):
        """One class in the training split: every prediction is that class, accuracy trivially 100 %."""
        present = sorted({int(c) for c in sets["train"].labels.unique()})
        if len(present) >= 2:
            return []
        names = getattr(sets["train"], "classes", None) or []
        which = ", ".join(repr(names[c]) if c < len(names) else str(c) for c in present) or "none"
        return [
            f"the training split holds a single class ({which}): a classifier learns nothing and its accuracy "
            "is trivially 100 %; check data.path (one sub-folder per class) or data.label_column"
        ]

    def baseline(self, sets):
        """Multinomial logistic regression on flattened pixels (small in-memory sets only)."""
        if not self.cfg.baseline or not all(hasattr(sets[s], "images") for s in ("train", "test")):
            return None
        if len(sets["train"].labels.unique()) < 2:
            return None
        clf = pixel_logistic_regression(sets["train"])
        return {"logreg_test_acc": float(clf.score(sets["test"].images.flatten(1).numpy(), sets["test"].labels.numpy()))}


def pixel_logistic_regression(train_ds):
    """The reference classifier: multinomial logistic regression (C=1) on an in-memory set's flattened pixels."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=5000, C=1.0).fit(train_ds.images.flatten(1).numpy(), train_ds.labels.numpy())
