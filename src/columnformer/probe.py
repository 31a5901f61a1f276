"""Linear probes: how linearly decodable are the labels from a run's frozen sheet features?

    columnformer probe RUN [--labels-fraction F] [--at-init]

Features: the sheet's output area after its T steps, averaged over the output columns: (B, C) per
image (``VisionColumnformer.features``), from un-augmented images, with the weights frozen. The probe
is a multinomial logistic regression (scikit-learn) on standardised features, trained on a
class-balanced fraction F of the training split (``data.labels_fraction``, seeded by
``data.labels_seed``); its inverse regularisation C is chosen by stratified cross-validation *within
that subset* (no other labels are used), then it is scored on the test split. ``--at-init`` probes the
same sheet at initialisation (same config and seed) instead of the trained weights: the reference a
pre-training objective has to beat. Writes ``probe-f<F>[-init].json`` into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

CS = tuple(float(c) for c in np.logspace(-3, 2, 6))


@torch.no_grad()
def pooled_features(model, dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features (M, C) averaged over the output area, labels (M,)) of a labelled dataset."""
    model.eval()
    feats, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out, _ = model.features(images)  # (B, n_out, C)
        feats.append(out.float().mean(1).numpy())  # (B, C)
        labels.append(y.numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(labels)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, seed: int = 0):
    """Standardise + logistic regression; C picked by stratified k-fold CV accuracy on the training set alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(5, np.bincount(y_train).min()))
    if folds < 2:
        raise ValueError("the labelled subset has fewer than 2 images of some class; raise --labels-fraction")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    make = lambda c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))  # noqa: E731
    scores = [cross_val_score(make(c), x_train, y_train, cv=cv).mean() for c in CS]
    best = CS[int(np.argmax(scores))]  # the smallest C among ties: the most regularised
    return make(best).fit(x_train, y_train), best


def probe_run(run_dir: str | Path, labels_fraction: float = 1.0, at_init: bool = False, checkpoint: str = "last") -> dict:
    """Fit and score the linear probe of a run; write and return the result."""
    from .analysis.analyze import init_model
    from .data import build_datasets
    from .run import load_run, read_run_config

    if not 0 < labels_fraction <= 1:
        raise ValueError(f"--labels-fraction must be in (0, 1], got {labels_fraction}")
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    model = init_model(cfg) if at_init else load_run(run_dir, checkpoint=checkpoint).model
    data_cfg = cfg.data.model_copy(update={"labels_fraction": labels_fraction, "labels_holdout": 0.0, "augment": False})
    sets = build_datasets(data_cfg, cfg.model, seed=cfg.train.seed)
    x_tr, y_tr = pooled_features(model, sets["train"])
    x_te, y_te = pooled_features(model, sets["test"])
    probe, c = fit_probe(x_tr, y_tr, seed=cfg.data.labels_seed)
    result = {
        "run": str(run_dir),
        "weights": "initialisation" if at_init else f"checkpoints/{checkpoint}.pt",
        "task": cfg.task.name,
        "labels_fraction": labels_fraction,
        "n_train": int(len(y_tr)),
        "n_test": int(len(y_te)),
        "feature_dim": int(x_tr.shape[1]),
        "C": c,
        "train_acc": float(probe.score(x_tr, y_tr)),
        "test_acc": float(probe.score(x_te, y_te)),
    }
    name = f"probe-f{labels_fraction:g}{'-init' if at_init else ''}.json"
    (run_dir / name).write_text(json.dumps(result, indent=2))
    result["written"] = str(run_dir / name)
    return result


def _cmd_probe(args) -> int:
    result = probe_run(args.run_dir, args.labels_fraction, args.at_init, args.checkpoint)
    print(json.dumps(result, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "probe", help="linear probe of a run's frozen sheet features",
        description="Fit a logistic-regression probe on a run's frozen, pooled output-area features (a class-balanced "
        "fraction of the training labels; C by cross-validation within it) and score it on the test split. "
        "Writes probe-f<F>[-init].json into the run directory.",
    )
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--labels-fraction", type=float, default=1.0, help="class-balanced share of training labels (default 1)")
    p.add_argument("--at-init", action="store_true", help="probe the same sheet at initialisation (same config and seed)")
    p.add_argument("--checkpoint", default="last", choices=("best", "last"), help="which weights (default: last)")
    p.set_defaults(func=_cmd_probe)
