"""Recall-vs-perturbation experiment over associative memories and SDM radii.

For each activation probability p (-> Hamming radius d = the binomial quantile), each
algorithm stores ``m`` patterns, is queried with stored patterns perturbed by k bit
flips (binary) or moved to cosine 1 - 2k/n (continuous), iterates to convergence and
reports the mean cosine similarity of the result to the original pattern.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import memories as mem
from . import theory

ALGORITHMS = (
    "neuron_sdm",
    "pattern_sdm_inf",
    "pattern_sdm_finite",
    "sdm_attention",
    "hopfield",
    "transformer_attention",
    "cap_sdm_inf",
    "cap_sdm_finite",
    "cap_attention",
)
CONTINUOUS_ONLY = ("cap_sdm_inf", "cap_sdm_finite", "cap_attention")
BINARY_ONLY = ("neuron_sdm", "hopfield")


def default_algorithms(continuous: bool) -> tuple[str, ...]:
    """Every algorithm defined for the data type."""
    return tuple(a for a in ALGORITHMS if a not in (BINARY_ONLY if continuous else CONTINUOUS_ONLY))
RADIUS_FREE = ("hopfield", "transformer_attention")


@dataclass(frozen=True)
class RecallConfig:
    """Settings of one recall experiment (defaults: the n=64, m=1024 benchmark)."""

    n: int = 64
    m: int = 1024
    num_queries: int = 256
    perturbations: tuple[int, ...] = tuple(range(13))
    probabilities: tuple[float, ...] = (1e-13, 1e-11, 1e-9, 1e-7, 1e-5, 1e-3, 1e-2, 1e-1)
    algorithms: tuple[str, ...] = tuple(a for a in ALGORITHMS if a not in CONTINUOUS_ONLY)  # the binary set
    neurons: int = 100_000
    min_neurons_per_pattern: float = 1.0
    continuous: bool = False
    hamming: str = "round"  # continuous pattern SDM: cosine -> Hamming distance rounded, or floored (the original)
    max_steps: int = 50
    cap_resolution: int = 1001  # cosine grid of the hypersphere-cap memories' intersection table
    seed: int = 0

    def __post_init__(self) -> None:
        theory.check_n_d(self.n, 0)
        unknown = set(self.algorithms) - set(ALGORITHMS)
        if unknown:
            raise ValueError(f"unknown algorithms {sorted(unknown)}; choose from {ALGORITHMS}")
        if self.m < 1 or self.num_queries < 1:
            raise ValueError(f"need m >= 1 and num_queries >= 1, got m={self.m}, num_queries={self.num_queries}")
        if any(k < 0 or k > self.n for k in self.perturbations):
            raise ValueError(f"perturbations must be bit counts in [0, n={self.n}], got {self.perturbations}")
        if any(not 0 < p <= 1 for p in self.probabilities):
            raise ValueError(f"activation probabilities must be in (0, 1], got {self.probabilities}")
        if not self.perturbations or not self.probabilities:
            raise ValueError("need at least one perturbation and one activation probability")
        if self.hamming not in ("round", "floor"):
            raise ValueError(f"hamming must be 'round' or 'floor', got {self.hamming!r}")
        if self.cap_resolution < 3:
            raise ValueError(f"cap_resolution must be >= 3 grid points, got {self.cap_resolution}")
        if self.neurons < 1:
            raise ValueError(f"need neurons >= 1, got neurons={self.neurons}")
        small = [p for p in self.probabilities if theory.fraction_to_hamming_radius(p, self.n) < 2]
        if small:
            raise ValueError(
                f"probabilities {small} give Hamming radii < 2 at n={self.n}; the SDM-fitted beta needs d >= 2: "
                f"use probabilities >= {theory.hamming_radius_to_fraction(2, self.n):.3g}"
            )


@dataclass
class RecallResult:
    """Long-format rows (one per algorithm, radius, perturbation) and skipped runs."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def make_patterns(config: RecallConfig) -> torch.Tensor:
    """Random uniform patterns for the configured data type."""
    if config.continuous:
        return mem.random_continuous_patterns(config.m, config.n, config.seed)
    return mem.random_binary_patterns(config.m, config.n, config.seed)


