"""Label efficiency on digits (issue 10): MIM pre-training + fine-tuning vs training from scratch vs
logistic regression, all with the same 10% of the training labels; linear probes of MIM features vs
the same sheet at initialisation. 3 seeds; writes <out>/results.json and <out>/results.md.

    .venv/bin/python experiments/label_efficiency.py [--out runs/label-efficiency] [--parallel 2]

Protocol (fair by construction):
- Labelled subset S: a class-balanced 10% of the digits training split (data.labels_fraction=0.1,
  data.labels_seed=0; 126 images). A class-balanced 20% of S (26 images) is held out as the validation
  split (data.labels_holdout=0.2); the remaining 100 images are trained on. No other label is used for
  training or model selection; the test split (360 images) is only scored.
- Scratch and fine-tune runs share everything: the digits preset and recipe of configs/digits.yaml,
  batch 32, 100 epochs (400 optimizer steps), and the learning-rate grid LRS; the learning rate of
  each method is the one with the best mean final validation (hold-out) accuracy over the 3 seeds.
- Fine-tuning starts from the final weights of a MIM run with the same seed (`init_from`); its patch
  decoder is dropped and a fresh classifier head initialised. MIM pre-training sees training-split
  images only (its own validation loss is measured on a 10% hold-out of the training split).
- Logistic regression: on the same 100 training images' pixels; C from a grid chosen on the same hold-out.
- Probes: `columnformer probe RUN --labels-fraction 0.1` on the MIM runs and `--at-init` (same sheet at
  initialisation); C by cross-validation within S.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
LRS = (1e-3, 3e-3, 1e-2)
LABELS = ["data.labels_fraction=0.1", "data.labels_holdout=0.2", "data.labels_seed=0"]
FINETUNE = ["train.epochs=100", "train.batch_size=32", "train.progress=false"]
PRETRAIN = ["task=mim", "task.mask_fraction=0.5", "train.epochs=100", "data.labels_holdout=0.1", "train.progress=false"]
LOGREG_CS = tuple(float(c) for c in np.logspace(-3, 2, 11))


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "columnformer", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def train(out: Path, name: str, *overrides: str) -> dict:
    run = out / name
    if not (run / "summary.json").exists():
        cli("train", "--config", "configs/digits.yaml", *overrides, f"name={name}", f"out_dir={out}", "--overwrite")
    summary = json.loads((run / "summary.json").read_text())
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    summary["final_val"] = [m for m in epochs if m["type"] == "epoch"][-1]
    return summary


def logistic_regression() -> dict:
    """Pixels of the same 100 training images; C chosen on the same 26-image hold-out; scored on test."""
    from sklearn.linear_model import LogisticRegression

    from columnformer.config import build_config
    from columnformer.data import build_datasets

    cfg = build_config({}, ["preset=digits", "data.augment=false", *LABELS])
    sets = build_datasets(cfg.data, cfg.model)
    x = {s: sets[s].images.flatten(1).numpy() for s in sets}
    y = {s: sets[s].labels.numpy() for s in sets}
    val = {c: LogisticRegression(C=c, max_iter=5000).fit(x["train"], y["train"]).score(x["val"], y["val"]) for c in LOGREG_CS}
    best = max(val, key=lambda c: (val[c], -abs(np.log10(c))))
    clf = LogisticRegression(C=best, max_iter=5000).fit(x["train"], y["train"])
    return {"C": best, "val_acc": val[best], "test_acc": float(clf.score(x["test"], y["test"])),
            "n_train": int(len(y["train"])), "n_val": int(len(y["val"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/label-efficiency")
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(args.parallel)
    threads = [f"train.threads={max(1, 2 // args.parallel)}"]

    list(pool.map(lambda s: train(out, f"mim-s{s}", *PRETRAIN, *threads, f"train.seed={s}"), SEEDS))
    jobs = {}
    for method in ("scratch", "finetune"):
        for lr in LRS:
            for s in SEEDS:
                init = [f"init_from={out / f'mim-s{s}'}"] if method == "finetune" else []
                name = f"{method}-lr{lr:g}-s{s}"
                jobs[(method, lr, s)] = pool.submit(
                    train, out, name, *LABELS, *FINETUNE, *threads, f"optim.lr={lr}", f"train.seed={s}", *init
                )
    runs = {k: f.result() for k, f in jobs.items()}

    def probe(s: int, init: bool) -> float:
        suffix = "-init" if init else ""
        path = out / f"mim-s{s}" / f"probe-f0.1{suffix}.json"
        if not path.exists():
            cli("probe", str(out / f"mim-s{s}"), "--labels-fraction", "0.1", *(["--at-init"] if init else []))
        return json.loads(path.read_text())["test_acc"]

    results: dict = {"seeds": SEEDS, "lrs": LRS, "methods": {}}
    for method in ("scratch", "finetune"):
        grid = {}
        for lr in LRS:
            val = [runs[(method, lr, s)]["final_val"]["val_acc"] for s in SEEDS]
            test = [runs[(method, lr, s)]["test_acc"] for s in SEEDS]
            grid[f"{lr:g}"] = {"val_acc": val, "test_acc": test}
        chosen = max(grid, key=lambda lr: np.mean(grid[lr]["val_acc"]))
        results["methods"][method] = {"grid": grid, "chosen_lr": chosen, "test_acc": grid[chosen]["test_acc"]}
    results["methods"]["logreg"] = logistic_regression()
    results["probe"] = {"mim": [probe(s, False) for s in SEEDS], "init": [probe(s, True) for s in SEEDS]}
    results["mim_test_loss"] = [json.loads((out / f"mim-s{s}" / "summary.json").read_text())["test_loss"] for s in SEEDS]
    results["n_train"] = runs[("scratch", LRS[0], 0)]["final_val"]["val_n"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))
    print(table(results))


def _pm(xs) -> str:
    xs = 100 * np.asarray(xs, dtype=float)
    return f"{xs.mean():.1f} ± {xs.std(ddof=1) if len(xs) > 1 else 0:.1f}"


def table(r: dict) -> str:
    m = r["methods"]
    lines = [
        "| method (10% of training labels: 100 train + 26 hold-out images) | chosen lr / C | test acc % (3 seeds) |",
        "|---|---|---|",
        f"| from scratch (digits preset) | {m['scratch']['chosen_lr']} | {_pm(m['scratch']['test_acc'])} |",
        f"| MIM pre-training + fine-tuning | {m['finetune']['chosen_lr']} | {_pm(m['finetune']['test_acc'])} |",
        f"| logistic regression on pixels | C={m['logreg']['C']:.3g} | {100 * m['logreg']['test_acc']:.1f} (deterministic) |",
        "",
        "| linear probe, 10% labels (C by CV within them) | test acc % (3 seeds) |",
        "|---|---|",
        f"| MIM-trained sheet | {_pm(r['probe']['mim'])} |",
        f"| same sheet at initialisation | {_pm(r['probe']['init'])} |",
        "",
        "Learning-rate grid (mean final hold-out accuracy / mean test accuracy, %):",
        "",
        "| lr | scratch val | scratch test | fine-tune val | fine-tune test |",
        "|---|---|---|---|---|",
    ]
    for lr in m["scratch"]["grid"]:
        s, f = m["scratch"]["grid"][lr], m["finetune"]["grid"][lr]
        lines.append(f"| {lr} | {_pm(s['val_acc'])} | {_pm(s['test_acc'])} | {_pm(f['val_acc'])} | {_pm(f['test_acc'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
