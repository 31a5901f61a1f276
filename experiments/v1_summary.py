"""The v1 measurement (issue 14): MIM on natural-image patches, then orientation maps, trained vs initialisation.

    python experiments/v1_summary.py runs/sweeps/v1-wiring/v1-s* [runs/sweeps/v1-nowiring/v1-s*]

For each run: the held-out MIM loss (summary.json ``test_loss``: squared error on the masked patches, targets
normalised per patch) against a mean-patch predictor (the mean normalised training patch at every position,
scored on the same test images over all patches; with per-patch normalisation it is ~1); then ``columnformer
orientation`` on the trained sheet and at initialisation (cached in RUN/brain/orientation*/) — OSI median and
quartiles, pinwheels, map wavelength Λ, pinwheel density per Λ² with its bootstrap interval and the
phase-randomised null — and the tuning smoothness from ``analyze`` is not used here (no classes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def mean_patch_loss(run: Path) -> float:
    from columnformer.run import read_run_config
    from columnformer.tasks import build_task

    cfg = read_run_config(run)
    task = build_task(cfg.task, cfg.model)
    sets = task.datasets(cfg.data, cfg.model, seed=cfg.train.seed)
    train_imgs = sets["train"].images if hasattr(sets["train"], "images") else torch.stack([x for x, _ in sets["train"]])
    test_imgs = sets["test"].images if hasattr(sets["test"], "images") else torch.stack([x for x, _ in sets["test"]])
    mean = task.targets(train_imgs).mean(0, keepdim=True)  # (1, L, P)
    return float((task.targets(test_imgs) - mean).pow(2).mean())


def orientation(run: Path, at_init: bool) -> dict:
    from columnformer.analysis.orientation import analyze_orientation

    path = run / "brain" / ("orientation-init" if at_init else "orientation") / "orientation.json"
    if path.is_file():
        return json.loads(path.read_text())
    return analyze_orientation(run, at_init=at_init)


def main() -> None:
    runs = [Path(p) for p in sys.argv[1:] if (Path(p) / "summary.json").is_file()]
    print("| run | test MIM loss | mean-patch predictor | ratio | weights | OSI median (IQR) | pinwheels | Λ (columns) | "
          "density per Λ² (bootstrap 95%) | phase-randomised null (95%) |")
    print("|---|---:|---:|---:|---|---|---:|---:|---|---|")
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        base = mean_patch_loss(run)
        for at_init in (False, True):
            o = orientation(run, at_init)
            layer = o["layers"][0]
            ci, null = layer.get("density_ci95") or [np.nan] * 2, layer.get("null_density_ci95") or [np.nan] * 2
            head = (f"| {run.parent.name}/{run.name} | {s['test_loss']:.3f} | {base:.3f} | {s['test_loss'] / base:.2f} "
                    if not at_init else "| | | | ")
            print(head + f"| {o.get('weights', 'trained')} | {o['osi_median']:.3f} ({o['osi_quartiles'][0]:.3f}-{o['osi_quartiles'][1]:.3f}) | "
                  f"{layer['pinwheels']} | {layer['wavelength']:.2f} | {layer['density']:.2f} ({ci[0]:.2f}-{ci[1]:.2f}) | "
                  f"{layer['null_density_mean']:.2f} ({null[0]:.2f}-{null[1]:.2f}) |")


if __name__ == "__main__":
    main()
