"""`columnformer brain RUN --features F --responses R`: which area and step of the sheet predicts which target.

    F  a `columnformer features` folder: features.npy (S, T, N, K), areas.npy (N,), stimuli.json
    R  an .npz with ``responses`` (S', V) or (S', repeats, V), ``stimulus_ids`` (S',) matched to F's stimulus
       IDs (any order; every one must be in F), optional ``target_region`` (V,) region names

Encoding (himalaya). For every area a (the sheet's layers) and step t, the features X_{a,t} (S', columns of a
x K) predict every target by ridge regression (``himalaya.ridge.RidgeCV``, or its linear-kernel form
``himalaya.kernel_ridge.KernelRidgeCV`` when the features outnumber the stimuli; alphas 10^-2 .. 10^6 chosen by
inner 5-fold CV) in K-fold cross-validation over stimuli (seeded; a stimulus's repeats are averaged first, so they
stay in one fold). Score: Pearson r between the out-of-fold predictions and the repeat-averaged responses.

Noise ceiling: the NCSNR method of the Natural Scenes Dataset (Allen et al. 2022): sigma_noise^2 = mean over
stimuli of the variance over repeats, sigma_signal^2 = variance over stimuli of the mean response minus
sigma_noise^2 / n, ncsnr = sigma_signal / sigma_noise, and the explainable share of the variance of an
n-repeat mean is NC = ncsnr^2 / (ncsnr^2 + 1/n). Normalised score: r^2 / NC.

Banded ridge (optional, ``banded_iter > 0``; himalaya's ``BandedRidgeCV``). One joint model on all (area, step)
feature sets at once, each set a band with its own regularisation (random search over band weights, ``banded_iter``
samples, alphas as above, inner 5-fold CV), in the same outer folds. Reported per target: the joint model's
out-of-fold r and the split of its out-of-fold R^2 over the bands (``himalaya.scoring.r2_score_split``: the
band contributions sum to the joint R^2); the band with the largest share names the target's area and step.
Separate fits ask "which single area and step predicts best"; the banded split asks "which one carries the
variance when all compete", so correlated steps of a recurrent sheet share, rather than duplicate, credit.

RSA (rsatoolbox). Model RDMs per area and step (correlation distance between stimuli's feature vectors) against
brain RDMs per region (correlation distance of the repeat-averaged responses), compared by Spearman correlation;
bootstrap over stimuli (``rsatoolbox.inference.bootstrap_sample_pattern``) for a 95% interval; on at most
``rsa_stimuli`` stimuli (a seeded subset, default 500).

Writes RUN/brain/<name>/brain.json and brain.md, and figures/brain_encoding.png (mean score per area x step) and
figures/brain_best_step.png (best step per target, per region) into that folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..extras import require

ALPHAS = np.logspace(-2, 6, 9)


@dataclass
class Responses:
    data: np.ndarray  # (S, R, V) float64, R >= 1 repeats
    stimulus_ids: list[str]
    regions: np.ndarray  # (V,) str


def load_responses(path: str | Path) -> Responses:
    """Read responses from an .npz (see the module docstring); clear errors for every malformed field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--responses {str(path)!r} does not exist (an .npz with responses and stimulus_ids)")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"--responses {str(path)!r} is not a readable .npz ({exc})") from None
    for key in ("responses", "stimulus_ids"):
        if key not in z.files:
            raise ValueError(f"--responses {str(path)!r} has no {key!r} array (it has {', '.join(z.files) or 'none'})")
    data = np.asarray(z["responses"], dtype=np.float64)
    if data.ndim == 2:
        data = data[:, None, :]
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"responses must be (stimuli, targets) or (stimuli, repeats, targets), got {z['responses'].shape}")
    if not np.isfinite(data).all():
        raise ValueError("responses hold NaN or infinite values; drop or impute them first")
    ids = [str(x) for x in z["stimulus_ids"]]
    if len(ids) != data.shape[0] or len(set(ids)) != len(ids):
        raise ValueError(f"stimulus_ids must name each of the {data.shape[0]} stimuli once (got {len(ids)}, "
                         f"{len(set(ids))} distinct)")
    regions = np.asarray(z["target_region"]).astype(str) if "target_region" in z.files else np.full(data.shape[2], "all")
    if regions.shape != (data.shape[2],):
        raise ValueError(f"target_region must have one entry per target ({data.shape[2]}), got {regions.shape}")
    return Responses(data, ids, regions)


