"""Robustness of the default `digits` columnformer vs the `digits-vit` baseline (issue 10), 3 seeds.

    .venv/bin/python experiments/robustness_digits.py [--runs runs/main] [--steps 2 6 8]

Trains (when missing) both presets with exactly the main job's config (configs/digits.yaml) for seeds
0, 1, 2 as <runs>/digits-s<seed> and <runs>/digits-vit-s<seed>, runs `columnformer robustness
digits-s<seed> --baseline digits-vit-s<seed>` (and with --steps T' for the depth sweep), and writes
<runs>/robustness.md: per corruption, the mean accuracy over severities 1-5 of the columnformer, the ViT
and logistic regression, and the corruption errors (CE) relative to the ViT, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "columnformer", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"columnformer {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def pm(xs, scale: float = 100.0, digits: int = 1) -> str:
    xs = scale * np.asarray(xs, dtype=float)
    return f"{xs.mean():.{digits}f} ± {xs.std(ddof=1):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/main")
    parser.add_argument("--steps", type=int, nargs="*", default=[2, 6, 8])
    args = parser.parse_args()
    runs = (ROOT / args.runs).resolve()
    for s in SEEDS:
        for preset, name in (("digits", f"digits-s{s}"), ("digits-vit", f"digits-vit-s{s}")):
            if not (runs / name / "summary.json").exists():
                cli("train", "--config", "configs/digits.yaml", f"preset={preset}", f"train.seed={s}", f"name={name}",
                    f"out_dir={runs}", "train.progress=false", "--overwrite")
        if not (runs / f"digits-s{s}" / "robustness.json").exists():
            cli("robustness", str(runs / f"digits-s{s}"), "--baseline", str(runs / f"digits-vit-s{s}"))
        for t in args.steps:
            if not (runs / f"digits-s{s}" / f"robustness-steps{t}.json").exists():
                cli("robustness", str(runs / f"digits-s{s}"), "--baseline", str(runs / f"digits-vit-s{s}"), "--steps", str(t))
    res = [json.loads((runs / f"digits-s{s}" / "robustness.json").read_text()) for s in SEEDS]
    corruptions = list(res[0]["accuracy"]["model"])
    lines = [
        "| corruption | columnformer acc % | ViT acc % | logreg acc % | CE columnformer | CE logreg |",
        "|---|---|---|---|---|---|",
        f"| clean | {pm([r['clean']['model'] for r in res])} | {pm([r['clean']['baseline'] for r in res])} | "
        f"{pm([r['clean']['logreg'] for r in res])} | | |",
    ]
    for c in corruptions:
        lines.append(
            f"| {c} | {pm([r['mean']['model'][c] for r in res])} | {pm([r['mean']['baseline'][c] for r in res])} | "
            f"{pm([r['mean']['logreg'][c] for r in res])} | {pm([r['ce']['model'][c] for r in res], 1, 3)} | "
            f"{pm([r['ce']['logreg'][c] for r in res], 1, 3)} |"
        )
    lines.append(f"| **mCE** | | | | **{pm([r['mce']['model'] for r in res], 1, 3)}** | {pm([r['mce']['logreg'] for r in res], 1, 3)} |")
    lines += ["", "Depth (`--steps`; trained with 4): clean accuracy % and mCE of the columnformer vs the same ViT, 3 seeds.", "",
              "| steps | clean acc % | mean corrupted acc % | mCE |", "|---|---|---|---|"]
    for t in sorted({4, *args.steps}):
        rr = res if t == 4 else [json.loads((runs / f"digits-s{s}" / f"robustness-steps{t}.json").read_text()) for s in SEEDS]
        corrupted = [np.mean(list(r["mean"]["model"].values())) for r in rr]
        lines.append(f"| {t} | {pm([r['clean']['model'] for r in rr])} | {pm(corrupted)} | {pm([r['mce']['model'] for r in rr], 1, 3)} |")
    text = "\n".join(lines) + "\n"
    (runs / "robustness.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
