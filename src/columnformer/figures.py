"""Figures written into every run directory: learning curves and attention weight vs distance."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .analysis.connectivity import attention_vs_distance, edge_distances, edge_mask, mean_attention  # noqa: E402
from .analysis.figures import attention_vs_distance as attention_vs_distance_figure  # noqa: E402


def learning_curves(metrics: list[dict], path: Path) -> None:
    steps = [m for m in metrics if m["type"] == "step"]
    epochs = [m for m in metrics if m["type"] == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([m["step"] for m in steps], [m["task_loss"] for m in steps], label="train task loss")
    axes[0].plot([m["step"] for m in epochs], [m["val_loss"] for m in epochs], "o-", label="val loss")
    axes[0].set_yscale("log")
    if steps and "acc" in steps[0]:
        axes[1].plot([m["step"] for m in steps], [m["acc"] for m in steps], label="train acc")
        axes[1].plot([m["step"] for m in epochs], [m["val_acc"] for m in epochs], "o-", label="val acc")
    else:  # tasks without accuracy (e.g. masked image modeling): the loss on a linear scale
        axes[1].plot([m["step"] for m in steps], [m["task_loss"] for m in steps], label="train task loss")
        axes[1].plot([m["step"] for m in epochs], [m["val_loss"] for m in epochs], "o-", label="val loss")
    axes[2].plot([m["step"] for m in steps], [m["wiring_cost"] for m in steps], label="wiring cost")
    axes[2].plot([m["step"] for m in steps], [m["attn_entropy"] for m in steps], label="attention entropy")
    for ax, title in zip(axes, ["loss", "accuracy", "attention"]):
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_figures(run_dir: Path, model, loader, device="cpu", max_batches: int = 8) -> dict:
    """Write figures/learning_curves.png and figures/attention_vs_distance.png; return the profile."""
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    learning_curves(metrics, fig_dir / "learning_curves.png")
    sheet = model.sheet
    mean_attn = mean_attention(model, loader, device, max_batches=max_batches)
    profile = attention_vs_distance(mean_attn, edge_distances(sheet), edge_mask(sheet))
    # the same plot `columnformer analyze` draws (without the initialisation overlay)
    attention_vs_distance_figure(
        {"connectivity": {"attention_vs_distance": profile}}, None, fig_dir / "attention_vs_distance.png", sheet.geometry.name
    )
    return profile
