"""Tables of the converged ablation grid and its learning-rate check (RESULTS.md, research question 1).

    python experiments/ablation_tables.py runs/sweeps/ablation-digits-converged runs/sweeps/ablation-digits-converged-lr

MAIN is the sweep of ``configs/ablation/digits_converged.yaml`` (every row at the main recipe's lr 5e-3); LR the
sweep directory of ``configs/ablation/digits_converged_lr.yaml`` and ``digits_converged_lr_chosen.yaml`` (runs named
``<row>_lr<lr>-s<seed>``). Prints three Markdown tables from the finished runs:

- A: every row at lr 5e-3 (test accuracy of the final model, mean ± sample std over seeds, and per seed);
- B: the lr check on seed 0: final validation accuracy (and final training loss) per lr, and the lr chosen on
  validation accuracy (ties keep the recipe's 5e-3; a row with one lr measured gets no choice);
- C: each row at its chosen lr, with as many seeds as were run.

"Final training loss" is the mean task loss of the last 10 logged training steps (metrics.jsonl); it tells whether
a run fitted its training data.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from research_tables import runs_of  # same folder: the finished runs <config>-s<seed> of a sweep

ROWS = ["tied", "untied_attn", "recurrent", "feedforward", "untied_mlp", "untied_all", "untied_all_bottleneck",
        "untied_norm", "untied_all_novp", "untied_all_1head", "tied_wide"]
RECIPE_LR = "5e-3"
LRS = ["5e-3", "2e-3", "1e-3"]


def runs(sweep: Path, name: str) -> list[dict]:
    """One record per finished run ``<name>-s<seed>`` of ``sweep``."""
    out = []
    for run in runs_of(sweep, name):
        summary = json.loads((run / "summary.json").read_text())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r for r in records if r["type"] == "step"]
        epochs = [r for r in records if r["type"] == "epoch"]
        out.append(dict(
            seed=int(run.name.rsplit("-s", 1)[1]), test=100 * summary["test_acc"], val=100 * epochs[-1]["val_acc"],
            wiring=summary["test_wiring_cost"], loss=statistics.mean(s["task_loss"] for s in steps[-10:]),
            params=summary["num_params"],
        ))
    return out


def row_runs(main: Path, lr_dir: Path, row: str, lr: str) -> list[dict]:
    if lr == RECIPE_LR:
        return runs(main, row) or runs(lr_dir, f"{row}_lr{lr}")
    return runs(lr_dir, f"{row}_lr{lr}")


def mean_std(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table_row(label: str, rs: list[dict], extra: list[str] = ()) -> str:
    cells = [label, *extra, f"{len(rs)}/3", mean_std([r["test"] for r in rs]), " / ".join(f"{r['test']:.1f}" for r in rs),
             mean_std([r["val"] for r in rs]), mean_std([r["wiring"] for r in rs], 3), mean_std([r["loss"] for r in rs], 3)]
    return "| " + " | ".join(cells) + " |"


def choose(main: Path, lr_dir: Path, row: str) -> tuple[str | None, dict]:
    seed0 = {}
    for lr in LRS:
        r = [x for x in row_runs(main, lr_dir, row, lr) if x["seed"] == 0]
        if r:
            seed0[lr] = r[0]
    if len(seed0) < 2:
        return None, seed0
    return max(seed0, key=lambda lr: (seed0[lr]["val"], lr == RECIPE_LR)), seed0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("main", type=Path, help="sweep directory of configs/ablation/digits_converged.yaml")
    ap.add_argument("lr", type=Path, help="sweep directory of the lr check (digits_converged_lr*.yaml)")
    args = ap.parse_args()
    head = "| seeds | test acc (%) | per seed | val acc, final (%) | wiring cost | train loss, final |"
    print(f"A. every row at the recipe's lr {RECIPE_LR}\n")
    print("| config | params " + head)
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for row in ROWS:
        rs = row_runs(args.main, args.lr, row, RECIPE_LR)
        print(table_row(row, rs, [f"{rs[0]['params']:,}" if rs else "-"]))
    print("\nB. lr check, seed 0: final val acc % (final train loss)\n")
    print("| config | " + " | ".join(f"lr {lr}" for lr in LRS) + " | chosen |")
    print("|---|" + "---:|" * len(LRS) + "---|")
    chosen = {}
    for row in ROWS:
        chosen[row], seed0 = choose(args.main, args.lr, row)
        cells = [f"{seed0[lr]['val']:.1f} ({seed0[lr]['loss']:.3f})" if lr in seed0 else "-" for lr in LRS]
        print(f"| {row} | " + " | ".join(cells) + f" | {chosen[row] or '-'} |")
    print("\nC. each row at its chosen lr\n")
    print("| config | lr " + head)
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for row in ROWS:
        if chosen[row] is not None:
            print(table_row(row, row_runs(args.main, args.lr, row, chosen[row]), [chosen[row]]))


if __name__ == "__main__":
    main()
