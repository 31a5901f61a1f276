"""`columnformer analyze RUN_DIR`: what did the sheet learn?

One streaming pass over a data split (default ``val``) of the trained model, and one of the same
model at initialisation (built from the run's config with the run's seed, as the trainer does),
give:

* connectivity: mean attention per edge per step, attention vs distance, mean wiring length
  (``sum A*d``), locality index (share of attention mass within ``radius``), the flow between
  layers of stacked sheets (feed-forward / lateral / feedback), and graph summaries of the strong
  connections (degrees, Louvain modularity, clustering, path length, small-world sigma vs
  degree-matched random graphs);
* topography: per-class mean response of each column at the final step (the norm of its state by
  default), d' selectivity per column per class, tuning smoothness vs distance with a shuffled-position
  control, and for untied sheets the similarity of the columns' weights vs distance.

Writes ``RUN_DIR/analysis.json`` (all numbers), ``RUN_DIR/analysis_arrays.npz`` (per-column
arrays, top-M incoming edges per column per step) and ``RUN_DIR/figures/analysis/*.png``.
Pair metrics use a seeded sample of pairs above ``max_pairs`` (the sample size is recorded).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .connectivity import (
    attention_vs_distance,
    column_wiring_length,
    edge_distances,
    edge_mask,
    edge_sources,
    layer_flow,
    locality_index,
    top_incoming,
    wiring_length,
)
from ..regularizers import SparsityStats
from .graph import strong_graph_summary
from .patches import category_patches
from .stream import collect, to_builtin
from .topography import smoothness, weight_similarity

ANALYSIS_SCHEMA_VERSION = 2  # 2: activation sparsity per step ('activity')
JSON_TOP_INCOMING_MAX_N = 4096  # above this the top-M edges live only in analysis_arrays.npz
JSON_PER_COLUMN_MAX_N = 4096


@dataclass
class AnalysisOptions:
    split: str = "val"
    max_batches: int | None = None
    batch_size: int | None = None  # None: the run's eval batch size
    radius: float = 1.5  # locality radius and "near" radius of the smoothness index (geometry units)
    bins: int = 12
    max_pairs: int = 20_000
    n_shuffles: int = 20
    edges_per_column: float = 4.0  # strong graph: round(edges_per_column * N) heaviest directed edges
    n_random: int = 3  # random reference graphs for small-world sigma
    top_m: int = 16
    seed: int = 0
    init: bool = True  # also analyse the untrained model
    response: str = "norm"
    checkpoint: str = "last"
    figures: bool = True
    patch_threshold: float = 3.0  # category patches: smoothed Welch t above this (analysis/patches.py)
    patch_sigma: float = 1.0  # smoothing of the t-maps (geometry units; 0: none)
    patch_min_size: int = 3  # columns


def _mean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if x.size and np.isfinite(x).any() else None


def analyze_model(
    model, loader, num_classes: int, opts: AnalysisOptions, device: str = "cpu", labels_of=None
) -> tuple[dict, dict]:
    """All metrics of one model on one loader. Returns (JSON-ready results, per-column arrays).

    ``labels_of(batch)``: the class of each sample for the topography (default: the batch's labels)."""
    t0 = time.perf_counter()
    model.sheet.sync_geometry()  # learned positions: distances and maps use where the columns are now
    extra = {} if labels_of is None else {"labels_of": labels_of}
    col = collect(model, loader, num_classes, device, opts.max_batches, opts.response, **extra)
    sheet = model.sheet
    geometry = sheet.geometry
    A = col.mean_attn  # (T, N, E)
    dist, mask, sources = edge_distances(sheet), edge_mask(sheet), edge_sources(sheet)
    sparse = sheet.edge_index is not None
    mask_arg = mask if sparse else None
    T, N, E = A.shape

    wl = wiring_length(A, dist, mask_arg)
    loc = locality_index(A, dist, opts.radius, mask_arg)
    prof = attention_vs_distance(A, dist, mask, bins=opts.bins)
    conn = {
        "steps": T,
        "kind": "sparse" if sparse else "dense",
        "edges_per_column": int(mask.sum(1).mean()),
        "wiring_length": {"per_step": wl, "mean": _mean(wl), "units": "geometry distance, sum_k A[q,k] d(q,k) averaged over queries"},
        "wiring_cost_normalised": {
            "per_step": wl / geometry.mean_distance_power(1.0),
            "note": "wiring length / mean(D) (the training wiring cost for p=1)",
        },
        "locality": {"radius": opts.radius, "per_step": loc, "mean": _mean(loc)},
        "attention_vs_distance": prof,
    }
    if geometry.num_layers > 1:
        flow = layer_flow(A, geometry.layer, sources, mask_arg)
        conn["layer_flow"] = {
            **flow,
            "mean": {k: _mean(flow[k]) for k in ("feedforward", "lateral", "feedback")},
            "convention": "matrix[t, Lq, Lk]: share of step-t attention mass of queries in layer Lq reading keys in "
            "layer Lk; feed-forward Lk < Lq, lateral Lk == Lq, feedback Lk > Lq",
        }
    conn["graph"] = strong_graph_summary(A.mean(0), sources, mask_arg, opts.edges_per_column, opts.seed, opts.n_random)

    stats = col.responses
    dprime = stats.dprime()  # (K, N)
    class_means = stats.class_means  # (K, N)
    with np.errstate(all="ignore"):
        best = np.nanmax(np.where(np.isfinite(dprime), dprime, -np.inf), axis=0)
        pref = np.nanargmax(np.where(np.isfinite(dprime), dprime, -np.inf), axis=0)
    best = np.where(np.isfinite(best), best, np.nan)
    pair_kw = dict(max_pairs=opts.max_pairs, seed=opts.seed, near=opts.radius, n_shuffles=opts.n_shuffles, bins=opts.bins)
    topo = {
        "response": f"{opts.response} of each column's state at the final step",
        "samples": col.samples,
        "num_classes": num_classes,
        "dprime": {
            "mean_abs": _mean(np.abs(dprime)),
            "max_per_column_mean": _mean(best),
            "fraction_columns_max_above_1": float(np.mean(best > 1.0)) if N else None,
            "preferred_class_histogram": np.bincount(pref, minlength=num_classes)[:num_classes],
        },
        "smoothness": smoothness(class_means.T, geometry, **pair_kw),
        "weight_similarity": weight_similarity(sheet, **pair_kw),
    }
    if num_classes > 1:  # category selectivity t-maps and contiguous selective patches
        per_class, tmap = category_patches(
            stats.count, stats.sum, stats.sumsq, geometry, threshold=opts.patch_threshold, sigma=opts.patch_sigma,
            min_size=opts.patch_min_size,
        )
        topo["category_patches"] = {
            "total": int(sum(v["count"] for v in per_class.values())),
            "classes_with_patches": int(sum(v["count"] > 0 for v in per_class.values())),
            "per_class": per_class,
            "note": "Welch t of each column's response to a class vs the rest, smoothed, thresholded and joined "
            "into contiguous patches (analysis/patches.py)",
        }
    if N <= JSON_PER_COLUMN_MAX_N:
        topo["dprime"]["per_class_per_column"] = dprime
        topo["class_means"] = class_means
    top_src, top_w = top_incoming(A, sources, opts.top_m, mask)
    arrays = {
        "top_src": top_src.astype(np.int32),
        "top_weight": top_w,
        "column_wiring_length": column_wiring_length(A, dist, mask_arg).astype(np.float32),  # (T, N)
        "dprime": dprime.astype(np.float32),
        "class_means": class_means.astype(np.float32),
        "preferred_class": pref.astype(np.int32),
        "max_dprime": best.astype(np.float32),
    }
    if num_classes > 1:
        arrays["tmap"] = tmap.astype(np.float32)
    results = {
        "data": {"samples": col.samples, "batches": col.batches, "accuracy": col.accuracy},
        "connectivity": conn,
        "topography": topo,
    }
    results["activity"] = {
        "sparsity_per_step": col.sparsity,
        "final_step": {k: v[-1] for k, v in col.sparsity.items()},
        "note": "activation sparsity of the column states |x| over units = (column, channel): near_zero = fraction "
        f"with |x| < {SparsityStats().tol} rms of its stimulus; hoyer and population sparseness per stimulus; lifetime sparseness "
        "per unit over the split (regularizers.py); 0 dense .. 1 sparse",
    }
    if sheet.positions is not None:  # learned geometry: how far the columns moved
        pos, start = geometry.coords, sheet.initial_geometry.coords
        shift = np.linalg.norm(pos - start, axis=1)
        iu = np.triu_indices(N, 1)
        arrays["positions"], arrays["initial_positions"] = pos.astype(np.float32), start.astype(np.float32)
        arrays["position_layer"] = geometry.layer.astype(np.int32)
        results["positions"] = {
            "mean_shift": _mean(shift), "max_shift": float(shift.max()),
            "mean_shift_per_axis": np.abs(pos - start).mean(0),
            "min_spacing": float(geometry.pair_distances(*iu).min()) if N > 1 else None,
            "initial_min_spacing": sheet.min_spacing,
            "note": "learned column coordinates vs where they started (geometry units); distances above use the learned ones",
        }
    if col.halt_steps is not None:  # adaptive computation: where on the sheet computation lingers
        arrays["halt_steps"] = col.halt_steps.astype(np.float32)
        results["halting"] = {
            "mode": sheet.cfg.halting, "max_steps": T, "mean_steps": _mean(col.halt_steps),
            "min_column_steps": float(col.halt_steps.min()), "max_column_steps": float(col.halt_steps.max()),
            "note": "steps each column ran before halting, averaged over the split's samples",
        }
    if col.expert_coef is not None:  # weight banks: which expert each column uses
        c = col.expert_coef
        arrays["expert_coef"] = c.astype(np.float32)
        results["mixture"] = {
            "mode": sheet.cfg.mixture, "experts": int(c.shape[1]),
            "load": c.mean(0), "dominant_expert_histogram": np.bincount(c.argmax(1), minlength=c.shape[1]),
            "column_entropy_mean": _mean(-(np.where(c > 0, c * np.log(np.maximum(c, 1e-30)), 0.0)).sum(1)),
            "note": "mean mixing coefficients of the last block's weight bank (dynamic: averaged over samples)",
        }
    results["seconds"] = time.perf_counter() - t0
    return results, arrays


def init_model(cfg):
    """The run's model at initialisation: same config and seed, same construction order as the trainer."""
    from ..runtime import seed_everything
    from ..tasks import build_task

    seed_everything(cfg.train.seed)
    task = build_task(cfg.task, cfg.model)
    task.datasets(cfg.data, cfg.model, seed=cfg.train.seed)  # the trainer builds the data first
    model = task.build_model()
    model.eval()
    return model


def _loader(cfg, split: str, batch_size: int | None):
    from torch.utils.data import DataLoader

    from ..tasks import build_task

    sets = build_task(cfg.task, cfg.model).datasets(cfg.data, cfg.model, seed=cfg.train.seed)
    if split not in sets:
        raise ValueError(f"split {split!r} not in this dataset; available: {', '.join(sets)}")
    return DataLoader(sets[split], batch_size=batch_size or cfg.train.eval_batch_size, shuffle=False)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stale_reason(data: dict, run_dir: str | Path, opts: AnalysisOptions) -> str | None:
    """Why an analysis.json no longer answers for ``run_dir`` with ``opts`` (None: it does).

    It must have been made from the checkpoint file the run holds now (same bytes: a run that trained on,
    was resumed or replaced has another) and with the split and checkpoint choice that ``opts`` ask for.
    """
    made = data.get("made_from")
    if not isinstance(made, dict):
        return "it does not record what it was made from (an older version wrote it)"
    if data.get("schema_version") != ANALYSIS_SCHEMA_VERSION:
        return f"an older version wrote it (schema {data.get('schema_version')}, now {ANALYSIS_SCHEMA_VERSION})"
    if made.get("split") != opts.split:
        return f"it was made on the {made.get('split')!r} split, {opts.split!r} is asked"
    if made.get("requested_checkpoint") != opts.checkpoint:
        return f"it was made from the {made.get('requested_checkpoint')!r} checkpoint, {opts.checkpoint!r} is asked"
    path = Path(run_dir) / "checkpoints" / f"{made.get('checkpoint')}.pt"
    if not path.is_file() or _sha256(path) != made.get("sha256"):
        return f"the run's checkpoint {path.name} changed since (the run went on or was replaced)"
    return None


def current_analysis(run_dir: str | Path, opts: AnalysisOptions | None = None, quiet: bool = True) -> dict:
    """The run's analysis.json if it still answers for the run and ``opts`` (see :func:`stale_reason`);
    otherwise the run is analysed again (saying why) and the new results are returned."""
    opts = opts or AnalysisOptions()
    run_dir = Path(run_dir)
    path = run_dir / "analysis.json"
    if path.is_file() and (run_dir / "analysis_arrays.npz").is_file():
        data = json.loads(path.read_text())
        why = stale_reason(data, run_dir, opts)
        if why is None:
            return data
        print(f"note: analysing {run_dir} again: its analysis.json is stale ({why})", file=sys.stderr)
    return analyze_run(run_dir, opts, quiet=quiet)


def analyze_run(run_dir: str | Path, opts: AnalysisOptions | None = None, quiet: bool = False) -> dict:
    """Analyse a run directory; write analysis.json, analysis_arrays.npz and figures; return the results."""
    from ..config import config_to_dict
    from ..factory import count_parameters
    from ..run import load_run

    opts = opts or AnalysisOptions()
    run_dir = Path(run_dir)
    run = load_run(run_dir, checkpoint=opts.checkpoint)
    cfg = run.config
    torch.manual_seed(opts.seed)
    loader = _loader(cfg, opts.split, opts.batch_size)
    from ..tasks import build_task

    task = build_task(cfg.task, cfg.model)
    num_classes = task.analysis_classes
    model = run.model
    sheet = model.sheet
    from .layout import sheet_layout

    trained, arrays = analyze_model(model, loader, num_classes, opts, labels_of=task.analysis_labels)
    layout = sheet_layout(sheet.geometry)  # after analyze_model synced learned positions: drawn where columns are now
    out = {
        "schema_version": ANALYSIS_SCHEMA_VERSION,
        "run": str(run_dir),
        "name": cfg.name,
        "checkpoint": run.checkpoint,
        "split": opts.split,
        "made_from": {  # what decides whether this analysis still answers (stale_reason)
            "checkpoint": run.checkpoint, "requested_checkpoint": opts.checkpoint, "split": opts.split,
            "sha256": _sha256(run_dir / "checkpoints" / f"{run.checkpoint}.pt"),
        },
        "options": asdict(opts),
        "model": {
            "num_params": count_parameters(model),
            "columns": sheet.n,
            "geometry": sheet.geometry.to_dict(),
            "connectivity": sheet.connectivity.kind,
            "steps": sheet.cfg.steps,
            "recurrent": sheet.cfg.recurrent,
            "untied": bool(sheet.cfg.untied_attn or sheet.cfg.untied_mlp),
            "wiring_lambda": cfg.train.wiring_lambda,
            "layout": layout.to_dict(),
        },
        "summary": run.summary,
        "trained": trained,
    }
    init_arrays = None
    if opts.init:
        init_results, init_arrays = analyze_model(init_model(cfg), loader, num_classes, opts, labels_of=task.analysis_labels)
        out["init"] = init_results
        out["init"]["note"] = "model built from the run's config with train.seed (untrained weights)"
    out["headline"] = headline(out)
    if sheet.n <= JSON_TOP_INCOMING_MAX_N:
        out["top_incoming"] = {
            "m": int(arrays["top_src"].shape[-1]),
            "src": arrays["top_src"],
            "weight": arrays["top_weight"],
            "layout": "[step][column][rank], strongest first; src -1 = no edge",
        }
    else:
        out["top_incoming"] = {"m": int(arrays["top_src"].shape[-1]), "file": "analysis_arrays.npz"}
    npz = {k: v for k, v in arrays.items()}
    if init_arrays is not None:
        npz.update({f"init_{k}": v for k, v in init_arrays.items()})
    np.savez_compressed(run_dir / "analysis_arrays.npz", **npz)
    out["config"] = config_to_dict(cfg)
    if opts.figures:
        from .figures import analysis_figures

        out["figures"] = analysis_figures(out, npz, layout, run_dir / "figures" / "analysis")
    data = to_builtin(out)
    tmp = run_dir / "analysis.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(run_dir / "analysis.json")
    if not quiet:
        print(format_headline(data))
    return data


def headline(out: dict) -> dict:
    """The few numbers `compare` and the report put first."""
    t = out["trained"]
    c, g, topo = t["connectivity"], t["connectivity"]["graph"], t["topography"]
    h = {
        "test_acc": (out.get("summary") or {}).get("test_acc"),
        "split_acc": t["data"]["accuracy"],
        "num_params": out["model"]["num_params"],
        "wiring_length": c["wiring_length"]["mean"],
        "locality": c["locality"]["mean"],
        "smoothness": topo["smoothness"].get("smoothness"),
        "smoothness_shuffled": topo["smoothness"].get("shuffled_mean"),
        "weight_smoothness": (topo["weight_similarity"] or {}).get("smoothness"),
        "modularity": g["modularity"],
        "small_world_sigma": g["small_world"]["sigma"],
        "mean_abs_dprime": topo["dprime"]["mean_abs"],
    }
    final = (t.get("activity") or {}).get("final_step") or {}
    h.update({f"{k}_final": final[k] for k in ("near_zero", "hoyer", "lifetime_sparseness") if k in final})
    if "layer_flow" in c:
        h.update({f"flow_{k}": v for k, v in c["layer_flow"]["mean"].items()})
    if "init" in out:
        ic = out["init"]["connectivity"]
        h["init_wiring_length"] = ic["wiring_length"]["mean"]
        h["init_locality"] = ic["locality"]["mean"]
        h["init_modularity"] = ic["graph"]["modularity"]
    return h


def format_headline(data: dict) -> str:
    lines = [f"analysis of {data['run']} ({data['split']} split, {data['trained']['data']['samples']} samples)"]
    for k, v in data["headline"].items():
        lines.append(f"  {k:<22} {v:.4g}" if isinstance(v, float) else f"  {k:<22} {v}")
    lines.append(f"  wrote {Path(data['run']) / 'analysis.json'}")
    return "\n".join(lines)
