"""Analysis figures (PNG) for any geometry: grids of any shape, one panel per layer for stacks,
an equirectangular lon/lat map for spheres."""

from __future__ import annotations

import math

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .layout import Layout  # noqa: E402

PANEL_IN = 3.0


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _arr(x):
    return np.array([np.nan if v is None else v for v in x], dtype=float) if isinstance(x, list) else np.asarray(x, float)


def attention_vs_distance(trained: dict, init: dict | None, path: Path, title: str = "") -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for res, style, tag in ((trained, "-", ""), (init, "--", " (init)")):
        if res is None:
            continue
        p = res["connectivity"]["attention_vs_distance"]
        x = np.asarray(p["bin_centers"], float)
        for t, (w, m) in enumerate(zip(p["weight"], p["mass"])):
            colour = plt.cm.viridis(t / max(len(p["weight"]) - 1, 1))
            axes[0].plot(x, _arr(w), style, marker="o", ms=3, color=colour, label=f"step {t + 1}{tag}")
            axes[1].plot(x, _arr(m), style, marker="o", ms=3, color=colour, label=f"step {t + 1}{tag}")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean attention weight per connection")
    axes[1].set_ylabel("share of attention mass")
    for ax in axes:
        ax.set_xlabel("distance between columns")
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_title(title or "attention vs distance")
    axes[1].set_title("attention mass vs distance")
    return _save(fig, path)


def locality_wiring(trained: dict, init: dict | None, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for res, style, tag in ((trained, "o-", "trained"), (init, "s--", "init")):
        if res is None:
            continue
        c = res["connectivity"]
        steps = np.arange(1, c["steps"] + 1)
        axes[0].plot(steps, _arr(c["wiring_length"]["per_step"]), style, label=tag)
        axes[1].plot(steps, _arr(c["locality"]["per_step"]), style, label=tag)
    axes[0].set_title("mean wiring length  Σ A·d")
    axes[1].set_title(f"locality (mass within r = {trained['connectivity']['locality']['radius']:g})")
    axes[1].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return _save(fig, path)


def layer_flow(trained: dict, init: dict | None, path: Path) -> str | None:
    f = trained["connectivity"].get("layer_flow")
    if f is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    kinds = ("feedforward", "lateral", "feedback")
    colours = ("tab:blue", "tab:green", "tab:red")
    T = len(f["feedforward"])
    width = 0.38
    for off, res, hatch, tag in ((-width / 2, trained, None, "trained"), (width / 2, init, "//", "init")):
        if res is None:
            continue
        ff = res["connectivity"]["layer_flow"]
        bottom = np.zeros(T)
        for kind, colour in zip(kinds, colours):
            v = _arr(ff[kind])
            axes[0].bar(np.arange(1, T + 1) + off, v, width, bottom=bottom, color=colour, hatch=hatch,
                        label=f"{kind} ({tag})", edgecolor="white" if hatch is None else "black", linewidth=0.3)
            bottom += v
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("share of attention mass")
    axes[0].set_title("flow between layers")
    axes[0].legend(fontsize=7, ncol=2)
    m = np.asarray(f["row_normalised"], float).mean(0)
    im = axes[1].imshow(m, cmap="magma", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(m):
        axes[1].text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    axes[1].set_xticks(range(m.shape[1]))
    axes[1].set_yticks(range(m.shape[0]))
    axes[1].set_xlabel("key layer Lk (read)")
    axes[1].set_ylabel("query layer Lq (reader)")
    axes[1].set_title("mass by layer pair (rows sum to 1, mean over steps)")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    return _save(fig, path)


def _draw_panels(axes, layout: Layout, values: np.ndarray, cmap, vmin, vmax):
    sc = None
    for p, ax in enumerate(axes):
        idx = np.flatnonzero(layout.panel == p)
        if len(idx) == 0:
            ax.axis("off")
            continue
        pts = layout.local[idx]
        lo, hi = pts.min(0) - layout.cell / 2, pts.max(0) + layout.cell / 2
        if layout.projection == "equirectangular":
            lo, hi = np.array([-180.0, -90.0]), np.array([180.0, 90.0])
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1])  # y down
        ax.set_aspect("equal")
        bbox = ax.get_position()
        fig = ax.figure
        pts_per_unit = min(bbox.width * fig.get_figwidth() * 72 / max(hi[0] - lo[0], 1e-9),
                           bbox.height * fig.get_figheight() * 72 / max(hi[1] - lo[1], 1e-9))
        size = (layout.cell * pts_per_unit * 0.95) ** 2
        marker = "o" if layout.projection == "equirectangular" else "s"
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=values[idx], s=max(size, 0.5), marker=marker, cmap=cmap,
                        vmin=vmin, vmax=vmax, linewidths=0)
        ax.set_title(layout.panel_names[p], fontsize=9)
        if layout.projection == "equirectangular":
            ax.set_xlabel("longitude (°)")
            ax.set_ylabel("latitude (°, north up)")
            ax.set_yticks([-90, -45, 0, 45, 90], ["90", "45", "0", "-45", "-90"])
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    return sc


