"""`columnformer sweep GRID.yaml`: run a grid of configs over seeds and tabulate the results.

A grid file names a base config, the seeds, overrides shared by every run, and one list of
overrides per config::

    name: ablation-digits
    base: ../digits.yaml            # relative to this file (or to the current directory)
    seeds: [0, 1, 2]                # every config runs once per seed; tables give mean ± std
    common: ["train.epochs=8"]      # overrides applied to every run (before the config's own)
    out_dir: runs/sweeps/ablation-digits   # optional; default runs/sweeps/<name>; --out wins
    configs:
      tied: ["preset=digits-vit"]
      untied_all:                   # long form: overrides plus a note printed in the table
        overrides: ["preset=digits-vit", "model.sheet.untied_attn=true"]
        note: "all weights untied"

Every run is ``python -m columnformer train --config BASE <common> <config> name=<config>-s<seed>
out_dir=<DIR> train.seed=<seed>`` in its own process (``--parallel N`` at a time; with N > 1 each
run gets ``train.threads = cpus // N`` unless the grid sets ``train.threads``). Every run's config
is built and validated before the first run starts, so a typo fails in seconds, not hours.
Runs whose ``summary.json`` exists are skipped (re-running a sweep resumes it); an unfinished run
directory is restarted from scratch. At the end ``results.md`` and ``results.csv`` are written to
DIR (also with ``--report``, which only tabulates what has finished).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, build_config

GRID_KEYS = ("name", "description", "base", "seeds", "common", "configs", "out_dir")
CONFIG_KEYS = ("overrides", "note")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# overrides the sweep itself sets per run; a grid may not set them
_RESERVED = ("name", "out_dir", "train.seed")


@dataclass
class GridConfig:
    name: str
    overrides: list[str]
    note: str = ""


@dataclass
class Grid:
    """A parsed and validated grid file."""

    path: Path
    name: str
    base: Path | None
    base_raw: dict
    seeds: list[int]
    common: list[str]
    configs: list[GridConfig]
    out_dir: Path
    description: str = ""
    params: dict[str, int] = field(default_factory=dict)  # config name -> parameter count (filled by validate)

    def run_name(self, config: str, seed: int) -> str:
        return f"{config}-s{seed}"

    def runs(self) -> list[tuple[GridConfig, int]]:
        return [(c, s) for c in self.configs for s in self.seeds]


# ------------------------------------------------------------------ reading and validating
def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of 'key=value' strings, e.g. [\"train.epochs=5\"] (got {value!r})")
    for v in value:
        if "=" not in v:
            raise ConfigError(f"{where}: {v!r} is not of the form key=value")
        if v.split("=", 1)[0] in _RESERVED:
            raise ConfigError(f"{where}: {v!r} sets a key the sweep sets per run ({', '.join(_RESERVED)})")
    return list(value)


def _resolve_base(base: Any, grid_path: Path) -> Path:
    if not isinstance(base, str) or not base:
        raise ConfigError(f"grid {str(grid_path)!r}: 'base' must be a path to a config file (got {base!r})")
    candidates = [grid_path.parent / base, Path(base)]
    for c in candidates:
        if c.is_file():
            return Path(os.path.normpath(c))
    raise ConfigError(
        f"grid {str(grid_path)!r}: base config {base!r} does not exist "
        f"(looked in {', '.join(repr(str(c)) for c in candidates)})"
    )


def load_grid(path: str | Path, out_dir: str | Path | None = None) -> Grid:
    """Read a grid file, check its shape, and return a :class:`Grid` (configs not yet built)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist; see configs/ablation/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"grid file {str(path)!r} must hold a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = [k for k in raw if k not in GRID_KEYS]
    if unknown:
        raise ConfigError(f"grid {str(path)!r}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(GRID_KEYS)}")
    for key in ("name", "configs"):
        if key not in raw:
            raise ConfigError(f"grid {str(path)!r}: missing required key '{key}'")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"grid {str(path)!r}: 'name' must be a simple name (letters, digits, _ . -), got {name!r}")

    base, base_raw = None, {}
    if raw.get("base") is not None:
        base = _resolve_base(raw["base"], path)
        try:
            base_raw = yaml.safe_load(base.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"base config {str(base)!r} is not valid YAML: {exc}") from None
        if not isinstance(base_raw, dict):
            raise ConfigError(f"base config {str(base)!r} must hold a mapping of sections")

    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"grid {str(path)!r}: 'seeds' must be a non-empty list of integers (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid {str(path)!r}: 'seeds' has duplicates: {seeds}")

    common = _str_list(raw.get("common"), f"grid {str(path)!r}: 'common'")

    configs_raw = raw["configs"]
    if not isinstance(configs_raw, dict) or not configs_raw:
        raise ConfigError(f"grid {str(path)!r}: 'configs' must be a non-empty mapping of config name -> overrides")
    configs = []
    for cname, spec in configs_raw.items():
        where = f"grid {str(path)!r}: config {cname!r}"
        if not isinstance(cname, str) or not _NAME_RE.match(cname):
            raise ConfigError(f"{where}: config names must be simple names (letters, digits, _ . -)")
        note = ""
        if isinstance(spec, dict):
            bad = [k for k in spec if k not in CONFIG_KEYS]
            if bad:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; allowed: {', '.join(CONFIG_KEYS)}")
            note = spec.get("note") or ""
            if not isinstance(note, str):
                raise ConfigError(f"{where}: 'note' must be a string")
            spec = spec.get("overrides")
        configs.append(GridConfig(cname, _str_list(spec, where), note))

    if out_dir is None:
        out_dir = raw.get("out_dir") or Path("runs") / "sweeps" / name
    return Grid(
        path=path, name=name, base=base, base_raw=base_raw, seeds=list(seeds), common=common,
        configs=configs, out_dir=Path(out_dir), description=str(raw.get("description") or ""),
    )


