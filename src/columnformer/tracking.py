"""Experiment trackers besides ``metrics.jsonl`` (which is always written): TensorBoard and Weights & Biases.

``train.tracking: [tensorboard, wandb]`` (optional extra: ``pip install 'columnformer[tracking]'``).
Every record the trainer logs (``type`` step / epoch / rewire, and the final summary) goes to each
tracker as scalars named ``<type>/<key>`` at the record's optimizer step. Only rank 0 tracks.

* TensorBoard: event files in ``<run_dir>/tensorboard/``; on resume, events after the resumed step
  are purged (``purge_step``) so curves do not double back.
* W&B: files in ``<run_dir>/wandb/``. Offline mode when ``WANDB_MODE=offline`` (or ``disabled``),
  when no API key is configured (no ``WANDB_API_KEY``, no ``~/.netrc`` entry), or when the online
  init fails (no network: after wandb's init timeout, ``WANDB_INIT_TIMEOUT``); sync later with
  ``wandb sync <run_dir>/wandb/offline-run-*``. The W&B run id is kept in ``<run_dir>/wandb_id.txt``
  so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from .extras import MissingExtraError, require

EXTRA_HINT = "pip install 'columnformer[tracking]'"




def check_available(names: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`MissingExtraError` before any work starts when a tracker's package is missing."""
    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in names:
        pkg = packages[name]
        try:
            found = importlib.util.find_spec(pkg) is not None
        except ValueError:  # pragma: no cover - a module without a spec in sys.modules
            found = pkg in sys.modules and sys.modules[pkg] is not None
        if pkg in sys.modules and sys.modules[pkg] is None:  # explicitly blocked (tests)
            found = False
        if not found:
            raise MissingExtraError(
                f"train.tracking includes {name!r} but the {pkg} package is not installed; "
                f"install the tracking extra ({EXTRA_HINT}) or remove {name!r} from train.tracking"
            )


def _scalars(record: dict) -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if k in ("type", "step") or isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, dict):  # e.g. bad_images per split, baseline
            out.update({f"{k}/{kk}": float(vv) for kk, vv in v.items() if isinstance(vv, (int, float)) and not isinstance(vv, bool)})
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        tb = require("torch.utils.tensorboard", "TensorBoard tracking (train.tracking)", "tracking", "tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, record: dict) -> None:
        kind, step = record.get("type", "metrics"), int(record.get("step", 0))
        for k, v in _scalars(record).items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class WandbTracker:
    def __init__(self, cfg, run_dir: Path, resume: bool = False):
        self.wandb = wandb = require("wandb", "W&B tracking (train.tracking)", "tracking")
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if (resume and id_file.is_file()) else None
        mode = _wandb_mode()
        if mode == "offline" and not os.environ.get("WANDB_MODE"):
            print(f"wandb: no API key configured; logging offline to {run_dir / 'wandb'} "
                  "(sync later with `wandb sync`)", file=sys.stderr)
        kwargs = dict(
            project=cfg.train.wandb_project, entity=cfg.train.wandb_entity, name=cfg.name, dir=str(run_dir),
            config=cfg.model_dump(mode="json"), id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # no network / server unreachable / bad key: keep the run, log offline
            if mode != "online":
                raise
            print(f"wandb: online init failed ({type(exc).__name__}: {str(exc)[:200]}); logging offline to "
                  f"{run_dir / 'wandb'} instead", file=sys.stderr)
            self.run = wandb.init(mode="offline", **kwargs)
        if self.run is not None and getattr(self.run, "id", None):
            id_file.write_text(self.run.id)

    def log(self, record: dict) -> None:
        kind = record.get("type", "metrics")
        data = {f"{kind}/{k}": v for k, v in _scalars(record).items()}
        if data:
            self.run.log(data, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fan-out to the configured trackers (none: a no-op)."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        for t in self.trackers:
            t.log(record)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


def build_trackers(cfg, run_dir: Path, enabled: bool = True, resume_step: int | None = None) -> Trackers:
    """Trackers for ``cfg.train.tracking`` writing into ``run_dir`` (none when ``enabled`` is false)."""
    names = list(cfg.train.tracking)
    check_available(names)
    if not enabled:
        return Trackers([])
    out = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            out.append(TensorBoardTracker(Path(run_dir), resume_step))
        else:
            out.append(WandbTracker(cfg, Path(run_dir), resume=resume_step is not None))
    return Trackers(out)