def noise_ceiling(data: np.ndarray) -> np.ndarray:
    """NCSNR noise ceiling (variance fraction, 0..1) per target of (S, R, V) responses; NaN with one repeat."""
    S, R, V = data.shape
    if R < 2:
        return np.full(V, np.nan)
    noise_var = data.var(axis=1, ddof=1).mean(0)  # (V,)
    signal_var = np.maximum(data.mean(1).var(0, ddof=1) - noise_var / R, 0.0)
    ncsnr2 = signal_var / np.maximum(noise_var, 1e-300)
    return ncsnr2 / (ncsnr2 + 1.0 / R)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(0), b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.where(den > 0, (a * b).sum(0) / np.maximum(den, 1e-300), 0.0)


def encoding_scores(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Cross-validated ridge: Pearson r (V,) between out-of-fold predictions of ``y`` (S, V) from ``x`` (S, P)."""
    require("himalaya", "model-brain comparison (columnformer brain)", "brain")
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV

    S = len(x)
    order = np.random.default_rng(seed).permutation(S)
    pred = np.zeros_like(y)
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
        ym = y[train].mean(0)
        # the same ridge solution: primal when features are fewer than samples, a linear kernel otherwise
        if x.shape[1] < len(train):
            model = RidgeCV(alphas=ALPHAS, cv=5, fit_intercept=False)
        else:
            model = KernelRidgeCV(kernel="linear", alphas=ALPHAS, cv=5, fit_intercept=False)
        model.fit((x[train] - mu) / sd, y[train] - ym)
        pred[test] = np.asarray(model.predict((x[test] - mu) / sd)) + ym
    return _pearson(pred, y)


def banded_scores(bands: list[np.ndarray], y: np.ndarray, folds: int = 5, seed: int = 0, n_iter: int = 20,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cross-validated banded ridge of ``y`` (S, V) on the feature sets ``bands`` [(S, P_b)]: the joint model's
    out-of-fold Pearson r (V,) and each band's share of its out-of-fold R^2 (n_bands, V)."""
    require("himalaya", "model-brain comparison (columnformer brain)", "brain")
    from himalaya.kernel_ridge import MultipleKernelRidgeCV
    from himalaya.ridge import BandedRidgeCV
    from himalaya.scoring import r2_score_split

    x = np.concatenate(bands, axis=1)  # (S, sum P_b)
    groups = np.concatenate([np.full(b.shape[1], i) for i, b in enumerate(bands)])
    S = len(x)
    order = np.random.default_rng(seed).permutation(S)
    split = np.zeros((len(bands), *y.shape))  # out-of-fold per-band predictions, centred by the training mean
    target = np.zeros_like(y)  # y centred by the same training means
    params = dict(n_iter=n_iter, alphas=ALPHAS, progress_bar=False)
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
        xtr, xte = (x[train] - mu) / sd, (x[test] - mu) / sd
        ym = y[train].mean(0)
        # the same solution: primal when features are fewer than samples, one linear kernel per band otherwise
        if x.shape[1] < len(train):
            model = BandedRidgeCV(groups=groups, cv=5, random_state=seed, solver_params=params)
            model.fit(xtr, y[train] - ym)
            pred = model.predict(xte, split=True)
        else:
            model = MultipleKernelRidgeCV(kernels="precomputed", cv=5, random_state=seed, solver_params=params)
            model.fit(np.stack([xtr[:, groups == b] @ xtr[:, groups == b].T for b in range(len(bands))]), y[train] - ym)
            pred = model.predict(np.stack([xte[:, groups == b] @ xtr[:, groups == b].T for b in range(len(bands))]),
                                 split=True)
        split[:, test] = np.asarray(pred)
        target[test] = y[test] - ym
    shares = np.asarray(r2_score_split(target, split))  # (n_bands, V), sums to the joint R^2
    return _pearson(split.sum(0), target), shares


def rsa_scores(model_feats: np.ndarray, brain: np.ndarray, bootstrap: int = 100, seed: int = 0) -> dict:
    """Spearman correlation of the model RDM of (S, P) features with the brain RDM of (S, V) responses, with a
    bootstrap over stimuli (rsatoolbox): {"rho", "ci_low", "ci_high"}."""
    require("rsatoolbox", "representational similarity analysis (columnformer brain)", "brain")
    import rsatoolbox

    def rdms(a: np.ndarray):
        ds = rsatoolbox.data.Dataset(a, obs_descriptors={"index": np.arange(len(a))})
        return rsatoolbox.rdm.calc_rdm(ds, method="correlation")

    m, b = rdms(model_feats), rdms(brain)
    rho = float(rsatoolbox.rdm.compare(m, b, method="spearman")[0, 0])
    rng_state = np.random.get_state()
    np.random.seed(seed)  # rsatoolbox's bootstrap draws from numpy's global generator
    values = []
    for _ in range(bootstrap):
        mb, idx = rsatoolbox.inference.bootstrap_sample_pattern(m, pattern_descriptor="index")
        bb = b.subsample_pattern("index", idx)
        values.append(float(rsatoolbox.rdm.compare(mb, bb, method="spearman")[0, 0]))
    np.random.set_state(rng_state)
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    lo, hi = (np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan))
    return {"rho": rho, "ci_low": float(lo), "ci_high": float(hi)}


