"""Critical distances over (n, m, r): how far from a stored pattern a query may start and still be pulled in.

The critical distance of a radius d (:func:`theory.critical_distance`) is the largest starting distance x from
which one SDM read lands closer to the target than x (Kanerva 1988, as the paper uses it; the original's
``SDM_Critical_Distances`` notebook is not in its repository's history, so this is our formulation of the
paper's definition, with the read noise of ``theory.read_error_distance``). This module tabulates it for every
radius d = 1 .. n/2 over grids of dimensions n, stored patterns m and neurons r, and draws three views: against
d for several m, against d for several n (both as fractions of n), and against d for several r. Note the
definition saturates at n/2 whenever a read from n/2 still carries any signal (2d >= n/2): one read from
near-random then lands a fraction of a bit closer on average.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from . import theory


def critical_distance_table(
    ns: Sequence[int], ms: Sequence[int], rs: Sequence[float | None], noise: str = "average", progress=None
) -> list[dict]:
    """One row per (n, m, r, d): the activation probability p(d) and the critical distance."""
    rows = []
    for n in ns:
        for m in ms:
            for r in rs:
                for d, cd in enumerate(theory.critical_distances(n, m, r, noise), start=1):
                    rows.append({"n": n, "m": m, "r": r, "d": d, "p": theory.hamming_radius_to_fraction(d, n),
                                 "critical_distance": int(cd)})
                if progress:
                    progress(f"n={n} m={m} r={'2^n' if r is None else f'{r:g}'}: done")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "r": "2^n" if row["r"] is None else row["r"]} for row in rows)


def summary(rows: list[dict]) -> list[dict]:
    """Per (n, m, r): the radius with the largest critical distance (ties: the smallest radius) and that distance."""
    best: dict = {}
    for row in rows:
        key = (row["n"], row["m"], row["r"])
        if key not in best or row["critical_distance"] > best[key]["critical_distance"]:
            best[key] = row
    return list(best.values())


def plot(rows: list[dict], path: Path) -> None:
    """Three panels: vs d per m (first n, first r); vs d / n per n (first m, first r); vs d per r (first n, m)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = list(dict.fromkeys(r["n"] for r in rows))
    ms = list(dict.fromkeys(r["m"] for r in rows))
    rs = list(dict.fromkeys(r["r"] for r in rows))

    def curve(n, m, r, x):
        pts = [(row[x], row["critical_distance"]) for row in rows if (row["n"], row["m"], row["r"]) == (n, m, r)]
        return zip(*pts)

    label_r = lambda r: "r = 2^n" if r is None else f"r = {r:.0e}"  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for m in ms:
        axes[0].plot(*curve(ns[0], m, rs[0], "d"), label=f"m = {m:,}")
    axes[0].set(xlabel="radius d", ylabel="critical distance (bits)", title=f"n = {ns[0]}, {label_r(rs[0])}")
    for n in ns:
        d, cd = curve(n, ms[0], rs[0], "d")
        axes[1].plot([v / n for v in d], [c / n for c in cd], label=f"n = {n}")
    axes[1].set(xlabel="radius d / n", ylabel="critical distance / n", title=f"m = {ms[0]:,}, {label_r(rs[0])}")
    for r in rs:
        axes[2].plot(*curve(ns[0], ms[0], r, "d"), label=label_r(r))
    axes[2].set(xlabel="radius d", ylabel="critical distance (bits)", title=f"n = {ns[0]}, m = {ms[0]:,}")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
