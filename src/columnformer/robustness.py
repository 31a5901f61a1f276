"""Robustness of a classification run to image corruptions (ImageNet-C style).

    columnformer robustness RUN [--baseline RUN2] [--steps T'] [--seed S]

Seven corruptions at five severities each, applied in *pixel space* (the normalisation undone,
the image corrupted and clipped to [0, 1], then normalised again):

    gaussian_noise  additive N(0, sigma^2)              sigma     .08 .16 .26 .38 .50
    salt_pepper     pixels set to 0 or 1                share     .05 .10 .17 .25 .35
    blur            Gaussian blur, sigma x image side   sigma     .05 .08 .11 .14 .18
    contrast        (x - mean) * c + mean               c         .50 .35 .22 .12 .06
    occlusion       a grey square at a random place     side      .25 .35 .45 .55 .65 (x the shorter side)
    shift           translation in a random direction   distance  .08 .15 .22 .30 .40 (x the side)
    rotation        rotation by +-angle about the centre degrees   12  24  36  50  65

Severity 0 is the identity. Every random choice is drawn from ``(seed, corruption, severity, image
index)``, so two runs (model and ``--baseline``) see exactly the same corrupted images. For each
corruption: accuracy per severity, its mean over severities 1-5, and the corruption error relative to
the baseline, CE = sum_s (1 - acc_model) / sum_s (1 - acc_baseline) (mCE: its mean over corruptions;
below 1 = more robust than the baseline). On in-memory datasets a logistic regression on the training
pixels is scored on the same images as a third row. ``--steps`` unrolls a recurrent run for another
number of steps (robustness against depth). Writes robustness[-stepsT].json / .md and
figures/robustness[-stepsT].png into the run directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

SEVERITIES = {
    "gaussian_noise": (0.0, 0.08, 0.16, 0.26, 0.38, 0.50),
    "salt_pepper": (0.0, 0.05, 0.10, 0.17, 0.25, 0.35),
    "blur": (0.0, 0.05, 0.08, 0.11, 0.14, 0.18),
    "contrast": (1.0, 0.50, 0.35, 0.22, 0.12, 0.06),
    "occlusion": (0.0, 0.25, 0.35, 0.45, 0.55, 0.65),
    "shift": (0.0, 0.08, 0.15, 0.22, 0.30, 0.40),
    "rotation": (0.0, 12.0, 24.0, 36.0, 50.0, 65.0),
}
CORRUPTIONS = tuple(SEVERITIES)


# ------------------------------------------------------------------ corruptions (pixel space, x in [0, 1])
def _affine(x: torch.Tensor, angles_deg: list[float], shifts: list[tuple[float, float]]) -> torch.Tensor:
    """Rotate each image (B, C, H, W) about its centre and translate it by (dx, dy) pixels; outside = 0 (black)."""
    b, c, h, w = x.shape
    theta = torch.zeros(b, 2, 3)
    for i, (deg, (dx, dy)) in enumerate(zip(angles_deg, shifts)):
        a = math.radians(deg)
        theta[i] = torch.tensor(
            [[math.cos(a), -math.sin(a) * h / w, -2 * dx / w], [math.sin(a) * w / h, math.cos(a), -2 * dy / h]]
        )
    grid = F.affine_grid(theta, (b, c, h, w), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), edges replicated."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def corrupt_batch(x: torch.Tensor, name: str, severity: int, rngs: list[np.random.Generator]) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] corrupted by ``name`` at ``severity`` (0 = identity), clipped to [0, 1].

    Image i draws its random choices from ``rngs[i]`` alone, so a result does not depend on batching.
    """
    if name not in SEVERITIES:
        raise ValueError(f"unknown corruption {name!r}; available: {', '.join(CORRUPTIONS)}")
    if not 0 <= severity <= 5:
        raise ValueError(f"severity must be 0-5, got {severity}")
    if severity == 0:
        return x.clone()
    s = SEVERITIES[name][severity]
    b, c, h, w = x.shape
    if name == "gaussian_noise":
        y = x + s * torch.from_numpy(np.stack([r.standard_normal((c, h, w)) for r in rngs]).astype(np.float32))
    elif name == "salt_pepper":
        draws = np.stack([r.random((2, 1, h, w)) for r in rngs])  # (B, 2, 1, H, W): hit?, salt or pepper
        hit, salt = torch.from_numpy(draws[:, 0] < s), torch.from_numpy(draws[:, 1] < 0.5).float()
        y = torch.where(hit, salt.expand(b, c, h, w), x)
    elif name == "blur":
        y = _blur(x, s * max(h, w))
    elif name == "contrast":
        m = x.mean(dim=(2, 3), keepdim=True)
        y = (x - m) * s + m
    elif name == "occlusion":
        side = max(1, int(round(s * min(h, w))))
        y = x.clone()
        for i, r in enumerate(rngs):
            top, left = r.integers(0, h - side + 1), r.integers(0, w - side + 1)
            y[i, :, top : top + side, left : left + side] = 0.5
    elif name == "shift":
        phis = [r.uniform(0, 2 * math.pi) for r in rngs]
        y = _affine(x, [0.0] * b, [(s * w * math.cos(p), s * h * math.sin(p)) for p in phis])
    else:  # rotation
        y = _affine(x, [s * r.choice([-1.0, 1.0]) for r in rngs], [(0.0, 0.0)] * b)
    return y.clamp(0.0, 1.0)