def compare(
    features_dir: str | Path, responses: str | Path | Responses, out: str | Path | None = None, folds: int = 5,
    bootstrap: int = 100, seed: int = 0, figures: bool = True, rsa_stimuli: int = 500, blas_threads: int | None = None,
    banded_iter: int = 0,
) -> dict:
    """Encoding and RSA of one feature export against responses; writes brain.json / brain.md (and figures).

    ``rsa_stimuli``: RDMs are built on at most this many stimuli (a seeded subset; an RDM of S stimuli has
    S(S-1)/2 entries, and each bootstrap sample compares two of them). ``blas_threads``: cap the BLAS threads of
    the fits (threadpoolctl); None leaves them as they are. Small fits (hundreds of stimuli) run 2-4x faster on
    one thread on a 2-core machine (measured in tests/test_brain.py). ``banded_iter`` > 0 adds the banded ridge
    (module docstring) with that many random-search samples of band weights."""
    if banded_iter < 0:
        raise ValueError(f"--banded {banded_iter}: use 0 (off) or a number of random-search samples, e.g. 20")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=blas_threads):
        return _compare(features_dir, responses, out, folds, bootstrap, seed, figures, rsa_stimuli, banded_iter)


def _compare(features_dir, responses, out, folds, bootstrap, seed, figures, rsa_stimuli, banded_iter) -> dict:
    fdir = Path(features_dir)
    if not (fdir / "features.npy").is_file():
        raise FileNotFoundError(f"--features {str(fdir)!r} is not a `columnformer features` folder (no features.npy)")
    feats = np.load(fdir / "features.npy", mmap_mode="r")  # (S, T, N, K)
    areas = np.load(fdir / "areas.npy")
    ids = json.loads((fdir / "stimuli.json").read_text())
    resp = responses if isinstance(responses, Responses) else load_responses(responses)
    where = {s: i for i, s in enumerate(ids)}
    missing = [s for s in resp.stimulus_ids if s not in where]
    if missing:
        raise ValueError(f"{len(missing)} response stimuli are not in the features (e.g. {missing[:3]}); export "
                         "features for the same stimuli (IDs as in the features' stimuli.json)")
    rows = np.array([where[s] for s in resp.stimulus_ids])
    S, T = len(rows), feats.shape[1]
    if S < 2 * folds:
        raise ValueError(f"{S} stimuli are too few for {folds}-fold cross-validation (need >= {2 * folds})")
    y = resp.data.mean(1)  # (S, V) repeat-averaged
    nc = noise_ceiling(resp.data)
    area_ids = sorted(int(a) for a in np.unique(areas))
    scores = np.zeros((len(area_ids), T, y.shape[1]))
    bands = []
    for ai, a in enumerate(area_ids):
        cols = np.flatnonzero(areas == a)
        for t in range(T):
            x = np.asarray(feats[rows, t][:, cols]).reshape(S, -1).astype(np.float64)
            scores[ai, t] = encoding_scores(x, y, folds, seed)
            if banded_iter:
                bands.append(x)
    flat = scores.reshape(-1, y.shape[1])
    best = flat.argmax(0)
    best_area = np.array(area_ids)[best // T]
    best_step = best % T
    regions = sorted(set(resp.regions.tolist()))
    sub = np.sort(np.random.default_rng(seed).permutation(S)[: min(S, rsa_stimuli)])  # RSA's stimuli
    rsa = {}
    for region in regions:
        b = y[np.ix_(sub, resp.regions == region)]
        rsa[region] = [[rsa_scores(np.asarray(feats[rows[sub], t][:, areas == a]).reshape(len(sub), -1), b, bootstrap, seed)
                        for t in range(T)] for a in area_ids]
    result = {
        "features": str(fdir), "stimuli": S, "targets": int(y.shape[1]), "repeats": int(resp.data.shape[1]),
        "areas": area_ids, "steps": T, "folds": folds,
        "noise_ceiling": {"method": "NCSNR (Allen et al. 2022), variance fraction of the repeat mean", "per_target": nc},
        "encoding": {
            "score": "Pearson r, out-of-fold ridge predictions vs repeat-averaged responses",
            "per_area_step_mean": scores.mean(2), "per_target": scores.transpose(2, 0, 1),
            "best_area": best_area, "best_step": best_step, "best_score": flat.max(0),
            "best_normalised": np.where(nc > 0, flat.max(0) ** 2 / np.maximum(nc, 1e-12), np.nan),
        },
        "rsa": {"method": "Spearman between correlation-distance RDMs, bootstrap over stimuli",
                "stimuli": int(len(sub)), "per_region": rsa},
        "regions": {r: int((resp.regions == r).sum()) for r in regions},
    }
    if banded_iter:
        joint, shares = banded_scores(bands, y, folds, seed, banded_iter)
        top = shares.argmax(0)  # bands are ordered area-major, step-minor
        result["banded"] = {
            "method": f"himalaya BandedRidgeCV, one band per (area, step), random search ({banded_iter} samples); "
                      "R^2 split over bands (r2_score_split)",
            "joint_score": joint, "joint_normalised": np.where(nc > 0, joint**2 / np.maximum(nc, 1e-12), np.nan),
            "share_per_area_step_mean": shares.mean(1).reshape(len(area_ids), T),
            "share_per_target": shares.T.reshape(-1, len(area_ids), T),
            "best_area": np.array(area_ids)[top // T], "best_step": top % T,
        }
    out = Path(out) if out is not None else fdir / "brain"
    out.mkdir(parents=True, exist_ok=True)
    from ..analysis.stream import to_builtin

    (out / "brain.json").write_text(json.dumps(to_builtin(result), indent=1))
    (out / "brain.md").write_text(markdown(result, resp.regions))
    if figures:
        _figures(result, resp.regions, out)
    return result


def markdown(result: dict, regions: np.ndarray) -> str:
    enc = result["encoding"]
    lines = [f"Encoding (cross-validated ridge, {result['folds']} folds; {result['stimuli']} stimuli, "
             f"{result['targets']} targets, {result['repeats']} repeats): mean Pearson r per area (rows) and step (columns)",
             "", "| area | " + " | ".join(f"step {t + 1}" for t in range(result["steps"])) + " |",
             "|---|" + "---|" * result["steps"]]
    for a, row in zip(result["areas"], enc["per_area_step_mean"]):
        lines.append(f"| {a} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", "| region | targets | best area (mode) | best step (mode) | mean best r | mean noise ceiling |",
              "|---|---|---|---|---|---|"]
    nc = np.asarray(result["noise_ceiling"]["per_target"], dtype=float)
    for r in sorted(set(regions.tolist())):
        sel = regions == r
        ba = np.bincount(np.asarray(enc["best_area"])[sel]).argmax()
        bs = np.bincount(np.asarray(enc["best_step"])[sel]).argmax() + 1
        ncm = np.nanmean(nc[sel]) if np.isfinite(nc[sel]).any() else float("nan")
        lines.append(f"| {r} | {int(sel.sum())} | {ba} | {bs} | {np.mean(np.asarray(enc['best_score'])[sel]):.3f} | {ncm:.3f} |")
    if "banded" in result:
        band = result["banded"]
        lines += ["", f"Banded ridge (all areas and steps in one model; {band['method']}): mean share of the joint "
                  "out-of-fold R^2 per area (rows) and step (columns)", "",
                  "| area | " + " | ".join(f"step {t + 1}" for t in range(result["steps"])) + " |",
                  "|---|" + "---|" * result["steps"]]
        for a, row in zip(result["areas"], band["share_per_area_step_mean"]):
            lines.append(f"| {a} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines += ["", "| region | joint r (mean) | largest share: area (mode) | step (mode) |", "|---|---|---|---|"]
        for r in sorted(set(regions.tolist())):
            sel = regions == r
            ba = np.bincount(np.asarray(band["best_area"])[sel]).argmax()
            bs = np.bincount(np.asarray(band["best_step"])[sel]).argmax() + 1
            lines.append(f"| {r} | {np.mean(np.asarray(band['joint_score'])[sel]):.3f} | {ba} | {bs} |")
    return "\n".join(lines) + "\n"


def _figures(result: dict, regions: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    m = np.asarray(result["encoding"]["per_area_step_mean"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * m.shape[1], 1.2 + 0.6 * m.shape[0]))
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    ax.set_xticks(range(m.shape[1]), [str(t + 1) for t in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), [str(a) for a in result["areas"]])
    ax.set_xlabel("step")
    ax.set_ylabel("area (layer)")
    fig.colorbar(im, ax=ax, label="mean encoding r")
    fig.tight_layout()
    fig.savefig(fig_dir / "brain_encoding.png", dpi=100)
    plt.close(fig)
    steps = np.asarray(result["encoding"]["best_step"])
    fig, ax = plt.subplots(figsize=(5, 3))
    for r in sorted(set(regions.tolist())):
        ax.hist(steps[regions == r] + 1, bins=np.arange(0.5, result["steps"] + 1.5), alpha=0.6, label=r)
    ax.set_xlabel("best step")
    ax.set_ylabel("targets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "brain_best_step.png", dpi=100)
    plt.close(fig)


def simulate_responses(
    features_dir: str | Path, area: int, step: int, targets: int = 40, snr: float = 1.0, repeats: int = 4,
    seed: int = 0, region: str = "synthetic",
) -> Responses:
    """A synthetic cortex: each target a random linear read-out of the features of one ``area`` at one ``step``
    (0-based), scaled to unit signal variance, plus Gaussian noise of variance 1/snr on every repeat.

    The noise ceiling it implies is (1) / (1 + (1/snr)/repeats) (signal variance 1, noise variance of the mean
    (1/snr)/repeats)."""
    fdir = Path(features_dir)
    feats = np.load(fdir / "features.npy", mmap_mode="r")
    areas = np.load(fdir / "areas.npy")
    ids = json.loads((fdir / "stimuli.json").read_text())
    rng = np.random.default_rng(seed)
    x = np.asarray(feats[:, step][:, areas == area]).reshape(len(ids), -1).astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    signal = x @ rng.standard_normal((x.shape[1], targets))
    signal = (signal - signal.mean(0)) / signal.std(0)
    data = signal[:, None, :] + rng.standard_normal((len(ids), repeats, targets)) / np.sqrt(snr)
    return Responses(data, list(ids), np.full(targets, region))


def _cmd_brain(args) -> int:
    out = args.out or Path(args.run_dir) / "brain" / Path(args.features).name
    resp = load_responses(args.responses)
    result = compare(args.features, resp, out, args.folds, args.bootstrap, args.seed, blas_threads=args.blas_threads,
                     banded_iter=args.banded)
    print(markdown(result, resp.regions))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "brain", help="encoding models and RSA of a feature export against recorded responses",
        description="Cross-validated ridge encoding (himalaya) and RSA (rsatoolbox) of a `columnformer features` "
        "export against responses (stimuli x [repeats x] targets); needs pip install 'columnformer[brain]'.",
    )
    p.add_argument("run_dir", metavar="RUN", help="the run the features come from (results go to RUN/brain/)")
    p.add_argument("--features", required=True, help="a `columnformer features` output folder")
    p.add_argument("--responses", required=True, help=".npz with responses, stimulus_ids[, target_region]")
    p.add_argument("--out", default=None, help="output folder (default RUN/brain/<features folder name>)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds over stimuli (default 5)")
    p.add_argument("--bootstrap", type=int, default=100, help="RSA bootstrap samples over stimuli (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--banded", type=int, default=0, metavar="N",
                   help="also fit one banded ridge on all (area, step) bands, N random-search samples (default 0: off)")
    p.add_argument("--blas-threads", type=int, default=None, help="cap the BLAS threads of the fits (default: unchanged)")
    p.set_defaults(func=_cmd_brain)
