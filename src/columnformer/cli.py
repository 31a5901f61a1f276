"""`columnformer` command line: train, resume, eval, presets (and the sub-commands of other modules).

Every sub-command has ``--help``. Errors in configs, checkpoints or data print one clear line
and exit non-zero; set COLUMNFORMER_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

# One convention for every sub-command: 0 success, 2 bad input (config keys or values, missing or corrupt
# files, checkpoints that do not fit, out-of-range numbers), 1 a runtime failure (a run locked by another
# process, a missing optional package, a read-only location, out of memory), 3 training diverged.
EXIT_RUNTIME, EXIT_INPUT, EXIT_DIVERGED = 1, 2, 3


def _cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    dist = _maybe_distributed(cfg)
    summary = train(cfg, overwrite=args.overwrite, dist=dist)
    _print_summary(summary, dist)
    _leave(dist)
    return 0


def _cmd_resume(args) -> int:
    from .config import load_config  # noqa: F401  (validates the stored config on read)
    from .run import read_run_config
    from .train import resume

    cfg = read_run_config(args.run_dir)
    dist = _maybe_distributed(cfg)
    summary = resume(args.run_dir, dist=dist, extend=args.extend)
    _print_summary(summary, dist)
    _leave(dist)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _cmd_eval(args) -> int:
    from torch.utils.data import DataLoader

    from .run import load_run
    from .tasks import build_task, evaluate

    run = load_run(args.run_dir, checkpoint=args.checkpoint)
    cfg = run.config
    task = build_task(cfg.task, cfg.model)
    sets = task.datasets(cfg.data, cfg.model, seed=cfg.train.seed)
    if args.split not in sets:
        raise ValueError(f"split {args.split!r} not in this dataset; available: {', '.join(sets)}")
    loader = DataLoader(task.dataset(sets[args.split], args.split, seed=cfg.train.seed), batch_size=cfg.train.eval_batch_size)
    if args.steps is not None and not cfg.model.sheet.recurrent:
        raise ValueError(f"--steps needs a recurrent run; {str(run.path)!r} has {cfg.model.sheet.steps} feed-forward blocks")
    result = evaluate(task, run.model, loader, "cpu", steps=args.steps)
    result = {"run": str(run.path), "checkpoint": run.checkpoint, "split": args.split,
              **({"steps": args.steps} if args.steps is not None else {}), **result}
    finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    if finite != result:
        print("warning: non-finite results (the model overflows on this data) are written as null", file=sys.stderr)
    print(json.dumps(finite, indent=2, allow_nan=False))
    return 0


def _cmd_presets(args) -> int:
    from .factory import build_model, count_parameters
    from .presets import PRESETS

    print(f"{'preset':<24}{'parameters':>14}  {'columns':>8}  geometry")
    for name in PRESETS:
        model = build_model(name)
        sheet = model.sheet
        print(f"{name:<24}{count_parameters(model):>14,}  {sheet.n:>8}  {sheet.geometry.name}")
    return 0


def _print_summary(summary: dict, dist) -> None:
    if dist is None or dist.rank == 0:
        head = ("name", "task", "num_params", "steps")
        scores = [k for k in summary if k.startswith("best_val_") or k in ("test_acc", "test_loss")]
        keys = (*head, *scores, "wall_time_s", "train_samples_per_s", "baseline")
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))


def _leave(dist) -> None:
    """After a finished torchrun run: every rank waits for the others, then destroys the process group while the
    interpreter is whole (left to exit, gloo's threads could outlive the objects they hold and abort the process)."""
    if dist is not None:
        dist.shutdown()


def _maybe_distributed(cfg):
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE set), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from .distributed import init_distributed

    return init_distributed(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="columnformer",
        description="Brain-inspired transformers: train, evaluate and analyse Columnformer sheets.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model; writes runs/<name>/",
        description="Train a model from a YAML config with key=value overrides (dotted keys), e.g. "
        "`columnformer train --config configs/digits.yaml train.epochs=5 model.sheet.steps=6`. "
        "Writes runs/<name>/: config.yaml, provenance.json, metrics.jsonl, summary.json, checkpoints/, figures/.",
    )
    p.add_argument("--config", help="YAML config file (see configs/); omitted: library defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. preset=digits-vit train.seed=1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "resume", help="continue a stopped run exactly where it stopped",
        description="Resume RUN_DIR from checkpoints/last.pt with its stored config; the result equals an uninterrupted run.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--extend", type=int, metavar="EPOCHS",
        help="train a (finished) run on to EPOCHS epochs in all; the cosine schedule is re-planned over the new total",
    )
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("eval", help="evaluate a run on a split", description="Evaluate a run's checkpoint on a data split; prints JSON.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", default="test", help="data split (default: test)")
    p.add_argument(
        "--checkpoint", default="last", choices=("best", "last"),
        help="which checkpoint: the final model (last, default; summary.json's test_acc) or the best on validation",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=None,
        help="recurrent runs: unroll this many steps (with halting: the most any column may run); default as trained",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("presets", help="list model presets with parameter counts", description="List named model presets, their parameter counts and geometries.")
    p.set_defaults(func=_cmd_presets)

    for module in _EXTENSIONS:
        __import__(f"columnformer.{module}", fromlist=["register"]).register(sub)
    return parser


# Modules that add their own sub-commands through ``register(subparsers)``.
_EXTENSIONS: tuple[str, ...] = ("sdm.cli", "sweep", "analysis.cli", "probe", "robustness", "predecessor", "brain.features", "brain.compare", "expand", "analysis.orientation")


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distributed import DistributedError
    from .run import RunLockedError
    from .extras import MissingExtraError
    from .train import TrainingDiverged

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may come after options (`train --overwrite a.b=1`); anything else is an error
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = bool(os.environ.get("COLUMNFORMER_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        if debug:
            raise
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except TrainingDiverged as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (RunLockedError, MissingExtraError, DistributedError) as exc:  # the input is fine; the situation is not
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (OSError, RuntimeError, MemoryError) as exc:  # e.g. a read-only run location, out of memory
        if debug:
            raise
        print(f"error ({type(exc).__name__}): {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
