"""Validation accuracy against training time for runs of the `wide` and `scale` presets (RESULTS.md, issue 17).

    python experiments/wide_curve.py runs/wide-rf3 runs/wide-s1 runs/wide-s2 --out docs/images/wide_accuracy_vs_time.png
    python experiments/wide_curve.py runs/scale --target 90 --out docs/images/scale_accuracy_vs_time.png

Reads each run's metrics.jsonl (the epoch records: cumulative training time, evaluation excluded, and
validation accuracy) and its summary.json (test accuracy of the final model, whole-command wall time), prints
a markdown table per run and the mean +- std of the test accuracy, and draws one curve per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml


def epochs(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("type") == "epoch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="figure path (.png); omitted: no figure")
    ap.add_argument("--target", type=float, default=95.0, help="accuracy line drawn on the figure (%%)")
    args = ap.parse_args()
    tests = []
    titles = set()
    curves = {}
    for run in args.runs:
        summary = json.loads((run / "summary.json").read_text())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        seed = cfg["train"]["seed"]
        h, w = cfg["model"]["geometry"]["shape"]
        titles.add(f"{cfg.get('preset') or run.name} preset ({h * w:,} columns) on digits")
        eps = epochs(run)
        curves[run.name] = [(e["train_time_s"], 100 * e["val_acc"]) for e in eps]
        tests.append(100 * summary["test_acc"])
        print(f"{run.name}: seed {seed}, test {100 * summary['test_acc']:.1f} %, training "
              f"{summary['train_time_s']:.0f} s, run wall {summary['wall_time_s']:.0f} s")
        print("| train time (s) | " + " | ".join(f"{t:.0f}" for t, _ in curves[run.name]) + " |")
        print("|---|" + "---|" * len(eps))
        print("| val acc (%) | " + " | ".join(f"{a:.1f}" for _, a in curves[run.name]) + " |")
    if len(tests) > 1:
        print(f"test accuracy: mean {statistics.mean(tests):.1f} +- {statistics.stdev(tests):.1f} % over {len(tests)} runs")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for name, pts in curves.items():
            ax.plot([t / 60 for t, _ in pts], [a for _, a in pts], "o-", markersize=3, label=name)
        ax.axhline(args.target, color="gray", linestyle=":", label=f"{args.target:g} %")
        ax.set(xlabel="training time (min, 2 CPU cores)", ylabel="validation accuracy (%)", ylim=(0, 100),
               title="; ".join(sorted(titles)))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
