"""Grown sheet vs the same large sheet trained from scratch for the same training compute (issue 13, item 5).

    python experiments/grow_vs_scratch.py --out runs/grow            # 3 seeds, ~10 min per seed on one core
    python experiments/grow_vs_scratch.py --out runs/grow --table    # only print the table of finished runs

Per seed, with the main job's recipe (configs/digits.yaml: AdamW lr 5e-3, wd 0.1, warm-up then cosine, wiring
lambda 0.01, augmentation, batch 64):

1. ``small``: the `digits` sheet (3 stacked 4x4 layers, 48 columns) trained ``--small-steps`` optimizer steps;
2. ``grown``: ``columnformer expand small --to 8x8 --mode preserve --noise 0.01`` (3 stacked 8x8 layers, 192
   columns, the same function up to the symmetry-breaking noise), then trained on (``init_from``, a new
   optimizer and schedule) for the steps that make the total analytic training FLOPs equal to (3);
3. ``scratch``: the 192-column sheet trained from scratch for ``--big-steps`` steps.

Training FLOPs = 3 x the analytic forward FLOPs (benchmarks/train_step.py ``model_flops``) x samples seen.
Runs that already have a summary.json are skipped, so the script resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, STEPS_PER_EPOCH = 64, 20  # digits: 1257 training images at batch 64
COMMON = ["--config", str(ROOT / "configs" / "digits.yaml"), "train.progress=false", "train.figures=false",
          "train.threads=1", "train.device=cpu"]
BIG = ["model.geometry.layers=[[8,8],[8,8],[8,8]]", "model.input_area=retinotopic"]


def forward_flops(overrides: list[str]) -> float:
    """Analytic forward FLOPs per sample of the model the main config + ``overrides`` builds."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import model_flops

    import yaml

    from columnformer.config import build_config
    from columnformer.tasks import build_task

    cfg = build_config(yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text()), overrides)
    return sum(model_flops(build_task(cfg.task, cfg.model).build_model(), 1).values())


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "columnformer", *args], check=True)


def train(out: Path, name: str, steps: int, extra: list[str], config: list[str] = COMMON) -> dict:
    run = out / name
    if not (run / "summary.json").is_file():
        epochs = math.ceil(steps / STEPS_PER_EPOCH)
        cli("train", *config, f"name={name}", f"out_dir={out}", f"train.epochs={epochs}", f"train.max_steps={steps}",
            "--overwrite", *extra)
    return json.loads((run / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/grow"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--small-steps", type=int, default=800, help="optimizer steps of the small sheet (40 epochs)")
    ap.add_argument("--big-steps", type=int, default=600, help="optimizer steps of the from-scratch large sheet (30 epochs)")
    ap.add_argument("--table", action="store_true", help="only tabulate finished runs")
    args = ap.parse_args()
    f_small, f_big = forward_flops([]), forward_flops(BIG)
    ratio = f_big / f_small
    grown_steps = args.big_steps - round(args.small_steps / ratio)
    rows = []
    for seed in args.seeds:
        seed_o = [f"train.seed={seed}"]
        names = {k: f"{k}-s{seed}" for k in ("small", "grown", "scratch")}
        if args.table and not all((args.out / n / "summary.json").is_file() for n in names.values()):
            continue
        small = train(args.out, names["small"], args.small_steps, seed_o)
        expanded = args.out / f"expanded-s{seed}"
        if not (expanded / "checkpoints" / "last.pt").is_file():
            cli("expand", str(args.out / names["small"]), "--to", "8x8", "--out", str(expanded), "--mode", "preserve",
                "--noise", "0.01", "--seed", str(seed), "--overwrite")
        at_grow = json.loads(subprocess.run([sys.executable, "-m", "columnformer", "eval", str(expanded)], check=True,
                                            capture_output=True, text=True).stdout)["acc"]
        grown_cfg = ["--config", str(expanded / "config.yaml"), "train.progress=false", "train.figures=false"]
        grown = train(args.out, names["grown"], grown_steps, [*seed_o, f"init_from={expanded}"], grown_cfg)
        scratch = train(args.out, names["scratch"], args.big_steps, [*seed_o, *BIG])
        rows.append({
            "seed": seed, "small_acc": small["test_acc"], "at_grow_acc": at_grow, "grown_acc": grown["test_acc"],
            "scratch_acc": scratch["test_acc"],
            "grown_flops": 3 * BATCH * (args.small_steps * f_small + grown_steps * f_big),
            "scratch_flops": 3 * BATCH * args.big_steps * f_big,
            "grown_train_s": small["train_time_s"] + grown["train_time_s"], "scratch_train_s": scratch["train_time_s"],
        })
    print(f"forward FLOPs per sample: small {f_small:.3g}, large {f_big:.3g} (ratio {ratio:.2f}); small "
          f"{args.small_steps} steps + grown {grown_steps} steps vs scratch {args.big_steps} steps, batch {BATCH}\n")
    print("| seed | small (48 col.) | right after growing | grown, trained on | from scratch (192 col.) | "
          "training TFLOP grown / scratch | train time (s) grown / scratch |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {100 * r['small_acc']:.1f} | {100 * r['at_grow_acc']:.1f} | {100 * r['grown_acc']:.1f} | "
              f"{100 * r['scratch_acc']:.1f} | {r['grown_flops'] / 1e12:.2f} / {r['scratch_flops'] / 1e12:.2f} | "
              f"{r['grown_train_s']:.0f} / {r['scratch_train_s']:.0f} |")
    if len(rows) > 1:
        ms = lambda k: f"{100 * statistics.mean(r[k] for r in rows):.1f} ± {100 * statistics.stdev(r[k] for r in rows):.1f}"  # noqa: E731
        print(f"| mean ± std | {ms('small_acc')} | {ms('at_grow_acc')} | {ms('grown_acc')} | {ms('scratch_acc')} | | |")
    (args.out / "grow_vs_scratch.json").write_text(json.dumps({"ratio": ratio, "grown_steps": grown_steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
