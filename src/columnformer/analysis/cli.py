"""Sub-commands `analyze`, `report` and `compare` (registered into `columnformer` by cli._EXTENSIONS)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="val", help="data split to stream over (default: val)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after N batches (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the run's eval batch size)")
    p.add_argument("--radius", type=float, default=1.5, help="locality / near-pair radius in geometry units (default 1.5)")
    p.add_argument("--max-pairs", type=int, default=20_000, help="column pairs sampled for pair metrics above this (default 20000)")
    p.add_argument("--shuffles", type=int, default=20, help="shuffled-position controls for smoothness (default 20)")
    p.add_argument("--edges-per-column", type=float, default=4.0, help="strong graph keeps round(x*N) heaviest edges (default 4)")
    p.add_argument("--top-m", type=int, default=16, help="strongest incoming edges kept per column per step (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of pair samples, shuffles and random graphs")
    p.add_argument("--checkpoint", default="last", choices=("best", "last"), help="final model (last, default) or best on validation")
    p.add_argument("--no-init", action="store_true", help="skip the comparison with the untrained model")
    p.add_argument("--no-figures", action="store_true", help="write numbers only")
    p.add_argument("--patch-threshold", type=float, default=3.0, help="category patches: smoothed Welch t above this")
    p.add_argument("--patch-sigma", type=float, default=1.0, help="category patches: t-map smoothing (geometry units)")
    p.add_argument("--patch-min-size", type=int, default=3, help="category patches: fewest columns in a patch")


def _options(args):
    from .analyze import AnalysisOptions

    return AnalysisOptions(
        split=args.split, max_batches=args.max_batches, batch_size=args.batch_size, radius=args.radius,
        max_pairs=args.max_pairs, n_shuffles=args.shuffles, edges_per_column=args.edges_per_column,
        top_m=args.top_m, seed=args.seed, checkpoint=args.checkpoint, init=not args.no_init,
        patch_threshold=args.patch_threshold, patch_sigma=args.patch_sigma, patch_min_size=args.patch_min_size,
        figures=not args.no_figures,
    )


def _cmd_analyze(args) -> int:
    from .analyze import analyze_run

    analyze_run(args.run_dir, _options(args))
    return 0


def _cmd_report(args) -> int:
    from .report import build_report

    run_dir = Path(args.run_dir)
    if args.reanalyze:
        from .analyze import analyze_run

        analyze_run(run_dir, _options(args))
    path = build_report(run_dir, args.out, top_m=args.embed_m, analyze_opts=_options(args))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare_rows, format_table, load_or_analyze

    rows = compare_rows([load_or_analyze(r, _options(args)) for r in args.run_dirs])
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="what did the sheet learn: connectivity and topography metrics",
        description="Stream a data split through a run's model (and the same model at initialisation) and write "
        "RUN_DIR/analysis.json, analysis_arrays.npz and figures/analysis/*.png: attention vs distance, wiring length, "
        "locality, layer flow, strong-graph modularity and small-worldness, d' selectivity, tuning smoothness.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    _add_analysis_options(p)
    p.set_defaults(func=_cmd_analyze)

    p = subparsers.add_parser(
        "report", help="one self-contained HTML page with an interactive sheet explorer",
        description="Write RUN_DIR/report.html: config, learning curves, analysis figures and numbers, and a sheet "
        "explorer (click a column: its strongest incoming connections per step and its selectivity). Runs analyze "
        "first when analysis.json is missing or stale (made from another checkpoint file, split or checkpoint).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    p.add_argument("--embed-m", type=int, default=None, help="embed only the top M incoming edges per column (default: all kept by analyze, 16)")
    p.add_argument("--reanalyze", action="store_true", help="run analyze even if analysis.json exists")
    _add_analysis_options(p)
    p.set_defaults(func=_cmd_report)

    p = subparsers.add_parser(
        "compare", help="side-by-side table of runs (accuracy, wiring, locality, smoothness, modularity, params)",
        description="Print a table comparing runs; runs without a current analysis.json (missing, or made from another "
        "checkpoint file, --split or --checkpoint) are analysed first.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    _add_analysis_options(p)
    p.set_defaults(func=_cmd_compare)