def _skip_reason(algo: str, config: RecallConfig, d: int) -> str | None:
    if config.continuous and algo in BINARY_ONLY:
        return f"{algo} is defined for binary data only"
    if not config.continuous and algo in CONTINUOUS_ONLY:
        return f"{algo} is defined for continuous data only (--continuous)"
    if algo == "neuron_sdm":
        expected = config.neurons * theory.hamming_radius_to_fraction(d, config.n)
        if expected < config.min_neurons_per_pattern:
            return (
                f"r={config.neurons} random neurons give only {expected:.3g} expected neurons within "
                f"d={d} of a pattern (< {config.min_neurons_per_pattern}); spanning this activation "
                f"probability would need r >= {config.min_neurons_per_pattern / theory.hamming_radius_to_fraction(d, config.n):.3g} neurons"
            )
    return None


def _build(algo: str, patterns: torch.Tensor, d: int, config: RecallConfig) -> tuple[mem.Memory, float | None]:
    """The memory for ``algo`` at radius ``d`` and its beta (attention only)."""
    binary = not config.continuous
    if algo == "neuron_sdm":
        return mem.NeuronSDM(patterns, d, config.neurons, seed=config.seed + 1), None
    if algo == "pattern_sdm_inf":
        return mem.PatternSDM(patterns, d, None, binary, seed=config.seed + 2, hamming=config.hamming), None
    if algo == "pattern_sdm_finite":
        return mem.PatternSDM(patterns, d, float(config.neurons), binary, seed=config.seed + 2, hamming=config.hamming), None
    if algo == "sdm_attention":
        memory = mem.SoftmaxAttention.sdm_fitted(patterns, d, binary)
        return memory, memory.beta
    if algo == "cap_sdm_inf":
        return mem.CapSDM(patterns, d, None, config.cap_resolution, seed=config.seed + 3), None
    if algo == "cap_sdm_finite":
        return mem.CapSDM(patterns, d, float(config.neurons), config.cap_resolution, seed=config.seed + 3), None
    if algo == "cap_attention":
        memory = mem.SoftmaxAttention.sdm_fitted(patterns, d, binary, cap=True)
        return memory, memory.beta
    if algo == "hopfield":
        return mem.Hopfield(patterns), None
    memory = mem.SoftmaxAttention.transformer(patterns, binary)
    return memory, memory.beta


def _queries(originals: torch.Tensor, k: int, config: RecallConfig) -> torch.Tensor:
    if config.continuous:
        return mem.perturb_to_cosine(originals, 1.0 - 2.0 * k / config.n, seed=config.seed + 100 + k)
    return mem.flip_bits(originals, k, seed=config.seed + 100 + k)


