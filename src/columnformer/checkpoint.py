"""Checkpoints that survive: atomic writes, safe loads, clear errors.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (model,
optimizer and scheduler state, RNG states, position in the data, schema version), written to a
temporary file, flushed to disk and renamed over the target, so a kill at any instant leaves
either the old or the new checkpoint. It is loaded with ``weights_only=True``: no unpickling of
arbitrary objects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_SCHEMA_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (temp file in the same folder + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"schema_version": CHECKPOINT_SCHEMA_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) with a clear error when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; was the run started (or killed before its first checkpoint)?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a Columnformer checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); delete it and resume from another checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "schema_version" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a Columnformer checkpoint (missing model/schema_version)")
    if state["schema_version"] > CHECKPOINT_SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has schema version {state['schema_version']}, newer than this library "
            f"({CHECKPOINT_SCHEMA_VERSION}); upgrade columnformer"
        )
    return state


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict`` with a readable error naming missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} in {source} vs {tuple(v.shape)} in model"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(
            f"{source} does not match the model built from the config ({', '.join(parts)}); "
            "was the config changed after the run was created?"
        )
    model.load_state_dict(state_dict)


HEAD_PREFIXES = ("head.", "mask_token")


def load_pretrained(model: torch.nn.Module, run_dir: str | Path, head_prefixes: tuple[str, ...] = HEAD_PREFIXES) -> dict:
    """Initialise ``model`` from the final weights of another run (fine-tuning: weights only).

    The backbone (patch embedding, sheet) must match exactly; a clear :class:`CheckpointError` names
    what differs. Task-head tensors (``head.*``, the mask token) that are absent or shaped differently
    keep their fresh initialisation (all of the head, when any of it does not fit: another task's head). Returns ``{"source", "loaded", "skipped", "unused"}`` (key lists).
    """
    ckpt = Path(run_dir) / "checkpoints" / "last.pt"
    if not (Path(run_dir) / "config.yaml").is_file():
        raise CheckpointError(f"init_from={str(run_dir)!r} is not a run directory (no config.yaml); pass runs/<name>")
    source = load_checkpoint(ckpt)["model"]
    own = model.state_dict()
    is_head = lambda k: k.startswith(head_prefixes)  # noqa: E731
    head = [k for k in own if is_head(k)]
    head_fits = all(k in source and source[k].shape == own[k].shape for k in head)
    skipped = [] if head_fits else sorted(head)  # another task's head: the whole head starts fresh
    backbone_missing = sorted(k for k in own if not is_head(k) and k not in source)
    backbone_shapes = [
        f"{k}: {tuple(source[k].shape)} in {ckpt} vs {tuple(v.shape)} here"
        for k, v in own.items()
        if not is_head(k) and k in source and source[k].shape != v.shape
    ]
    if backbone_missing or backbone_shapes:
        detail = "; ".join([*(f"missing {k}" for k in backbone_missing[:5]), *backbone_shapes[:5]])
        raise CheckpointError(
            f"init_from={str(run_dir)!r}: its sheet / patch embedding does not match this model ({detail}); "
            "use the same model settings as the pre-training run (only the task head may differ)"
        )
    loaded = sorted(k for k in own if k not in skipped)
    model.load_state_dict({**own, **{k: source[k] for k in loaded}})
    unused = sorted(set(source) - set(own))
    return {"source": str(run_dir), "loaded": len(loaded), "skipped": skipped, "unused": unused}