def tmaps(layout: Layout, t: np.ndarray, path: Path, per_row: int = 5, max_classes: int = 10) -> str:
    """Category t-maps (K, N) on a symmetric colour scale: a grid of small maps for a single-panel sheet, one row
    per class (panels = layers) otherwise."""
    t = np.nan_to_num(np.asarray(t, dtype=float))[:max_classes]
    m = max(float(np.abs(t).max()), 1e-9)
    if len(layout.panel_names) > 1:
        return sheet_maps(layout, [(f"t class {c} vs rest", t[c], "RdBu_r", False) for c in range(len(t))], path)
    rows = math.ceil(len(t) / per_row)
    cols = min(len(t), per_row)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 0.8, 2.5 * rows), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.88, top=0.9, bottom=0.03, wspace=0.08, hspace=0.25)
    sc = None
    for c, ax in enumerate(axes.ravel()):
        if c >= len(t):
            ax.axis("off")
            continue
        sc = _draw_panels([ax], layout, t[c], "RdBu_r", -m, m)
        ax.set_title(f"class {c} vs rest", fontsize=9)
    cax = fig.add_axes([0.9, 0.15, 0.02, 0.7])
    fig.colorbar(sc, cax=cax).set_label("Welch t (response to the class vs the rest)", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def sheet_maps(layout: Layout, maps: list[tuple[str, np.ndarray, str, bool]], path: Path) -> str:
    """Rows = maps (title, values (N,), cmap, categorical), columns = panels (layers)."""
    P = len(layout.panel_names)
    wide = 2.0 if layout.projection == "equirectangular" else 1.0
    fig, axes = plt.subplots(len(maps), P, figsize=(PANEL_IN * wide * P + 1.2, PANEL_IN * len(maps)), squeeze=False)
    fig.subplots_adjust(left=0.05, right=0.88, top=0.92, bottom=0.06, wspace=0.15, hspace=0.3)
    for r, (title, values, cmap, categorical) in enumerate(maps):
        v = np.asarray(values, float)
        finite = v[np.isfinite(v)]
        if categorical:
            vmin, vmax = -0.5, max(float(np.nanmax(v)) if finite.size else 0, 9) + 0.5
        else:
            vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        sc = _draw_panels(axes[r], layout, v, cmap, vmin, vmax)
        if sc is not None:
            cax = fig.add_axes([0.9, axes[r][0].get_position().y0, 0.015, axes[r][0].get_position().height])
            fig.colorbar(sc, cax=cax).set_label(title, fontsize=8)
        axes[r][0].set_ylabel(title, fontsize=9) if layout.projection != "equirectangular" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def dprime_by_class(layout: Layout, dprime: np.ndarray, path: Path, max_classes: int = 16) -> str | None:
    K = min(dprime.shape[0], max_classes)
    if K == 0:
        return None
    lim = float(np.nanmax(np.abs(dprime[:K]))) if np.isfinite(dprime[:K]).any() else 1.0
    P = len(layout.panel_names)
    wide = 2.0 if layout.projection == "equirectangular" else 1.0
    fig, axes = plt.subplots(P, K, figsize=(1.6 * wide * K + 1, 1.7 * P + 0.6), squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.92, top=0.9, bottom=0.03, wspace=0.1, hspace=0.25)
    sc = None
    for k in range(K):
        for p in range(P):
            ax = axes[p][k]
            sub = Layout(layout.local, layout.xy, np.where(layout.panel == p, 0, -1), [layout.panel_names[p]],
                         layout.panel_boxes, layout.cell, layout.projection)
            sc = _draw_panels([ax], sub, dprime[k], "RdBu_r", -lim, lim) or sc
            ax.set_title(f"class {k}" if p == 0 else "", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("")
            ax.set_ylabel(layout.panel_names[p] if k == 0 else "", fontsize=7)
    if sc is not None:
        fig.colorbar(sc, cax=fig.add_axes([0.94, 0.1, 0.012, 0.75])).set_label("d′", fontsize=8)
    fig.suptitle("selectivity d′ per column per class (class vs rest)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def smoothness(trained: dict, init: dict | None, path: Path) -> str:
    t = trained["topography"]
    panels = [("smoothness", "tuning similarity (class-profile correlation)")]
    if t.get("weight_similarity"):
        panels.append(("weight_similarity", "weight similarity (cosine, centred)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for res, style, tag in ((trained, "o-", "trained"), (init, "s--", "init")):
            if res is None or not res["topography"].get(key):
                continue
            s = res["topography"][key]
            prof = s["profile"]
            label = f"{tag}: index {s['smoothness']:.3f}" if s.get("smoothness") is not None else tag
            ax.plot(prof["bin_centers"], _arr(prof["mean"]), style, ms=3, label=label)
            if tag == "trained" and s.get("shuffled_profile"):  # the shuffled-position null as a band
                null = s["shuffled_profile"]
                ax.fill_between(prof["bin_centers"], _arr(null["lo"]), _arr(null["hi"]), color="grey", alpha=0.25,
                                label="shuffled positions (95%)")
            if tag == "trained" and s.get("shuffled_mean") is not None:
                ax.axhline(s["mean_similarity"], color="grey", lw=0.8, ls=":")
                ax.text(0.98, 0.02, f"shuffled-position control: {s['shuffled_mean']:.3f} ± {s['shuffled_std'] or 0:.3f}",
                        transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
        info = t[key]["pairs"]
        ax.set_title(f"{title}\n{info['pairs']} pairs{' (all)' if info['exhaustive'] else ' (sampled)'}", fontsize=9)
        ax.set_xlabel("distance between columns")
        ax.set_ylabel("mean similarity")
        ax.legend(fontsize=7)
    return _save(fig, path)


def degrees(trained: dict, init: dict | None, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for res, style, tag in ((trained, "o-", "trained"), (init, "s--", "init")):
        if res is None:
            continue
        g = res["connectivity"]["graph"]
        h = np.asarray(g["degree_histogram"], float)
        if h.sum() > 0:
            ax.plot(np.arange(len(h)), h / h.sum(), style, ms=3,
                    label=f"{tag}: Q={g['modularity']:.2f}, σ={g['small_world']['sigma'] or float('nan'):.2f}")
    ax.set_xlabel("degree in the strong-connection graph")
    ax.set_ylabel("fraction of columns")
    ax.set_title(trained["connectivity"]["graph"]["criterion"], fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def learned_positions(arrays: dict, layers: np.ndarray | None, path: Path) -> str:
    """Where learned columns started (grey) and where they are (colour: distance moved), first two axes, per layer."""
    import matplotlib.pyplot as plt

    pos, start = arrays["positions"], arrays["initial_positions"]
    layers = np.zeros(len(pos), dtype=int) if layers is None else np.asarray(layers)
    panels = sorted(set(layers.tolist()))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    shift = np.linalg.norm(pos - start, axis=1)
    for ax, layer in zip(axes[0], panels):
        m = layers == layer
        ax.scatter(start[m, 0], start[m, 1], s=14, c="0.75", label="start")
        for a, b in zip(start[m], pos[m]):
            ax.plot([a[0], b[0]], [a[1], b[1]], color="0.6", lw=0.6)
        sc = ax.scatter(pos[m, 0], pos[m, 1], s=18, c=shift[m], cmap="viridis", vmin=0, vmax=max(shift.max(), 1e-9))
        ax.set_title(f"layer {layer}" if len(panels) > 1 else "learned positions", fontsize=9)
        ax.set_aspect("equal")
    fig.colorbar(sc, ax=axes[0, -1], shrink=0.8, label="distance moved")
    return _save(fig, path)


def analysis_figures(out: dict, arrays: dict, layout: Layout, fig_dir: Path) -> list[str]:
    """Write every analysis figure into ``fig_dir``; return their file names."""
    fig_dir = Path(fig_dir)
    trained, init = out["trained"], out.get("init")
    names = [
        attention_vs_distance(trained, init, fig_dir / "attention_vs_distance.png", out["model"]["geometry"]["name"]),
        locality_wiring(trained, init, fig_dir / "locality_wiring.png"),
        layer_flow(trained, init, fig_dir / "layer_flow.png"),
        sheet_maps(
            layout,
            [
                ("wiring length Σ A·d (mean over steps)", arrays["column_wiring_length"].mean(0), "viridis", False),
                ("preferred class (max d′)", arrays["preferred_class"], "tab10", True),
                ("max d′", arrays["max_dprime"], "magma", False),
            ],
            fig_dir / "sheet_maps.png",
        ),
        dprime_by_class(layout, arrays["dprime"], fig_dir / "dprime_by_class.png"),
        smoothness(trained, init, fig_dir / "smoothness.png"),
        degrees(trained, init, fig_dir / "degree_distribution.png"),
    ]
    if "tmap" in arrays:  # category selectivity t-maps (patches: analysis.json topography.category_patches)
        names.append(tmaps(layout, arrays["tmap"], fig_dir / "category_tmaps.png"))
    if "positions" in arrays:  # learned geometry
        names.append(learned_positions(arrays, arrays.get("position_layer"), fig_dir / "learned_positions.png"))
    if "halt_steps" in arrays:  # adaptive computation: where on the sheet computation lingers
        names.append(sheet_maps(
            layout, [(f"mean steps run before halting (max {trained['halting']['max_steps']})", arrays["halt_steps"],
                      "viridis", False)], fig_dir / "halting_steps.png",
        ))
    if "expert_coef" in arrays:  # weight banks: the experts' maps on the sheet
        c = arrays["expert_coef"]
        maps = [("dominant expert", c.argmax(1), "tab10", True)]
        maps += [(f"expert {e} coefficient", c[:, e], "magma", False) for e in range(min(c.shape[1], 7))]
        names.append(sheet_maps(layout, maps, fig_dir / "expert_maps.png"))
    return [n for n in names if n]