def run_overrides(grid: Grid, config: GridConfig, seed: int, threads: int | None = None) -> list[str]:
    """The overrides of one run, in the order they apply."""
    out = [*grid.common, *config.overrides,
           f"name={grid.run_name(config.name, seed)}", f"out_dir={grid.out_dir}", f"train.seed={seed}"]
    if threads is not None:
        out.append(f"train.threads={threads}")
    return out


def _count_params(cfg) -> int:
    """Parameter count of a run config's model (with its task's head), built on the meta device when possible."""
    import torch

    from .factory import count_parameters
    from .tasks import build_task

    task = build_task(cfg.task, cfg.model)
    try:
        with torch.device("meta"):
            return count_parameters(task.build_model())
    except (RuntimeError, NotImplementedError):  # an op without a meta kernel: build it for real
        return count_parameters(task.build_model())


def validate_grid(grid: Grid) -> None:
    """Build every run's config (and count each config's parameters); raise one error listing all problems."""
    errors = []
    for config in grid.configs:
        for seed in grid.seeds:
            try:
                cfg = build_config(grid.base_raw, run_overrides(grid, config, seed))
            except ConfigError as exc:
                errors.append(f"  {config.name} (seed {seed}): {exc}")
                break  # the same problem would repeat for every seed
        else:
            try:
                grid.params[config.name] = _count_params(cfg)
            except (ValueError, ConfigError) as exc:
                errors.append(f"  {config.name}: model cannot be built: {exc}")
    if errors:
        raise ConfigError(f"grid {str(grid.path)!r} has invalid configs (no run was started):\n" + "\n".join(errors))


# ------------------------------------------------------------------ running
def _grid_sets_threads(grid: Grid, config: GridConfig) -> bool:
    if (grid.base_raw.get("train") or {}).get("threads") is not None:
        return True
    return any(o.split("=", 1)[0] == "train.threads" for o in [*grid.common, *config.overrides])


