"""Synthetic-cortex recovery on a trained run (issue 14): for every (area, step) of the sheet, simulate targets that
read out that area at that step (SNR 1 per repeat, 4 repeats) and count how often `columnformer brain`'s encoding
names the true area and step.

    python experiments/synthetic_cortex.py runs/sweeps/ablation-digits-converged/recurrent-s0 --out runs/synthetic-cortex
    python experiments/synthetic_cortex.py RUN --banded 10 --placements 0,1 1,3 2,2   # + one banded ridge per placement

Features: the run's column states for the 1,257 training digits, PCA-reduced to 6 channels per column (as in
tests/test_brain.py). Prints the recovery per placement, the mean cross-validated encoding score of every feature set
for each placement (rows: true placement; columns: area x step), and the noise ceiling against its simulated value.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from columnformer.brain import compare as B
from columnformer.brain import features as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/synthetic-cortex"))
    ap.add_argument("--targets", type=int, default=12)
    ap.add_argument("--reduce", default="pca:6")
    ap.add_argument("--banded", type=int, default=0, help="also fit the banded ridge with N random-search samples")
    ap.add_argument("--placements", nargs="*", default=None, help="AREA,STEP (0-based) pairs; default every one")
    args = ap.parse_args()
    fdir = args.out / "features"
    if not (fdir / "features.npy").is_file():
        F.export_features(args.run, "split:train", fdir, reduce=args.reduce, chunk=1024, progress=False)
    areas = sorted(int(a) for a in np.unique(np.load(fdir / "areas.npy")))
    steps = np.load(fdir / "features.npy", mmap_mode="r").shape[1]
    rows, hits_all, ncs, banded = [], [], [], []
    expected = 1 / (1 + 1 / 4)
    every = [(a, t) for a in areas for t in range(steps)]
    chosen = every if args.placements is None else [tuple(int(v) for v in p.split(",")) for p in args.placements]
    for a, t in chosen:
        k = every.index((a, t))  # the seed of a placement does not depend on which others run
        resp = B.simulate_responses(fdir, area=a, step=t, targets=args.targets, snr=1.0, repeats=4, seed=k)
        res = B.compare(fdir, resp, args.out / f"a{a}-t{t}", bootstrap=1, figures=False, rsa_stimuli=100, blas_threads=1,
                        banded_iter=args.banded)
        enc = res["encoding"]
        hits = (np.asarray(enc["best_area"]) == a) & (np.asarray(enc["best_step"]) == t)
        hits_all += hits.tolist()
        if args.banded:
            band = res["banded"]
            bh = (np.asarray(band["best_area"]) == a) & (np.asarray(band["best_step"]) == t)
            banded.append((a, t, float(bh.mean()), float(np.mean(band["joint_score"])), float(np.mean(enc["best_score"])),
                           float(np.mean(np.asarray(band["share_per_target"])[:, areas.index(a), t]
                                         / np.asarray(band["share_per_target"]).sum((1, 2))))))
        ncs += list(res["noise_ceiling"]["per_target"])
        rows.append((a, t, float(hits.mean()), np.asarray(enc["per_area_step_mean"])))
    print(f"{args.run}: {len(areas)} areas x {steps} steps, {args.targets} targets per placement, SNR 1, 4 repeats\n")
    head = " | ".join(f"a{a} t{t + 1}" for a in areas for t in range(steps))
    print(f"| true area, step | recovered | mean encoding r of each feature set: {head} |")
    print("|---|---:|" + "---:|" * (len(areas) * steps))
    for a, t, rate, m in rows:
        print(f"| a{a} t{t + 1} | {100 * rate:.0f} % | " + " | ".join(f"{v:.3f}" for v in m.ravel()) + " |")
    print(f"\nrecovered overall: {100 * np.mean(hits_all):.1f} % of {len(hits_all)} targets (chance {100 / (len(areas) * steps):.1f} %)")
    print(f"noise ceiling (NCSNR): {np.mean(ncs):.3f} measured vs {expected:.3f} simulated")
    if banded:
        print(f"\nbanded ridge ({args.banded} random-search samples), one model on all {len(every)} bands:\n")
        print("| true area, step | largest share = true band | joint r | best separate r | true band's share of R^2 |")
        print("|---|---:|---:|---:|---:|")
        for a, t, rate, joint, sep, share in banded:
            print(f"| a{a} t{t + 1} | {100 * rate:.0f} % | {joint:.3f} | {sep:.3f} | {share:.2f} |")
    (args.out / "synthetic_cortex.json").write_text(json.dumps(
        {"recovered": float(np.mean(hits_all)), "per_placement": [(a, t, r) for a, t, r, _ in rows],
         "noise_ceiling": float(np.mean(ncs)), "expected_noise_ceiling": expected,
         "banded": [dict(zip(("area", "step", "recovered", "joint_r", "separate_r", "true_share"), b)) for b in banded]},
        indent=1))


if __name__ == "__main__":
    main()