def run_recall(
    config: RecallConfig,
    patterns: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> RecallResult:
    """Run every (algorithm, radius, perturbation); ``patterns`` overrides the random data."""
    if patterns is None:
        patterns = make_patterns(config)
    elif patterns.ndim != 2 or patterns.shape[1] != config.n:
        raise ValueError(f"patterns must have shape (m, n={config.n}), got {tuple(patterns.shape)}")
    patterns = patterns.float() if config.continuous else mem.to_bipolar(patterns)
    originals = patterns[: config.num_queries]
    if config.continuous:
        originals = originals / originals.norm(dim=1, keepdim=True)
    radii = sorted({theory.fraction_to_hamming_radius(p, config.n) for p in config.probabilities})
    result = RecallResult()
    for algo in config.algorithms:
        for d in ([radii[0]] if algo in RADIUS_FREE else radii):
            p = theory.hamming_radius_to_fraction(d, config.n)
            label_d = None if algo in RADIUS_FREE else d
            reason = _skip_reason(algo, config, d)
            if reason:
                result.skipped.append({"algorithm": algo, "d": label_d, "p": p, "reason": reason})
                continue
            memory, beta = _build(algo, patterns, d, config)
            for k in config.perturbations:
                conv = mem.converge(memory, _queries(originals, k, config), config.max_steps)
                sims = mem.similarity(conv.queries, originals)
                result.rows.append(
                    {
                        "algorithm": algo,
                        "d": label_d,
                        "p": None if label_d is None else p,
                        "beta": beta,
                        "perturbation": k,
                        "mean_similarity": float(sims.mean()),
                        "exact_fraction": float((sims > 1 - 1e-6).float().mean()),
                        "steps": conv.steps,
                    }
                )
            if progress:
                progress(f"{algo} d={label_d}: done")
    return result


# --------------------------------------------------------------------------- outputs
def write_csv(result: RecallResult, path: Path) -> None:
    """Long-format CSV of all rows."""
    fields = ["algorithm", "d", "p", "beta", "perturbation", "mean_similarity", "exact_fraction", "steps"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result.rows)


def markdown_table(result: RecallResult) -> str:
    """Mean recall similarity, one line per (algorithm, d), one column per perturbation."""
    ks = sorted({row["perturbation"] for row in result.rows})
    keys: dict[tuple, dict[int, float]] = {}
    meta: dict[tuple, tuple] = {}
    for row in result.rows:
        key = (row["algorithm"], row["d"])
        keys.setdefault(key, {})[row["perturbation"]] = row["mean_similarity"]
        meta[key] = (row["p"], row["beta"])
    head = "| algorithm | d | p(d) | beta | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (4 + len(ks))]
    for (algo, d), vals in keys.items():
        p, beta = meta[(algo, d)]
        cells = [algo, "-" if d is None else str(d), "-" if p is None else f"{p:.1e}",
                 "-" if beta is None else f"{beta:.2f}"]
        cells += [f"{vals[k]:.3f}" if k in vals else "" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    for skip in result.skipped:
        lines.append(f"\nSkipped {skip['algorithm']} d={skip['d']}: {skip['reason']}")
    return "\n".join(lines) + "\n"


def plot(result: RecallResult, path: Path, n: int) -> None:
    """One panel per radius: recall similarity vs perturbation for each algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = sorted({row["d"] for row in result.rows if row["d"] is not None})
    cols = min(4, max(1, len(radii)))
    rows_n = math.ceil(len(radii) / cols) if radii else 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False, sharey=True)
    styles = dict(zip(ALGORITHMS, ["o-", "s-", "^-", "x-", "--", ":", "s--", "^--", "x--"]))
    colors = dict(zip(ALGORITHMS, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:gray", "black",
                                   "tab:purple", "tab:brown", "tab:pink"]))
    for ax, d in zip(axes.flat, radii):
        for algo in ALGORITHMS:
            pts = [r for r in result.rows if r["algorithm"] == algo and (r["d"] == d or (algo in RADIUS_FREE))]
            if pts:
                ax.plot([r["perturbation"] for r in pts], [r["mean_similarity"] for r in pts],
                        styles[algo], color=colors[algo], label=algo, markersize=3)
        p = theory.hamming_radius_to_fraction(d, n)
        ax.set_title(f"d={d} (p={p:.1e}, beta={theory.fit_beta(n, d):.1f})", fontsize=9)
        ax.set_xlabel("perturbation (bits)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(radii):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("recall cosine similarity")
    present = [a for a in ALGORITHMS if any(r["algorithm"] == a for r in result.rows)]
    handles = [
        plt.Line2D([], [], color=colors[a], marker=styles[a][0] if styles[a][0] in "os^x" else None,
                   linestyle=styles[a][1:] if styles[a][0] in "os^x" else styles[a])
        for a in present
    ]
    fig.legend(handles, present, loc="lower center", ncol=len(present), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_outputs(result: RecallResult, out_dir: Path, n: int) -> dict[str, Path]:
    """Write recall.csv, recall.md and recall.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "recall.csv", "markdown": out_dir / "recall.md", "figure": out_dir / "recall.png"}
    write_csv(result, paths["csv"])
    paths["markdown"].write_text(markdown_table(result))
    plot(result, paths["figure"], n)
    return paths