def corrupt(x: torch.Tensor, name: str, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """One image (C, H, W) in [0, 1]: :func:`corrupt_batch` of a batch of one."""
    return corrupt_batch(x.unsqueeze(0), name, severity, [rng])[0]


def corruption_rng(seed: int, name: str, severity: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, CORRUPTIONS.index(name), severity, index])


# ------------------------------------------------------------------ normalisation of a dataset
def pixel_normalisation(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of shape (C, 1, 1) with which a dataset's images were normalised from [0, 1] pixels."""
    base = getattr(ds, "ds", ds)  # a labelled subset's dataset
    norm = getattr(base, "pixel_norm", None)
    if norm is not None:
        return norm
    transform = getattr(base, "transform", None)
    if transform is not None and hasattr(transform, "mean"):
        return transform.mean, transform.std
    raise ValueError("this dataset does not say how its images were normalised; robustness needs pixel space")


def corrupted_split(ds, name: str, severity: int, seed: int, batch_size: int = 256):
    """Yield (normalised corrupted images (B, C, H, W), labels (B,)) over a dataset, in order."""
    mean, std = pixel_normalisation(ds)
    index = 0
    for images, labels in DataLoader(ds, batch_size=batch_size, shuffle=False):
        if severity == 0:  # the identity, exactly (no round trip through pixel space)
            yield images, labels
            continue
        rngs = [corruption_rng(seed, name, severity, index + i) for i in range(len(images))]
        out = corrupt_batch(images * std + mean, name, severity, rngs)
        index += len(images)
        yield (out - mean) / std, labels


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def accuracy_tables(predictors: dict, ds, seed: int) -> dict[str, dict[str, list[float]]]:
    """Accuracy of each ``predict(images) -> labels`` per corruption and severity 0-5 (0 = clean).

    Each corrupted split is made once and shown to every predictor: they see the same images.
    """
    tables = {r: {} for r in predictors}
    for name in CORRUPTIONS:
        for severity in range(6):
            correct, total = dict.fromkeys(predictors, 0), 0
            for images, labels in corrupted_split(ds, name, severity, seed):
                for r, predict in predictors.items():
                    correct[r] += int((predict(images) == labels).sum())
                total += len(labels)
            for r in predictors:
                tables[r].setdefault(name, []).append(correct[r] / total)
    return tables


def accuracy_table(predict, ds, seed: int) -> dict[str, list[float]]:
    return accuracy_tables({"model": predict}, ds, seed)["model"]


def model_predictor(model, steps: int | None = None):
    model.eval()

    def predict(images):
        logits, _ = model(images, steps=steps)
        return logits.argmax(-1)

    return predict


def logreg_predictor(train_ds):
    """Logistic regression on flattened training pixels (the summary's baseline; in-memory sets only)."""
    from .tasks.classify import pixel_logistic_regression

    clf = pixel_logistic_regression(train_ds)
    return lambda images: torch.from_numpy(clf.predict(images.flatten(1).numpy()))


def corruption_error(model_accs: list[float], base_accs: list[float]) -> float:
    """ImageNet-C's CE over severities 1-5: sum(1 - acc_model) / sum(1 - acc_baseline)."""
    num, den = sum(1 - a for a in model_accs[1:]), sum(1 - a for a in base_accs[1:])
    return float(num / den) if den > 0 else float("nan")


_SPLIT_KEYS = ("name", "path", "hf_config", "split_seed", "val_fraction", "test_fraction", "train_split", "val_split",
               "test_split", "image_column", "label_column", "eval_crop_frac", "mean", "std")


def _evaluation_data(cfg) -> dict:
    """What decides the evaluation images: the dataset, its split and preprocessing, and the image size."""
    data = cfg.data.model_dump(mode="json")
    return {**{k: data[k] for k in _SPLIT_KEYS}, "image_size": list(cfg.model.image_size), "in_chans": cfg.model.in_chans}


def _load_classifier(run_dir: Path, checkpoint: str):
    from .run import load_run

    run = load_run(run_dir, checkpoint=checkpoint)
    if run.config.task.name != "classify":
        raise ValueError(f"{str(run_dir)!r} is a {run.config.task.name!r} run; robustness needs a classification run")
    return run


def robustness_run(
    run_dir: str | Path, baseline: str | Path | None = None, steps: int | None = None, seed: int = 0,
    split: str = "test", checkpoint: str = "last",
) -> dict:
    """Evaluate a classification run (and a baseline run, and logistic regression) under every corruption."""
    from .data import build_datasets

    run_dir = Path(run_dir)
    run = _load_classifier(run_dir, checkpoint)
    cfg = run.config
    if steps is not None and not cfg.model.sheet.recurrent:
        raise ValueError(f"--steps needs a recurrent run; {str(run_dir)!r} has {cfg.model.sheet.steps} feed-forward blocks")
    data_cfg = cfg.data.model_copy(update={"augment": False})
    sets = build_datasets(data_cfg, cfg.model, seed=cfg.train.seed)
    if split not in sets:
        raise ValueError(f"split {split!r} not in this dataset; available: {', '.join(sets)}")
    predictors, names = {"model": model_predictor(run.model, steps)}, {"model": str(run_dir)}
    if baseline is not None:
        base = _load_classifier(Path(baseline), checkpoint)
        mine, theirs = (_evaluation_data(c) for c in (cfg, base.config))
        if mine != theirs:
            raise ValueError(f"--baseline {str(baseline)!r} is evaluated on other data than {str(run_dir)!r} "
                             f"({ {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]} }); compare runs of one dataset")
        predictors["baseline"], names["baseline"] = model_predictor(base.model), str(baseline)
    if hasattr(sets["train"], "images"):
        predictors["logreg"] = logreg_predictor(sets["train"])
        names["logreg"] = "logistic regression on the run's training pixels (C=1)"
    rows = accuracy_tables(predictors, sets[split], seed)
    result = {
        "runs": names, "split": split, "seed": seed, "checkpoint": checkpoint,
        "steps": steps if steps is not None else cfg.model.sheet.steps, "trained_steps": cfg.model.sheet.steps,
        "severities": {k: list(v[1:]) for k, v in SEVERITIES.items()},
        "accuracy": rows,  # row -> corruption -> [clean, severity 1..5]
        "clean": {r: t[CORRUPTIONS[0]][0] for r, t in rows.items()},
        "mean": {r: {c: float(np.mean(a[1:])) for c, a in t.items()} for r, t in rows.items()},
    }
    if "baseline" in rows:
        result["ce"] = {
            r: {c: corruption_error(rows[r][c], rows["baseline"][c]) for c in CORRUPTIONS} for r in rows if r != "baseline"
        }
        result["mce"] = {r: float(np.mean(list(v.values()))) for r, v in result["ce"].items()}
    stem = "robustness" if steps is None else f"robustness-steps{steps}"
    (run_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (run_dir / f"{stem}.md").write_text(format_table(result))
    (run_dir / "figures").mkdir(exist_ok=True)
    robustness_figure(result, run_dir / "figures" / f"{stem}.png")
    result["written"] = [str(run_dir / f"{stem}.{ext}") for ext in ("json", "md")]
    return result


def format_table(result: dict) -> str:
    """Markdown: accuracy (%) per corruption x severity per row, the mean over severities, and CE."""
    rows = result["accuracy"]
    lines = [
        f"Robustness on the {result['split']} split (seed {result['seed']}, {result['steps']} steps; trained with "
        f"{result['trained_steps']}). Accuracy %, clean = severity 0. CE relative to the baseline (< 1: more robust).",
        "",
        "| corruption | row | clean | s1 | s2 | s3 | s4 | s5 | mean s1-5 | CE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in CORRUPTIONS:
        for r, table in rows.items():
            ce = result.get("ce", {}).get(r, {}).get(c)
            ce_s = "—" if ce is None else f"{ce:.3f}"
            accs = " | ".join(f"{100 * a:.1f}" for a in table[c])
            lines.append(f"| {c} | {r} | {accs} | {100 * result['mean'][r][c]:.1f} | {ce_s} |")
    if "mce" in result:
        lines += ["", " · ".join(f"mCE {r}: {v:.3f}" for r, v in result["mce"].items())]
    return "\n".join(lines) + "\n"


def robustness_figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(2.6 * len(CORRUPTIONS), 2.8), sharey=True)
    for ax, c in zip(axes, CORRUPTIONS):
        for r, table in result["accuracy"].items():
            ax.plot(range(6), [100 * a for a in table[c]], "o-", ms=3, label=r)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("severity")
        ax.set_xticks(range(6))
    axes[0].set_ylabel("accuracy %")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cmd_robustness(args) -> int:
    result = robustness_run(args.run_dir, args.baseline, args.steps, args.seed, args.split, args.checkpoint)
    print(format_table(result), end="")
    print("wrote " + ", ".join(result["written"]))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "robustness", help="accuracy under image corruptions at five severities",
        description="Evaluate a classification run under seeded pixel-space corruptions (Gaussian noise, salt and "
        "pepper, blur, contrast, occlusion, shift, rotation) at severities 1-5; with --baseline, the corruption "
        "error relative to a second run. Writes robustness.json/.md and figures/robustness.png into the run directory.",
    )
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--baseline", metavar="RUN", help="a second classification run of the same data (CE reference)")
    p.add_argument("--steps", type=int, help="unroll a recurrent run for this many steps instead of its own")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions (default 0)")
    p.add_argument("--split", default="test", help="data split (default: test)")
    p.add_argument("--checkpoint", default="last", choices=("best", "last"), help="which weights (default: last)")
    p.set_defaults(func=_cmd_robustness)
