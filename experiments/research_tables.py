"""Tables and figures of issue 13's measurements from finished runs (RESULTS.md, "Research questions").

    python experiments/research_tables.py penalties runs/sweeps/digits-penalties runs/sweeps/ablation-digits-converged
    python experiments/research_tables.py sparsity runs/sweeps/ablation-digits-converged runs/sweeps/digits-penalties \
        --out docs/images/sparsity_emergence.png
    python experiments/research_tables.py geometry runs/sweeps/digits-learned-geometry runs/sweeps/ablation-digits-converged \
        --out docs/images/learned_positions.png

``penalties``: per config (the unpenalised baseline is the converged ablation's ``recurrent`` row, the same recipe)
test accuracy of the final model, and on the test split (``columnformer analyze``, cached in each run's
analysis.json): response smoothness (tuning correlation near - far), weight similarity of neighbours (centred
cosine, near - far), the final step's Hoyer / lifetime sparseness / near-zero fraction; mean ± std over seeds.
``sparsity``: activation sparsity logged during training (metrics.jsonl), mean over seeds per logged step, for the
unpenalised sheet and the L1 runs. ``geometry``: learned vs fixed positions: accuracy, wiring length, how far
columns moved, minimum spacing, and a figure of one seed's layout.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

KEYS = {
    "test acc (%)": lambda s, a: 100 * s["test_acc"],
    "response smoothness": lambda s, a: a["headline"]["smoothness"],
    "weight similarity (near - far)": lambda s, a: a["headline"]["weight_smoothness"],
    "wiring length": lambda s, a: a["headline"]["wiring_length"],
    "Hoyer (final step)": lambda s, a: a["headline"]["hoyer_final"],
    "lifetime sparseness": lambda s, a: a["headline"]["lifetime_sparseness_final"],
    "near zero": lambda s, a: a["headline"]["near_zero_final"],
}


def runs_of(sweep: Path, config: str) -> list[Path]:
    return sorted(p for p in sweep.glob(f"{config}-s*") if (p / "summary.json").is_file())


def analysis(run: Path) -> dict:
    from columnformer.analysis.analyze import AnalysisOptions, current_analysis

    return current_analysis(run, AnalysisOptions(split="test"))


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def table(rows: list[tuple[str, list[Path]]], keys=KEYS) -> None:
    print("| config | seeds | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for name, runs in rows:
        vals = {k: [] for k in keys}
        for run in runs:
            s, a = json.loads((run / "summary.json").read_text()), analysis(run)
            for k, f in keys.items():
                vals[k].append(f(s, a))
        print(f"| {name} | {len(runs)} | " + " | ".join(fmt(vals[k]) for k in keys) + " |")


def penalties(args) -> None:
    sweep, baseline = args.sweeps[0], args.sweeps[1]
    configs = sorted({p.name.rsplit("-s", 1)[0] for p in sweep.iterdir() if (p / "summary.json").is_file()})
    table([("none (recurrent row)", runs_of(baseline, "recurrent"))] + [(c, runs_of(sweep, c)) for c in configs])


def sparsity(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"no penalty": runs_of(args.sweeps[0], "recurrent")}
    if len(args.sweeps) > 1:
        groups.update({f"L1 {w}": runs_of(args.sweeps[1], f"l1_{w}") for w in ("0.01", "0.1")})
    metrics = ("hoyer", "lifetime_sparseness", "population_sparseness", "near_zero")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for label, runs in groups.items():
        if not runs:
            continue
        curves = []
        for run in runs:
            recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in x]
            curves.append({m: [(r["step"], r[m]) for r in recs if m in r] for m in metrics})
        print(f"\n{label} ({len(runs)} seeds): mean over seeds at logged steps")
        print("| step | " + " | ".join(metrics) + " |\n|---:|" + "---:|" * len(metrics))
        steps = [s for s, _ in curves[0][metrics[0]]]
        for i, step in enumerate(steps):
            if i % max(1, len(steps) // 8) and i != len(steps) - 1 and i != 0:
                continue
            print(f"| {step} | " + " | ".join(f"{np.mean([c[m][i][1] for c in curves]):.3f}" for m in metrics) + " |")
        for ax, m in zip(axes, metrics):
            y = np.array([[v for _, v in c[m]] for c in curves])
            ax.plot(steps, y.mean(0), label=label)
            ax.fill_between(steps, y.min(0), y.max(0), alpha=0.2)
            ax.set_title(m.replace("_", " "), fontsize=9)
            ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    if args.out:
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"\nwrote {args.out}")


def geometry(args) -> None:
    learned, fixed = runs_of(args.sweeps[0], "learned"), runs_of(args.sweeps[1], "recurrent")
    keys = dict(KEYS)
    keys["mean shift (spacings)"] = lambda s, a: (a["trained"].get("positions") or {}).get("mean_shift")
    keys["max shift"] = lambda s, a: (a["trained"].get("positions") or {}).get("max_shift")
    keys["min spacing"] = lambda s, a: (a["trained"].get("positions") or {}).get("min_spacing")
    spread = runs_of(args.sweeps[0], "learned_fixed_spread")
    table([("fixed (recurrent row)", fixed), ("learned", learned), ("learned, fixed spread", spread)], keys)
    if args.out and learned:
        import shutil

        for runs, suffix in ((learned, ""), (spread, "_fixed_spread")):
            if runs:
                src = runs[0] / "figures" / "analysis" / "learned_positions.png"
                dst = args.out.with_name(args.out.stem + suffix + args.out.suffix)
                shutil.copyfile(src, dst)
                print(f"wrote {dst} (copied from {src})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("penalties", "sparsity", "geometry"))
    ap.add_argument("sweeps", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    {"penalties": penalties, "sparsity": sparsity, "geometry": geometry}[args.what](args)


if __name__ == "__main__":
    main()
