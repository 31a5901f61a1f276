"""Orientation maps of a grid sheet: gratings in, preferred orientation / OSI / pinwheels / map spectrum out.

    columnformer orientation runs/v1            # writes runs/v1/brain/orientation/ (report shows it)

Stimuli: static sinusoidal gratings at ``orientations`` angles in [0, pi), ``frequencies`` (cycles per pixel) and
``phases``, full contrast, in the run's pixel normalisation. A column's response to a stimulus is the L2 distance of
its state (at ``step``) from its state for a uniform grey image (so the position embedding's baseline does not
count). Per column: the spatial frequency with the largest mean response; at it, the tuning curve R(theta) (mean
over phases); preferred orientation ``theta* = arg(sum R e^{2i theta}) / 2`` and the vector-sum OSI
``|sum R e^{2i theta}| / sum R`` (1 - circular variance; 0 untuned, 1 one orientation only).

Map statistics (per grid layer; a sheet with learned positions is resampled onto its layers' grids, spread over
where the columns are, by linear interpolation): the complex map ``z = OSI e^{2i theta*}``; pinwheels are the plaquettes of 2x2
neighbouring columns around which theta* turns by +-pi (the winding of arg z is +-2 pi); the map's wavelength
Lambda is 1 / the power-weighted mean spatial frequency of z (mean removed); pinwheel density = pinwheels per
Lambda^2 (cortex: ~pi, Kaschube et al. 2010). Null: phase-randomised maps (same amplitude spectrum, uniform random
Fourier phases) give the density expected from the spectrum alone (band-pass noise gives ~pi too: the comparison
says whether the sheet's pinwheels are more or fewer than its spectrum implies); a block bootstrap over tiles of the
map about one wavelength wide gives the observed density's confidence interval.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch


# ------------------------------------------------------------------------------------------- stimuli and tuning
def gratings(size: tuple[int, int], orientations: int = 8, frequencies=(0.0625, 0.125, 0.25), phases: int = 4,
             channels: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """Gratings (M, C, H, W) in [0, 1] pixels and their parameters (M, 3): orientation, frequency, phase."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    imgs, params = [], []
    for f in frequencies:
        for o in range(orientations):
            theta = math.pi * o / orientations
            for p in range(phases):
                phase = 2 * math.pi * p / phases
                g = 0.5 + 0.5 * np.cos(2 * math.pi * f * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
                imgs.append(np.repeat(g[None], channels, 0))
                params.append((theta, f, phase))
    return torch.tensor(np.stack(imgs), dtype=torch.float32), np.array(params)


def tuning(responses: np.ndarray, params: np.ndarray) -> dict[str, np.ndarray]:
    """responses (M, N) to the gratings of ``params`` -> per column: preferred orientation, OSI, best frequency,
    and the tuning curves (O, N) at each column's best frequency (mean over phases)."""
    thetas, freqs = np.unique(params[:, 0]), np.unique(params[:, 1])
    mean = np.zeros((len(freqs), len(thetas), responses.shape[1]))
    for i, f in enumerate(freqs):
        for j, t in enumerate(thetas):
            sel = (params[:, 1] == f) & (params[:, 0] == t)
            mean[i, j] = responses[sel].mean(0)
    best = mean.mean(1).argmax(0)  # (N,)
    curves = mean[best, :, np.arange(responses.shape[1])].T  # (O, N)
    pref, osi = preferred_orientation(curves, thetas)
    return {"preferred": pref, "osi": osi, "best_frequency": freqs[best], "curves": curves, "orientations": thetas}


def preferred_orientation(curves: np.ndarray, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tuning curves (O, N) of non-negative responses at angles ``thetas`` -> (theta* in [0, pi), vector-sum OSI)."""
    vec = (curves * np.exp(2j * thetas)[:, None]).sum(0)
    total = curves.sum(0)
    osi = np.divide(np.abs(vec), total, out=np.zeros(len(total)), where=total > 0)
    return np.mod(np.angle(vec) / 2, math.pi), osi


# ------------------------------------------------------------------------------------------- maps
def pinwheels(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pinwheel centres of a complex orientation map z (H, W) (z = r e^{2i theta}): plaquettes whose winding of
    arg z is +-2 pi. Returns their (row + 0.5, col + 0.5) positions (P, 2) and signs (P,)."""
    ang = np.angle(z)
    loop = [ang[:-1, :-1], ang[:-1, 1:], ang[1:, 1:], ang[1:, :-1]]
    wind = sum(np.angle(np.exp(1j * (loop[(k + 1) % 4] - loop[k]))) for k in range(4))
    charge = np.rint(wind / (2 * math.pi)).astype(int)
    rows, cols = np.nonzero(charge)
    return np.stack([rows + 0.5, cols + 0.5], 1), charge[rows, cols]


def radial_spectrum(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of z (mean removed): spatial frequencies (cycles per column) and power."""
    h, w = z.shape
    p = np.abs(np.fft.fft2(z - z.mean())) ** 2
    ky, kx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    k = np.sqrt(kx**2 + ky**2)
    step = 1.0 / max(h, w)
    bins = np.arange(step / 2, k.max() + step, step)
    idx = np.digitize(k.ravel(), bins)
    freqs, power = [], []
    for b in range(1, len(bins)):
        sel = idx == b
        if sel.any():
            freqs.append(k.ravel()[sel].mean())
            power.append(p.ravel()[sel].mean())
    return np.array(freqs), np.array(power)


def map_wavelength(z: np.ndarray) -> float:
    """The map's wavelength Lambda (columns per cycle): 1 / the power-weighted mean spatial frequency of the map
    (Kaschube et al. 2010's spectral mean; robust where the spectrum has no single sharp peak)."""
    f, p = radial_spectrum(z)
    w = p * (f > 0)
    return float(1.0 / (np.sum(w * f) / max(np.sum(w), 1e-300)))


def pinwheel_density(z: np.ndarray, wavelength: float | None = None) -> float:
    """Pinwheels per Lambda^2 (Lambda: ``wavelength`` or the map's own)."""
    lam = map_wavelength(z) if wavelength is None else wavelength
    area = (z.shape[0] - 1) * (z.shape[1] - 1)  # the plaquettes' area, in column spacings squared
    return len(pinwheels(z)[1]) * lam**2 / area


def phase_randomised(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A map with z's amplitude spectrum and uniformly random Fourier phases."""
    amp = np.abs(np.fft.fft2(z - z.mean()))
    return np.fft.ifft2(amp * np.exp(2j * math.pi * rng.random(z.shape)))


def map_statistics(z: np.ndarray, n_null: int = 200, seed: int = 0) -> dict:
    """Pinwheel count and density of z, its wavelength, and the phase-randomised null (mean, 2.5 / 97.5 %)."""
    rng = np.random.default_rng(seed)
    lam = map_wavelength(z)
    null = np.array([pinwheel_density(phase_randomised(z, rng), lam) for _ in range(n_null)])
    return {
        "pinwheels": int(len(pinwheels(z)[1])), "wavelength": lam, "density": pinwheel_density(z, lam),
        "null_density_mean": float(null.mean()) if n_null else None,
        "null_density_ci95": [float(np.percentile(null, 2.5)), float(np.percentile(null, 97.5))] if n_null else None,
    }


def grid_resample(xy: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Values at scattered positions ``xy`` (N, 2) resampled onto an ``shape`` grid spanning their bounding box
    (linear interpolation of real and imaginary parts, nearest value outside the convex hull); row-major (h*w,)."""
    from scipy.interpolate import griddata

    h, w = shape
    lo, hi = xy.min(0), xy.max(0)
    gy, gx = np.meshgrid(np.linspace(lo[0], hi[0], h), np.linspace(lo[1], hi[1], w), indexing="ij")
    pts = np.stack([gy.ravel(), gx.ravel()], 1)
    out = np.zeros(len(pts), dtype=complex)
    for part, unit in ((values.real, 1.0), (values.imag, 1j)):
        lin = griddata(xy, part, pts, method="linear")
        near = griddata(xy, part, pts, method="nearest")
        out += unit * np.where(np.isnan(lin), near, lin)
    return out


# ------------------------------------------------------------------------------------------- a run
@torch.no_grad()
def grating_responses(model, images: torch.Tensor, blank: torch.Tensor, step: int | None = None, batch: int = 64) -> np.ndarray:
    """(M, N) responses: distance of each column's state (step ``step``, default the last) from its blank-image state."""
    def states(x):
        out = []
        for s in range(0, len(x), batch):
            _, trace = model(x[s : s + batch], record=("features",))
            out.append(trace.features[-1 if step is None else step - 1].float())  # (b, N, C)
        return torch.cat(out)

    base = states(blank)  # (1, N, C)
    return (states(images) - base).norm(dim=-1).numpy()


def analyze_orientation(run_dir, out_dir=None, step: int | None = None, orientations: int = 8,
                        frequencies=(0.0625, 0.125, 0.25), phases: int = 4, n_null: int = 200, n_boot: int = 200,
                        seed: int = 0, at_init: bool = False) -> dict:
    """Orientation tuning and maps of a run's grid sheet; writes ``RUN/brain/orientation/`` (json, brain.md, figures).
    ``at_init``: the run's model at initialisation (same config and seed), written to ``RUN/brain/orientation-init/``."""
    from ..run import load_run, read_run_config
    from ..tasks import build_task
    from .analyze import init_model

    if at_init:
        cfg = read_run_config(run_dir)
        model = init_model(cfg)
    else:
        run = load_run(run_dir)
        model, cfg = run.model.eval(), run.config
    geometry = model.sheet.initial_geometry  # learned positions: their values are interpolated back onto this grid
    learned = model.sheet.positions is not None
    if geometry.layer_shapes is None:
        raise ValueError(f"orientation maps need grid layers; {geometry.name} has none (a sphere or free coordinates)")
    if step is not None and not 1 <= step <= model.sheet.cfg.steps:
        raise ValueError(f"--step {step}: the sheet runs steps 1..{model.sheet.cfg.steps}")
    sets = build_task(cfg.task, cfg.model).datasets(cfg.data, cfg.model, seed=cfg.train.seed)
    norm = getattr(sets["train"], "pixel_norm", None)
    mean, std = norm if norm is not None else (torch.zeros(cfg.model.in_chans, 1, 1), torch.ones(cfg.model.in_chans, 1, 1))
    imgs, params = gratings(tuple(cfg.model.image_size), orientations, frequencies, phases, cfg.model.in_chans)
    x = (imgs - mean) / std
    blank = (torch.full((1, *imgs.shape[1:]), 0.5) - mean) / std
    resp = grating_responses(model, x, blank, step)  # (M, N)
    tun = tuning(resp, params)
    results = {"run": str(run_dir), "weights": "initialisation" if at_init else "trained",
               "step": step or model.sheet.cfg.steps, "stimuli": int(len(params)),
               "orientations": orientations, "frequencies": list(frequencies), "phases": phases,
               "osi_median": float(np.median(tun["osi"])), "osi_mean": float(tun["osi"].mean()),
               "osi_quartiles": np.percentile(tun["osi"], [25, 75]).tolist(), "layers": []}
    rng = np.random.default_rng(seed)
    maps = []
    for layer, (h, w) in enumerate(geometry.layer_shapes):
        idx = geometry.layer_indices(layer)  # row-major
        z = tun["osi"][idx] * np.exp(2j * tun["preferred"][idx])
        if learned:  # the columns moved: resample the map at the layer's grid points spread over the moved positions
            z = grid_resample(model.sheet.positions.detach().double().numpy()[idx, :2], z, (h, w))
        z = z.reshape(h, w)
        stats = map_statistics(z, n_null, seed) if min(h, w) >= 4 else {"pinwheels": None}
        if n_boot and min(h, w) >= 4:
            stats["density_ci95"] = tile_bootstrap(z, stats["wavelength"], n_boot, rng)
        results["layers"].append({"layer": layer, "shape": [h, w], **stats})
        maps.append(z)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "brain" / ("orientation-init" if at_init else "orientation")
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    (out_dir / "orientation.json").write_text(json.dumps(results, indent=1))
    np.savez_compressed(out_dir / "orientation_arrays.npz", preferred=tun["preferred"], osi=tun["osi"],
                        best_frequency=tun["best_frequency"], curves=tun["curves"])
    (out_dir / "brain.md").write_text(_markdown(results))
    _figures(maps, tun, out_dir / "figures")
    return results


def tile_bootstrap(z: np.ndarray, wavelength: float, n_boot: int, rng: np.random.Generator) -> list[float]:
    """95 % interval of the pinwheel density by a block bootstrap over the map: the plaquettes are cut into square
    tiles about one wavelength wide (at least 2), tiles are resampled with replacement, density = pinwheels per
    Lambda^2 of the resampled area."""
    pos, _ = pinwheels(z)
    h, w = z.shape[0] - 1, z.shape[1] - 1  # plaquettes
    t = max(2, int(round(wavelength)))
    ty, tx = np.arange(h) // t, np.arange(w) // t
    counts = np.zeros((ty.max() + 1, tx.max() + 1))
    areas = np.bincount(ty)[:, None] * np.bincount(tx)[None, :]
    for r, c in pos.astype(int):  # pinwheel at plaquette (r, c)
        counts[ty[r], tx[c]] += 1
    counts, areas = counts.ravel(), areas.ravel()
    boot = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(counts), len(counts))
        boot.append(counts[pick].sum() * wavelength**2 / areas[pick].sum())
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def _markdown(r: dict) -> str:
    lines = [f"Orientation tuning of the {r['weights']} sheet at step {r['step']} ({r['stimuli']} gratings: {r['orientations']} orientations x "
             f"{len(r['frequencies'])} frequencies x {r['phases']} phases). OSI median {r['osi_median']:.3f} "
             f"(quartiles {r['osi_quartiles'][0]:.3f}-{r['osi_quartiles'][1]:.3f}).", "",
             "| layer | shape | pinwheels | wavelength (columns) | density (per Λ²) | bootstrap 95% | phase-randomised null (95%) |",
             "|---|---|---|---|---|---|---|"]
    for layer in r["layers"]:
        if layer.get("pinwheels") is None:
            continue
        ci, null = layer.get("density_ci95"), layer.get("null_density_ci95")
        ci_s = f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-"
        null_s = f"{layer['null_density_mean']:.2f} ({null[0]:.2f}-{null[1]:.2f})" if null else "-"
        lines.append(f"| {layer['layer']} | {layer['shape'][0]}x{layer['shape'][1]} | {layer['pinwheels']} | "
                     f"{layer['wavelength']:.2f} | {layer['density']:.2f} | {ci_s} | {null_s} |")
    lines += ["", "Cortex: ~π ≈ 3.14 pinwheels per Λ² (Kaschube et al. 2010)."]
    return "\n".join(lines) + "\n"


def _figures(maps: list[np.ndarray], tun: dict, fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import hsv_to_rgb

    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.6 * (len(maps) + 1), 3.4), squeeze=False)
    for ax, z in zip(axes[0], maps):
        hue = np.mod(np.angle(z), 2 * math.pi) / (2 * math.pi)
        val = np.clip(np.abs(z) / max(np.abs(z).max(), 1e-12), 0, 1)
        ax.imshow(hsv_to_rgb(np.stack([hue, np.ones_like(hue), val], -1)), interpolation="nearest")
        pos, sign = pinwheels(z)
        ax.scatter(pos[:, 1], pos[:, 0], c=np.where(sign > 0, "w", "k"), s=12, marker="o", edgecolors="0.3", linewidths=0.5)
        ax.set_title("preferred orientation (hue), OSI (brightness)", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, -1].hist(tun["osi"], bins=30, color="0.4")
    axes[0, -1].set_xlabel("OSI")
    axes[0, -1].set_ylabel("columns")
    fig.tight_layout()
    fig.savefig(fig_dir / "orientation_map.png", dpi=100)
    plt.close(fig)


def _cmd(args) -> int:
    r = analyze_orientation(args.run, args.out, args.step, args.orientations, tuple(args.frequencies), args.phases,
                            args.null, args.bootstrap, args.seed, args.at_init)
    print(json.dumps({k: r[k] for k in ("osi_median", "osi_mean")} | {"layers": r["layers"]}, indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser("orientation", help="orientation maps of a grid sheet: OSI, pinwheel density vs a null",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", default=None, help="output folder (default RUN/brain/orientation)")
    p.add_argument("--step", type=int, default=None, help="recurrent step whose states are read (default the last)")
    p.add_argument("--orientations", type=int, default=8)
    p.add_argument("--frequencies", type=float, nargs="+", default=[0.0625, 0.125, 0.25], help="cycles per pixel")
    p.add_argument("--phases", type=int, default=4)
    p.add_argument("--null", type=int, default=200, help="phase-randomised maps in the null")
    p.add_argument("--bootstrap", type=int, default=200, help="block-bootstrap resamples of the map (tiles one wavelength wide)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--at-init", action="store_true", help="the run's model at initialisation (its config and seed)")
    p.set_defaults(func=_cmd)