def _run_one(grid: Grid, config: GridConfig, seed: int, parallel: int, base_file: Path | None) -> dict:
    run = grid.run_name(config.name, seed)
    run_dir = grid.out_dir / run
    threads = None
    env = dict(os.environ)
    if parallel > 1 and not _grid_sets_threads(grid, config):
        threads = max(1, (os.cpu_count() or 1) // parallel)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "columnformer", "train"]
    if base_file is not None:
        cmd += ["--config", str(base_file)]
    cmd += run_overrides(grid, config, seed, threads)
    if run_dir.exists():
        cmd.append("--overwrite")  # an unfinished run (no summary.json): start it again
    log_dir = grid.out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_dir / f"{run}.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        with _LOCK:
            if _STOP.is_set():
                return {"run": run, "rc": None, "seconds": 0.0}
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
            _LIVE.add(proc)
        try:
            rc = proc.wait()
        finally:
            with _LOCK:
                _LIVE.discard(proc)
    return {"run": run, "rc": rc, "seconds": time.perf_counter() - t0}


_LOCK = threading.Lock()
def _die_with_parent() -> None:
    """In a child, before exec: ask Linux to SIGTERM it when the sweep dies, even by SIGKILL (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the interrupt handler still ends children
        pass


_LIVE: set[subprocess.Popen] = set()  # running child processes, ended if the sweep is interrupted
_STOP = threading.Event()


def _stop_children() -> None:
    with _LOCK:
        _STOP.set()
        procs = list(_LIVE)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_grid(grid: Grid, parallel: int = 1, echo=print) -> list[dict]:
    """Run every (config, seed) without a summary.json; returns one record per started run."""
    todo, skipped = [], 0
    for config, seed in grid.runs():
        if (grid.out_dir / grid.run_name(config.name, seed) / "summary.json").exists():
            skipped += 1
        else:
            todo.append((config, seed))
    total = len(todo)
    echo(f"sweep {grid.name}: {len(grid.configs)} configs x {len(grid.seeds)} seeds; "
         f"{skipped} already done, {total} to run, {parallel} at a time -> {grid.out_dir}")
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    base_file = grid.base.resolve() if grid.base is not None else None
    done: list[dict] = []

    def task(item):
        config, seed = item
        rec = _run_one(grid, config, seed, parallel, base_file)
        if rec["rc"] is None:  # the sweep was stopped before this run started
            return rec
        done.append(rec)
        status = "ok" if rec["rc"] == 0 else f"FAILED (exit {rec['rc']}, see {grid.out_dir / 'logs' / (rec['run'] + '.log')})"
        echo(f"[{len(done)}/{total}] {rec['run']}: {status} in {rec['seconds']:.0f}s")
        return rec

    _STOP.clear()
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        records = list(pool.map(task, todo))
    except BaseException:  # Ctrl-C / SIGTERM: end the running children, start no more
        _stop_children()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [r for r in records if r["rc"] is not None]


# ------------------------------------------------------------------ tabulating
def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def collect(grid: Grid) -> list[dict]:
    """One row per config: mean and sample standard deviation (n-1) over the finished seeds."""
    rows = []
    for config in grid.configs:
        sums = []
        for seed in grid.seeds:
            p = grid.out_dir / grid.run_name(config.name, seed) / "summary.json"
            try:
                sums.append(json.loads(p.read_text()))
            except FileNotFoundError:
                pass
            except (json.JSONDecodeError, UnicodeDecodeError):
                print(f"warning: unreadable {p} (being written?); left out of the table", file=sys.stderr)
        row: dict[str, Any] = {"config": config.name, "note": config.note, "seeds": len(sums),
                               "num_params": sums[0]["num_params"] if sums else grid.params.get(config.name)}
        for key, col in (("test_acc", "test_acc"), ("best_val_acc", "val_acc"),
                         ("test_wiring_cost", "wiring_cost"), ("train_samples_per_s", "samples_per_s"),
                         ("wall_time_s", "wall_time_s")):
            vals = [float(s[key]) for s in sums if s.get(key) is not None]
            row[f"{col}_mean"], row[f"{col}_std"] = _mean_std(vals)
        row["overrides"] = " ".join(config.overrides)
        rows.append(row)
    return rows


CSV_COLUMNS = ("config", "note", "seeds", "num_params", "test_acc_mean", "test_acc_std", "val_acc_mean", "val_acc_std",
               "wiring_cost_mean", "wiring_cost_std", "samples_per_s_mean", "samples_per_s_std",
               "wall_time_s_mean", "wall_time_s_std", "overrides")


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "—"
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(grid: Grid, rows: list[dict]) -> str:
    lines = [
        f"Sweep `{grid.name}` ({grid.path}); base `{grid.base}`; seeds {grid.seeds}; "
        f"common overrides: `{' '.join(grid.common) or '(none)'}`.",
        "Accuracy in %, mean ± sample standard deviation over seeds; test accuracy of the final model "
        "(summary.json test_acc); val acc = best validation accuracy; wiring cost on the test split (unscaled by lambda); throughput = training samples/s.",
        "",
        "| config | params | seeds | test acc (%) | val acc (%) | wiring cost | samples/s | wall time (s) | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        params = f"{r['num_params']:,}" if r["num_params"] is not None else "—"
        lines.append(
            f"| {r['config']} | {params} | {r['seeds']}/{len(grid.seeds)} | {_pm(r['test_acc_mean'], r['test_acc_std'], 100)} "
            f"| {_pm(r['val_acc_mean'], r['val_acc_std'], 100)} | {_pm(r['wiring_cost_mean'], r['wiring_cost_std'], 1, 3)} "
            f"| {_pm(r['samples_per_s_mean'], math.nan, 1, 0)} | {_pm(r['wall_time_s_mean'], math.nan, 1, 0)} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def write_report(grid: Grid) -> tuple[Path, Path]:
    rows = collect(grid)
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = grid.out_dir / "results.md", grid.out_dir / "results.csv"
    md.write_text(markdown_table(grid, rows))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in CSV_COLUMNS})
    return md, csv_path


# ------------------------------------------------------------------ command line
def _cmd_sweep(args) -> int:
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1 (got {args.parallel})")
    grid = load_grid(args.grid, out_dir=args.out)
    validate_grid(grid)
    if args.dry_run:
        print(f"grid {grid.name}: {len(grid.configs)} configs x {len(grid.seeds)} seeds, all valid")
        for c in grid.configs:
            print(f"  {c.name:<24}{grid.params[c.name]:>12,} params  {' '.join(c.overrides)}")
        return 0
    failed = []
    if not args.report:
        def _on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, _on_term)
        try:
            records = run_grid(grid, parallel=args.parallel)
        except KeyboardInterrupt:
            print("sweep interrupted; running runs were stopped. Run the same command again to resume.", file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        failed = [r["run"] for r in records if r["rc"] != 0]
    md, csv_path = write_report(grid)
    print(md.read_text())
    print(f"wrote {md} and {csv_path}")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (logs in {grid.out_dir / 'logs'})", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` command to ``subparsers``."""
    p = subparsers.add_parser(
        "sweep", help="run a grid of configs over seeds and tabulate the results",
        description="Run every config of GRID.yaml once per seed (each as `python -m columnformer train` in its own "
        "process), skipping runs that already have a summary.json, then write results.md and results.csv "
        "(mean ± std over seeds) to the sweep directory. All configs are validated before any run starts.",
    )
    p.add_argument("grid", metavar="GRID.yaml", help="grid file (see configs/ablation/)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1); each gets cpus/N threads")
    p.add_argument("--out", default=None, help="sweep directory (default: the grid's out_dir or runs/sweeps/<name>)")
    p.add_argument("--dry-run", action="store_true", help="validate the grid and list its configs; run nothing")
    p.add_argument("--report", action="store_true", help="only write the tables from the runs that finished")
    p.set_defaults(func=_cmd_sweep)
