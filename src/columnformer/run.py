"""Run directories: layout, provenance, the metrics log, and ``load_run`` for notebooks.

    runs/<name>/
      config.yaml        the resolved config (re-loadable with --config)
      provenance.json    git commit (+ dirty flag), package versions, hardware, command, schema versions
      metrics.jsonl      one JSON line per log step ("type": "step") and per epoch ("type": "epoch")
      summary.json       final metrics, parameter count, wall time, throughput, baseline
      checkpoints/last.pt, checkpoints/best.pt
      figures/*.png
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import CHECKPOINT_SCHEMA_VERSION, CheckpointError, load_checkpoint, load_model_state
from .config import CONFIG_SCHEMA_VERSION, ConfigError, RunConfig, load_config

PACKAGES = ("columnformer", "torch", "numpy", "scipy", "scikit-learn", "pydantic", "matplotlib")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """Where a run came from: code version, packages, hardware and the exact command."""
    src = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], src)
    status = _git(["status", "--porcelain", "--untracked-files=no"], src) if commit else None
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    hardware = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "packages": versions,
        "python": sys.version.split()[0],
        "hardware": hardware,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "config_schema_version": CONFIG_SCHEMA_VERSION,
        "checkpoint_schema_version": CHECKPOINT_SCHEMA_VERSION,
    }


class MetricsLog:
    """Append-only JSON-lines log that can be cut back to a checkpoint's line count on resume."""

    def __init__(self, path: Path):
        self.path = path

    def count(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path) as f:
            return sum(1 for _ in f)

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` lines (those logged before the checkpoint being resumed)."""
        if not self.path.exists():
            return
        with open(self.path) as f:
            kept = f.readlines()[:lines]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        """The records; a half-written last line (a process killed while writing it) is left out with a warning."""
        if not self.path.exists():
            return []
        lines = [x for x in self.path.read_text().splitlines() if x.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    print(f"warning: {self.path}: the last line is half-written (a killed writer?); left out", file=sys.stderr)
                    break
                raise ValueError(f"{self.path}: line {i + 1} is not valid JSON; the metrics log is damaged") from None
        return records


# What a run (and the commands that add to it) write into its directory; `--overwrite` removes these alone.
RUN_OUTPUTS = (
    "config.yaml", "provenance.json", "metrics.jsonl", "metrics.tmp", "summary.json", "figures", "tensorboard",
    "wandb", "wandb_id.txt", "analysis.json", "analysis.json.tmp", "analysis_arrays.npz", "report.html",
)
RUN_OUTPUT_GLOBS = ("probe-*.json", "robustness*.json", "robustness*.md", "checkpoints/*.pt", "checkpoints/*.tmp",
                    "checkpoints/.*.tmp")


class RunLockedError(FileExistsError):
    """Another process is writing this run directory."""


@contextmanager
def run_lock(run_dir: str | Path):
    """Hold ``run_dir/.lock`` (an exclusive ``flock``) while a process writes the run.

    A second writer (train, resume or --overwrite of the same run) is refused with the holder's host and
    PID. The operating system releases the lock when its process ends, however it ends (kill -9
    included), so a stale lock file never blocks anyone. Without ``fcntl`` (Windows) there is no lock.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise RunLockedError(
            f"run directory {str(run_dir)!r} is in use by another process ({holder}); wait for it to finish or stop "
            "it (a stopped or killed process releases the lock), or pick another name (name=...)"
        ) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def remove_run(run_dir: str | Path) -> None:
    """Delete what a run wrote in ``run_dir`` (see RUN_OUTPUTS); other files, and then the folder, are kept.

    Refuses a folder that does not hold a run (no config.yaml), so a mistyped name cannot delete foreign data.
    """
    import shutil

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileExistsError(
            f"{str(run_dir)!r} has a checkpoints/ folder but no config.yaml, so it is not a Columnformer run; "
            "--overwrite only replaces runs. Move it away or pick another name (name=...)"
        )
    for rel in RUN_OUTPUTS:
        path = run_dir / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for pattern in RUN_OUTPUT_GLOBS:
        for path in run_dir.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()


@dataclass
class Run:
    """A run directory loaded for analysis: model (eval mode, on CPU), config, metrics, summary."""

    path: Path
    config: RunConfig
    model: torch.nn.Module
    metrics: list[dict]
    summary: dict | None
    checkpoint: str


def read_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.yaml); pass runs/<name>")
    return load_config(cfg_path)


def load_run(run_dir: str | Path, checkpoint: str = "last") -> Run:
    """Load a run directory: the model with its final (``last``) or ``best``-on-validation weights, config, metrics."""
    from .tasks import build_task

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ckpt_path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt_path.exists() and checkpoint == "best":
        ckpt_path = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt_path)
    model = build_task(cfg.task, cfg.model).build_model()
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(ckpt_path)!r} holds non-finite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): "
            "the run diverged before it was written; retrain with a lower optim.lr or optim.grad_clip"
        )
    load_model_state(model, state["model"], source=str(ckpt_path))
    model.eval()
    summary = read_summary(run_dir)
    return Run(run_dir, cfg, model, MetricsLog(run_dir / "metrics.jsonl").read(), summary, ckpt_path.stem)


def read_summary(run_dir: str | Path) -> dict | None:
    """summary.json of a run (None before it finished); a damaged file is an error naming it."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(
            f"{path} is damaged (half-written?); `columnformer resume {run_dir}` re-evaluates the run and writes it again"
        ) from None


def write_json(data: dict, path: Path) -> None:
    """Write a JSON file atomically (a temporary file in the same folder, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_config(cfg: RunConfig, path: Path) -> None:
    """Write config.yaml atomically (a temporary file in the same folder, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)


__all__ = ["CheckpointError", "MetricsLog", "Run", "load_run", "provenance", "read_run_config", "write_config"]
