"""argparse wiring for ``columnformer sdm {beta,optimal-d,recall,effective-beta}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from . import theory


def _parse_r(text: str | None) -> float | None:
    """'all' / None -> r = 2^n; otherwise a float like 1e6."""
    if text is None or text.lower() in ("all", "2^n"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--r must be a number like 1e6 or 'all', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--r must be > 0, got {text!r}")
    return value


def _beta(args: argparse.Namespace) -> int:
    theory.check_n_d(args.n, args.d)
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
    theory.check_n_d(args.n, 0)
    r = float(2.0**args.n) if args.r is None else args.r
    p_snr = theory.snr_optimal_probability(args.m, r)
    d_snr = theory.snr_optimal_radius(args.n, args.m, args.r)
    d_cap, cap = theory.capacity_optimal_radius(args.n, args.r, args.prob_whole_pattern)
    d_crit, crit = theory.critical_distance_optimal_radius(args.n, args.m, args.r)
    print(f"n={args.n} m={args.m} r={r:.4g}")
    print(f"SNR-optimal:        p*=(2mr)^(-1/3)={p_snr:.3e} -> d={d_snr} (beta {theory.fit_beta(args.n, max(d_snr, 2)):.2f})")
    print(f"capacity-optimal:   d={d_cap} (capacity {cap:.3e} patterns, beta {theory.fit_beta(args.n, max(d_cap, 2)):.2f})")
    print(f"critical-distance:  d={d_crit} (critical distance {crit} bits, beta {theory.fit_beta(args.n, max(d_crit, 2)):.2f})")
    for d in args.d or []:
        print(f"d={d}: critical distance {theory.critical_distance(args.n, d, args.m, args.r)}, "
              f"P(>=1 neuron within d) = {theory.prob_neuron_within(args.n, d, r):.4g}")
    return 0


def _recall(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .recall import ALGORITHMS, RecallConfig, run_recall, save_outputs

    patterns = None
    n, m = args.n, args.m
    if args.patterns:
        patterns = torch.as_tensor(np.load(args.patterns)).float()
        if patterns.ndim != 2:
            raise SystemExit(f"--patterns must hold a 2-D array (m, n), got shape {tuple(patterns.shape)}")
        m, n = patterns.shape
    config = RecallConfig(
        n=n, m=m, num_queries=min(args.queries, m), perturbations=tuple(range(args.max_perturbation + 1)),
        probabilities=tuple(args.p), algorithms=tuple(args.algorithms or ALGORITHMS),
        neurons=args.neurons, continuous=args.continuous, seed=args.seed,
    )
    result = run_recall(config, patterns, progress=lambda msg: print(msg, file=sys.stderr))
    for skip in result.skipped:
        print(f"skipped {skip['algorithm']} d={skip['d']}: {skip['reason']}", file=sys.stderr)
    paths = save_outputs(result, Path(args.out), n)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
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
    head_dim = args.n or results[0].head_dim
    m = args.m or n_keys or 64
    paths = eb.save_report(results, Path(args.out), head_dim, m, title)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _friendly(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn bad-input ``ValueError``s into a one-line error message and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sdm`` command (with its sub-commands) to ``subparsers``."""
    sdm = subparsers.add_parser("sdm", help="Sparse Distributed Memory theory and experiments")
    sub = sdm.add_subparsers(dest="sdm_command", required=True)

    p = sub.add_parser("beta", help="beta of exp(beta*cos) fitted to the SDM circle intersection")
    p.add_argument("--n", type=int, default=64, help="dimension (default 64)")
    p.add_argument("--d", type=int, required=True, help="Hamming radius")
    p.add_argument("--r", type=_parse_r, default=None, help="number of neurons (default: all 2^n)")
    p.add_argument("--continuous", action="store_true", help="also fit the continuous cap intersection")
    p.set_defaults(func=_friendly(_beta))

    p = sub.add_parser("optimal-d", help="SNR-, capacity- and critical-distance-optimal Hamming radii")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--m", type=int, default=1024, help="stored patterns")
    p.add_argument("--r", type=_parse_r, default=None, help="number of neurons (default: all 2^n)")
    p.add_argument("--prob-whole-pattern", type=float, default=0.5,
                   help="target probability of recalling all n bits (capacity criterion)")
    p.add_argument("--d", type=int, nargs="*", help="also report critical distance for these radii")
    p.set_defaults(func=_friendly(_optimal_d))

    p = sub.add_parser("recall", help="recall vs perturbation table + figure for all memories")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--patterns", help=".npy array (m, n) of patterns instead of random ones")
    p.add_argument("--queries", type=int, default=256, help="stored patterns used as queries")
    p.add_argument("--max-perturbation", type=int, default=12, help="bits flipped: 0..this")
    p.add_argument("--p", type=float, nargs="+", default=[1e-13, 1e-11, 1e-9, 1e-7, 1e-5, 1e-3, 1e-2, 1e-1],
                   help="activation probabilities defining the Hamming radii")
    p.add_argument("--algorithms", nargs="+", help="subset of algorithms (default: all)")
    p.add_argument("--neurons", type=int, default=100_000, help="r for neuron-based / finite SDM")
    p.add_argument("--continuous", action="store_true", help="unit-vector data, perturbed to cosine 1-2k/n")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sdm_recall", help="output directory")
    p.set_defaults(func=_friendly(_recall))

    p = sub.add_parser("effective-beta", help="effective beta of attention heads vs SDM-optimal beta")
    p.add_argument("run_dir", nargs="?", help="trained Columnformer run directory")
    p.add_argument("--pretrained", choices=["minilm"], help="use all-MiniLM-L6-v2 (extra [sdm-pretrained])")
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, help="dimension for the SDM references (default: head dim)")
    p.add_argument("--m", type=int, help="patterns (keys) for the SDM references")
    p.add_argument("--out", default="sdm_effective_beta", help="output directory")
    p.set_defaults(func=_friendly(_effective_beta))
