"""argparse wiring for ``columnformer sdm {beta,optimal-d,recall,effective-beta}``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from . import theory


# Valid ranges of the options (argparse names the option in its message: "argument --n: must be ...").
N_MAX = 20_000  # beta: exact big-integer binomials, log-space arithmetic; seconds up to here
OPTIMAL_D_N_MAX = 10_000  # optimal-d searches every radius for the critical distance: ~4 min at n = 10,000, r = 2^n
RECALL_N_MAX = 10_000  # recall stores (m, n) patterns and (r, n) neurons in memory


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text!r}")
        return value

    return parse


def _float_in(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Callable[[str], float]:
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}")
        return value

    return parse


def _parse_r(text: str | None) -> float | None:
    """'all' / None -> r = 2^n; otherwise a finite number > 0 like 1e6."""
    if text is None or text.lower() in ("all", "2^n"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 like 1e6, or 'all' (r = 2^n), got {text!r}")
    return value


def _bad(option: str, valid: str, got) -> ValueError:
    return ValueError(f"{option} must be {valid}, got {got}")


def _fmt_log10(log10_value: float) -> str:
    """A positive number given by its log10, printed finite however large (1.234e+05 or 10^3009.1)."""
    if log10_value == -math.inf:
        return "0 (nothing storable)"
    return f"{10 ** log10_value:.3e}" if abs(log10_value) < 300 else f"10^{log10_value:.1f}"


def _progress(label: str, n: int):
    """A tqdm progress callback ``(done, total)`` on stderr for long searches (large n), else None."""
    if n < 1000:
        return None
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="radius", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _beta(args: argparse.Namespace) -> int:
    if args.d > args.n:
        raise _bad("--d", f"a Hamming radius in [2, --n = {args.n}]", args.d)
    if args.continuous and args.n < 3:
        raise _bad("--n", "at least 3 with --continuous (hypersphere caps)", args.n)
    cov = theory.fit_beta(args.n, args.d, args.r, convention="covariance")
    lsq = theory.fit_beta(args.n, args.d, args.r, convention="least_squares")
    print(f"n={args.n} d={args.d} r={'2^n' if args.r is None else f'{args.r:g}'} "
          f"(fit over dv=0..{args.d - 1}, p(d)={theory.hamming_radius_to_fraction(args.d, args.n):.3e})")
    print(f"beta (covariance-ratio, original convention): {cov:.4f}")
    print(f"beta (plain least squares):                   {lsq:.4f}")
    if args.continuous:
        print(f"beta (continuous cap intersection, cov.):     "
              f"{theory.fit_beta(args.n, args.d, args.r, continuous=True):.4f}")
    return 0


def _optimal_d(args: argparse.Namespace) -> int:
    n, m = args.n, args.m
    for d in args.d or []:  # every check before any output
        if d > n:
            raise _bad("--d", f"Hamming radii in [0, --n = {n}]", d)
    log_r = theory.log_neuron_count(n, args.r)
    log10_p_snr = theory.log_snr_optimal_probability(m, log_r) / math.log(10.0)
    d_snr = theory.snr_optimal_radius(n, m, args.r)
    d_cap, log10_cap = theory.capacity_optimal_radius(n, args.r, args.prob_whole_pattern, log10=True)
    d_crit, crit = theory.critical_distance_optimal_radius(
        n, m, args.r, progress=_progress("critical distance", n), noise=args.noise
    )
    rows = [(d, theory.critical_distance(n, d, m, args.r, args.noise), theory.prob_neuron_within(n, d, args.r))
            for d in args.d or []]
    print(f"n={n} m={m} r={'2^' + str(n) if args.r is None else f'{args.r:.4g}'}")
    print(f"SNR-optimal:        p*=(2mr)^(-1/3)={_fmt_log10(log10_p_snr)} -> d={d_snr} (beta {theory.fit_beta(n, max(d_snr, 2)):.2f})")
    print(f"capacity-optimal:   d={d_cap} (capacity {_fmt_log10(log10_cap)} patterns, beta {theory.fit_beta(n, max(d_cap, 2)):.2f})")
    d_cf, p_cf = theory.capacity_optimal_radius_closed_form(n, args.r, args.prob_whole_pattern)
    print(f"  closed form (the original's): p*={p_cf:.4g} -> first d reaching it = {d_cf}")
    print(f"critical-distance:  d={d_crit} (critical distance {max(crit, 0)} bits, beta {theory.fit_beta(n, max(d_crit, 2)):.2f}; "
          f"noise term: {args.noise})")
    for d, cd, prob in rows:
        print(f"d={d}: critical distance {cd}, P(>=1 neuron within d) = {prob:.4g}")
    return 0


def _recall(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .recall import CONTINUOUS_ONLY, RecallConfig, default_algorithms, run_recall, save_outputs

    patterns = None
    n, m = args.n, args.m
    if args.patterns:
        if not Path(args.patterns).is_file():
            raise _bad("--patterns", "an existing .npy file", repr(args.patterns))
        array = np.load(args.patterns, allow_pickle=False)
        if array.ndim != 2 or array.shape[0] < 1 or not 2 <= array.shape[1] <= RECALL_N_MAX:
            raise _bad("--patterns", f"a 2-D array (m >= 1, n in [2, {RECALL_N_MAX}])", f"shape {array.shape}")
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise _bad("--patterns", "an array of finite numbers", f"dtype {array.dtype} with non-finite or non-numeric values")
        patterns = torch.as_tensor(array).float()
        m, n = patterns.shape
    # every check before any work (the simulations take minutes)
    if args.max_perturbation > n:
        raise _bad("--max-perturbation", f"a number of bits in [0, n = {n}]", args.max_perturbation)
    for p in args.p:
        d = theory.fraction_to_hamming_radius(p, n)
        if d < 2:
            p_min = theory.hamming_radius_to_fraction(2, n)
            raise _bad("--p", f"activation probabilities that give a Hamming radius >= 2 at n = {n} (the SDM-fitted "
                              f"beta is fitted over radii 0..d-1), i.e. >= {p_min:.3g}; or use a larger --n",
                       f"{p:g} (radius {d})")
    algorithms = tuple(args.algorithms or default_algorithms(args.continuous))
    if args.continuous and n < 3 and set(algorithms) & set(CONTINUOUS_ONLY):
        raise _bad("--n", "at least 3 for the hypersphere-cap memories (cap_sdm_inf, cap_sdm_finite, cap_attention)", n)
    if "neuron_sdm" in algorithms and args.neurons * n > 2 * 10**8:
        raise _bad("--neurons", f"at most {2 * 10**8 // n:,} at n = {n} (neuron_sdm holds r x n addresses in memory)",
                   args.neurons)
    config = RecallConfig(
        n=n, m=m, num_queries=min(args.queries, m), perturbations=tuple(range(args.max_perturbation + 1)),
        probabilities=tuple(args.p), algorithms=algorithms,
        neurons=args.neurons, continuous=args.continuous, hamming=args.hamming, cap_resolution=args.resolution,
        seed=args.seed,
    )
    result = run_recall(config, patterns, progress=lambda msg: print(msg, file=sys.stderr))
    for skip in result.skipped:
        print(f"skipped {skip['algorithm']} d={skip['d']}: {skip['reason']}", file=sys.stderr)
    paths = save_outputs(result, Path(args.out), n)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _projections(args: argparse.Namespace) -> int:
    import csv

    from .projections import markdown_table, plot, run_projections

    for d in args.radii:
        if d > args.n:
            raise _bad("--radii", f"Hamming radii in [2, n = {args.n}]", d)
    rows = run_projections(args.radii, n=args.n, epochs=args.epochs, cosines=args.cosines, r=args.r,
                           num_queries=args.queries, seed=args.seed, resolution=args.resolution, progress=lambda msg: print(msg, file=sys.stderr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "projections.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows)
    (out / "projections.md").write_text(table)
    plot(rows, out / "projections.png")
    print(table)
    print(f"wrote {out / 'projections.csv'}, {out / 'projections.md'}, {out / 'projections.png'}")
    return 0


def _effective_beta(args: argparse.Namespace) -> int:
    from . import effective_beta as eb

    if args.pretrained:
        reason = eb.pretrained_available()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 2
        results = eb.betas_from_minilm()
        title = "all-MiniLM-L6-v2: effective beta per head (final query)"
        n_keys = 20
    elif args.run_dir:
        try:
            results = eb.betas_from_run(args.run_dir, args.split, args.num_images, args.seed)
        except ImportError as exc:
            print(f"error: Columnformer run loading is unavailable ({exc})", file=sys.stderr)
            return 2
        title = f"Columnformer run {args.run_dir}: effective beta per head"
        n_keys = 0
    else:
        print("error: give a RUN_DIR or --pretrained minilm", file=sys.stderr)
        return 2
    head_dim = args.n if args.n is not None else results[0].head_dim
    m = args.m if args.m is not None else (n_keys or 64)
    paths = eb.save_report(results, Path(args.out), head_dim, m, title)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _learned_betas(args: argparse.Namespace) -> int:
    from . import effective_beta as eb

    betas = eb.qknorm_learned_betas()
    summary = eb.compare_learned_betas([v for vals in betas.values() for v in vals], args.n, args.m, args.r)
    lines = ["| task | modules | median beta | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {task} | {len(v)} | {np.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |" for task, v in betas.items()]
    lines += ["", f"SDM-optimal betas for n = {args.n}, m = {args.m}:", "", "| optimum | d | beta |", "|---|---|---|"]
    lines += [f"| {name} | {d} | {beta:.2f} |" for name, (d, beta) in summary["references"].items()]
    lines += ["", f"{summary['count']} learned betas, median {summary['median']:.2f}: {summary['in_range']:.0%} between "
              f"the smallest and largest optimum ({summary['range'][0]:.2f}-{summary['range'][1]:.2f}), "
              f"{summary['below']:.0%} below, {summary['above']:.0%} above."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learned_betas.md").write_text("\n".join(lines) + "\n")
    eb.plot_learned_betas(betas, summary, out / "learned_betas.png")
    print("\n".join(lines))
    print(f"wrote {out / 'learned_betas.md'}, {out / 'learned_betas.png'}")
    return 0


def _critical(args: argparse.Namespace) -> int:
    from . import critical

    rows = critical.critical_distance_table(args.n, args.m, args.r, args.noise, progress=lambda msg: print(msg, file=sys.stderr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    critical.write_csv(rows, out / "critical_distances.csv")
    critical.plot(rows, out / "critical_distances.png")
    lines = ["| n | m | r | best d | p(d) | critical distance |", "|---|---|---|---|---|---|"]
    for b in critical.summary(rows):
        r_text = "2^n" if b["r"] is None else f"{b['r']:g}"
        lines.append(f"| {b['n']} | {b['m']:,} | {r_text} | {b['d']} | {b['p']:.1e} | {b['critical_distance']} |")
    print("\n".join(lines))
    print(f"wrote {out / 'critical_distances.csv'}, {out / 'critical_distances.png'}")
    return 0


def _friendly(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn bad-input ``ValueError``s into a one-line error message and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _add_resolution_seed_out(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--resolution", type=_int_in(3, 10**6), default=1001,
                   help="cosine grid points of the hypersphere-cap intersection tables, >= 3 (default 1001)")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0)
    p.add_argument("--out", default=out, help="output directory")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sdm`` command (with its sub-commands) to ``subparsers``."""
    sdm = subparsers.add_parser("sdm", help="Sparse Distributed Memory theory and experiments")
    sub = sdm.add_subparsers(dest="sdm_command", required=True)

    from .recall import ALGORITHMS

    r_help = "number of neurons: a finite number > 0, or 'all' (default: r = 2^n, one per address)"
    p = sub.add_parser("beta", help="beta of exp(beta*cos) fitted to the SDM circle intersection")
    p.add_argument("--n", type=_int_in(2, N_MAX), default=64, help=f"dimension, 2..{N_MAX} (default 64)")
    p.add_argument("--d", type=_int_in(2, N_MAX), required=True, help="Hamming radius, 2..n")
    p.add_argument("--r", type=_parse_r, default=None, help=r_help)
    p.add_argument("--continuous", action="store_true", help="also fit the continuous cap intersection (n >= 3)")
    p.set_defaults(func=_friendly(_beta))

    p = sub.add_parser("optimal-d", help="SNR-, capacity- and critical-distance-optimal Hamming radii")
    p.add_argument("--n", type=_int_in(2, OPTIMAL_D_N_MAX), default=64, help=f"dimension, 2..{OPTIMAL_D_N_MAX} (default 64)")
    p.add_argument("--m", type=_int_in(1, 10**15), default=1024, help="stored patterns, >= 1 (default 1024)")
    p.add_argument("--r", type=_parse_r, default=None, help=r_help)
    p.add_argument("--prob-whole-pattern", type=_float_in(0, 1, True, True), default=0.5,
                   help="target probability of recalling all n bits (capacity criterion), in (0, 1)")
    p.add_argument("--d", type=_int_in(0, N_MAX), nargs="*", help="also report critical distance for these radii (0..n)")
    p.add_argument("--noise", choices=theory.NOISE_TERMS, default="average",
                   help="noise a random stored pattern adds to a read: average (p^2 r, the default) or half (the "
                        "intersection at distance n/2, the original analysis' SNR)")
    p.set_defaults(func=_friendly(_optimal_d))

    p = sub.add_parser("recall", help="recall vs perturbation table + figure for all memories")
    p.add_argument("--n", type=_int_in(2, RECALL_N_MAX), default=64, help=f"dimension, 2..{RECALL_N_MAX} (default 64)")
    p.add_argument("--m", type=_int_in(1, 10**6), default=1024, help="stored patterns, 1..10^6 (default 1024)")
    p.add_argument("--patterns", help=".npy array (m, n) of patterns instead of random ones")
    p.add_argument("--queries", type=_int_in(1, 10**6), default=256, help="stored patterns used as queries (>= 1)")
    p.add_argument("--max-perturbation", type=_int_in(0, RECALL_N_MAX), default=12, help="bits flipped: 0..this (<= n)")
    p.add_argument("--p", type=_float_in(0, 1, True, False), nargs="+",
                   default=[1e-13, 1e-11, 1e-9, 1e-7, 1e-5, 1e-3, 1e-2, 1e-1],
                   help="activation probabilities in (0, 1] defining the Hamming radii (each must give a radius >= 2)")
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, metavar="ALGORITHM",
                   help=f"subset of algorithms (default: every one defined for the data type): {', '.join(ALGORITHMS)}")
    p.add_argument("--neurons", type=_int_in(1, 10**8), default=100_000, help="r for neuron-based / finite SDM, >= 1")
    p.add_argument("--continuous", action="store_true", help="unit-vector data, perturbed to cosine 1-2k/n")
    p.add_argument("--hamming", choices=("round", "floor"), default="round",
                   help="continuous pattern SDM: map cosine to Hamming distance n(1-cos)/2 rounded (default) or "
                        "floored (the original code's cosine_to_hamm)")
    _add_resolution_seed_out(p, "sdm_recall")
    p.set_defaults(func=_friendly(_recall))

    p = sub.add_parser("projections", help="learn projections of the digits into the SDM space; recall under noise")
    p.add_argument("--n", type=_int_in(2, 1024), default=64, help="address dimension, 2..1024 (default 64)")
    p.add_argument("--radii", type=_int_in(2, 1024), nargs="+", default=[5, 9, 11, 15],
                   help="Hamming radii d in [2, n] (default 5 9 11 15, the original's)")
    p.add_argument("--epochs", type=_int_in(1, 10_000), default=20, help="training epochs, >= 1 (default 20)")
    p.add_argument("--cosines", type=_float_in(-1, 1, False, False), nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5],
                   help="perturbations: cosine of each query with its image, in [-1, 1]")
    p.add_argument("--r", type=_parse_r, default=None, help="neurons of the SDM weightings: a finite number > 0 or "
                                                               "'all' (default: infinitely many)")
    p.add_argument("--queries", type=_int_in(1, 10**6), default=256, help="images used as queries per split (>= 1)")
    _add_resolution_seed_out(p, "sdm_projections")
    p.set_defaults(func=_friendly(_projections))

    p = sub.add_parser("critical-distance", help="critical distance of every radius over grids of n, m and r + figure")
    p.add_argument("--n", type=_int_in(2, OPTIMAL_D_N_MAX), nargs="+", default=[64, 256, 1000],
                   help=f"dimensions, 2..{OPTIMAL_D_N_MAX} (default 64 256 1000)")
    p.add_argument("--m", type=_int_in(1, 10**15), nargs="+", default=[100, 1024, 10_000],
                   help="stored patterns, >= 1 (default 100 1024 10000)")
    p.add_argument("--r", type=_parse_r, nargs="+", default=[None, 1e6],
                   help="neurons: finite numbers > 0 or 'all' (r = 2^n) (default all 1e6)")
    p.add_argument("--noise", choices=theory.NOISE_TERMS, default="average", help="read-noise term, as optimal-d")
    p.add_argument("--out", default="sdm_critical_distance", help="output directory")
    p.set_defaults(func=_friendly(_critical))

    p = sub.add_parser("learned-betas", help="the QK-norm transformers' learned betas vs the SDM-optimal betas")
    p.add_argument("--n", type=_int_in(2, OPTIMAL_D_N_MAX), default=64, help="dimension of the SDM references (default 64)")
    p.add_argument("--m", type=_int_in(1, 10**15), default=1024, help="stored patterns of the SDM references (default 1024)")
    p.add_argument("--r", type=_parse_r, default=None, help=r_help)
    p.add_argument("--out", default="sdm_learned_betas", help="output directory")
    p.set_defaults(func=_friendly(_learned_betas))

    p = sub.add_parser("effective-beta", help="effective beta of attention heads vs SDM-optimal beta")
    p.add_argument("run_dir", nargs="?", help="trained Columnformer run directory")
    p.add_argument("--pretrained", choices=["minilm"], help="use all-MiniLM-L6-v2 (extra [sdm-pretrained])")
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=_int_in(1, 10**6), default=64)
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0)
    p.add_argument("--n", type=_int_in(2, N_MAX), help="dimension for the SDM references, 2..20000 (default: head dim)")
    p.add_argument("--m", type=_int_in(1, 10**15), help="patterns (keys) for the SDM references, >= 1")
    p.add_argument("--out", default="sdm_effective_beta", help="output directory")
    p.set_defaults(func=_friendly(_effective_beta))
