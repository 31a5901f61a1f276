"""Expressivity probes (issue 12): addition with length generalisation, the switch task and multiplication,
for tied, untied, mixture-static and mixture-dynamic sheets, each with a fixed number of steps T and with
ACT halting. 3 seeds; writes <out>/results.json and <out>/results.md.

    .venv/bin/python experiments/expressivity.py [--out runs/expressivity] [--parallel 2]

Protocol (one budget and one grid for every row):
- Data: configs/addition.yaml's format: operands of 1-3 digits in training (L = 3), least-significant digit
  first, tested on 1-3 digits (in distribution, ID) and 4-6 digits (out of distribution, OOD); 20,000
  training examples drawn once; operand pairs never shared between splits. Training operands start at a
  random slot of the 6-wide input (``task.random_offset``) except in the ``untied-no-offset`` row.
- Model: the 13-column line sheet of configs/addition.yaml (width 64, 4 heads, T = 6 recurrent steps; ACT
  rows: at most 6 steps, ponder weight tau = 0.01). Mixture rows: E = 4 experts per weight bank for attention,
  MLP and norms. Control rows "T=2": the tied sheet unrolled 2 steps (about what ACT ends up running), to tell
  adaptive halting from a short unroll.
- Budget: 4 epochs of 20,000 examples, batch 64 (1,252 optimizer steps), AdamW with configs/addition.yaml's
  schedule; each run on one thread, two runs at a time on this 2-core machine.
- Grid: learning rate in LRS, tried with seed 0; each row's learning rate is the one with the better final
  validation exact accuracy (ID lengths only), then seeds 1 and 2 run with it; the table reports the three
  seeds' final models at that learning rate (test split: ID and OOD).
- FLOPs per example: counted by torch.utils.flop_counter on one forward pass (batch 64); "executed" runs
  every step (the masked halting loop always runs T steps); "ponder-weighted" counts only the steps each
  column ran before halting (per-step FLOPs times the mean halting step, plus the rest).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
LRS = (1e-3, 3e-3)
BUDGET = ["train.epochs=4", "train.batch_size=64", "train.threads=1", "train.progress=false", "train.figures=false"]
SHEETS = {
    "tied": [],
    "untied": ["model.sheet.untied_attn=true", "model.sheet.untied_mlp=true", "model.sheet.untied_norm=true"],
    "mix-static": ["model.sheet.mixture=static", "model.sheet.experts=4"],
    "mix-dynamic": ["model.sheet.mixture=dynamic", "model.sheet.experts=4"],
}
HALTING = {"T=6": [], "ACT": ["model.sheet.halting=act", "model.sheet.ponder_weight=0.01"]}
TASKS = {"addition": ["task.name=addition"], "switch": ["task.name=switch"], "multiplication": ["task.name=multiplication"]}


def rows() -> list[tuple[str, str, str, list[str]]]:
    """(task, sheet, halting, overrides) of every row of the table."""
    out = []
    for task in ("addition", "switch"):
        for sheet, s_over in SHEETS.items():
            for halt, h_over in HALTING.items():
                out.append((task, sheet, halt, [*TASKS[task], *s_over, *h_over]))
    out.append(("addition", "untied-no-offset", "T=6", [*TASKS["addition"], *SHEETS["untied"], "task.random_offset=false"]))
    for task in ("addition", "switch"):  # control: a fixed short unroll, about the steps ACT ends up running
        out.append((task, "tied", "T=2", [*TASKS[task], "model.sheet.steps=2"]))
    for halt, h_over in HALTING.items():  # multiplication: reported even when near 0
        out.append(("multiplication", "tied", halt, [*TASKS["multiplication"], *h_over]))
    return out


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "columnformer", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def train(out: Path, name: str, overrides: list[str]) -> dict:
    run = out / name
    if not (run / "summary.json").exists():
        cli("train", "--config", "configs/addition.yaml", *overrides, *BUDGET, f"name={name}", f"out_dir={out}", "--overwrite")
    summary = json.loads((run / "summary.json").read_text())
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    summary["final_val_acc"] = [m for m in epochs if m["type"] == "epoch"][-1]["val_acc"]
    return summary


def flops(run_dir: Path) -> dict:
    """Forward FLOPs per example: executed (all T steps) and ponder-weighted (steps run before halting)."""
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from columnformer.run import load_run
    from columnformer.tasks import build_task

    run = load_run(run_dir)
    cfg = run.config
    task = build_task(cfg.task, cfg.model)
    batch = next(iter(DataLoader(task.datasets(cfg.data, cfg.model)["test"], batch_size=64, shuffle=False)))

    def count(steps: int) -> tuple[float, object]:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            _, trace = task.forward(run.model, batch, steps=steps)
        return fc.get_total_flops() / len(batch[0]), trace

    T = cfg.model.sheet.steps
    total, trace = count(T)
    per_step = (total - count(1)[0]) / (T - 1)
    steps_run = float(trace.halt_steps.mean()) if trace.halt_steps is not None else float(T)
    return {"executed": total, "ponder_weighted": total - per_step * (T - steps_run), "per_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/expressivity")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), help="run only these tasks' rows")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    slots = threading.Semaphore(args.parallel)  # training runs at a time; rows wait on their grid in threads

    def run(name: str, overrides: list[str]) -> dict:
        with slots:
            return train(out, name, overrides)

    def do_row(row) -> dict:
        task, sheet, halt, over = row
        stem = f"{task}-{sheet}-{halt.replace('=', '')}"
        with ThreadPoolExecutor(len(LRS)) as grid_pool:  # seed 0 at every learning rate
            first = dict(zip(LRS, grid_pool.map(lambda lr: run(f"{stem}-lr{lr:g}-s0", [*over, f"optim.lr={lr}", "train.seed=0"]), LRS)))
        lr = max(LRS, key=lambda x: first[x]["final_val_acc"])
        with ThreadPoolExecutor(len(SEEDS) - 1) as seed_pool:
            rest = list(seed_pool.map(lambda s: run(f"{stem}-lr{lr:g}-s{s}", [*over, f"optim.lr={lr}", f"train.seed={s}"]), SEEDS[1:]))
        summaries = [first[lr], *rest]
        row_out = {
            "task": task, "sheet": sheet, "halting": halt, "chosen_lr": f"{lr:g}",
            "grid_val_acc_seed0": {f"{x:g}": first[x]["final_val_acc"] for x in LRS},
            "num_params": summaries[0]["num_params"],
            "train_time_s": [r["train_time_s"] for r in summaries],
            "acc_id": [r["test_acc_id"] for r in summaries],
            "acc_ood": [r["test_acc_ood"] for r in summaries],
            "digit_acc": [r["test_digit_acc"] for r in summaries],
            "acc_len": {k.removeprefix("test_acc_"): [r[k] for r in summaries] for k in summaries[0] if k.startswith("test_acc_len")},
            "ponder_steps": [r.get("test_ponder_steps") for r in summaries],
            "flops": flops(out / f"{stem}-lr{lr:g}-s0"),
        }
        if task == "switch":
            row_out["acc_add"] = [r["test_acc_add"] for r in summaries]
            row_out["acc_sub"] = [r["test_acc_sub"] for r in summaries]
        return row_out

    table_rows = [r for r in rows() if r[0] in args.tasks]
    # the slowest rows first (dynamic mixtures, then the other mixtures), so the two slots stay busy to the end
    order = sorted(range(len(table_rows)), key=lambda i: ("dynamic" not in table_rows[i][1], "mix" not in table_rows[i][1]))
    with ThreadPoolExecutor(len(table_rows)) as row_pool:
        futures = {i: row_pool.submit(do_row, table_rows[i]) for i in order}
        results = {"seeds": SEEDS, "lrs": LRS, "budget": BUDGET, "rows": [futures[i].result() for i in range(len(table_rows))]}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))
    print(table(results))


def _pm(xs, scale: float = 100.0, digits: int = 1) -> str:
    xs = scale * np.asarray(xs, dtype=float)
    return f"{xs.mean():.{digits}f} ± {xs.std(ddof=1) if len(xs) > 1 else 0:.{digits}f}"


def table(r: dict) -> str:
    lines = [
        "| task | sheet | steps | params | kFLOPs/example executed / ponder-weighted | train time (s) | lr | ID exact acc % "
        "| OOD exact acc % | mean steps run (test) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        f = row["flops"]
        steps = row["ponder_steps"]
        steps_txt = _pm(steps, 1, 2) if steps[0] is not None else f"{row['halting'].removeprefix('T=')} (fixed)"
        lines.append(
            f"| {row['task']} | {row['sheet']} | {row['halting']} | {row['num_params']:,} | "
            f"{f['executed'] / 1e3:,.0f} / {f['ponder_weighted'] / 1e3:,.0f} | {_pm(row['train_time_s'], 1, 0)} | "
            f"{row['chosen_lr']} | {_pm(row['acc_id'])} | {_pm(row['acc_ood'])} | {steps_txt} |"
        )
    switch = [row for row in r["rows"] if row["task"] == "switch"]
    if switch:
        lines += ["", "Switch task, exact accuracy per operator (all test lengths, %):", "",
                  "| sheet | steps | a + b | a - b |", "|---|---|---|---|"]
        for row in switch:
            lines.append(f"| {row['sheet']} | {row['halting']} | {_pm(row['acc_add'])} | {_pm(row['acc_sub'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
