"""`columnformer features RUN --stimuli SRC`: the sheet's column states per stimulus, column and step, on disk.

    stimuli (S)  ->  the run's model, record="features", one chunk of stimuli at a time
                 ->  features.npy   (S, T, N, K) float32, a memory-mapped .npy written chunk by chunk
                     coords.npy     (N, D)  column coordinates (the geometry's)
                     areas.npy      (N,)    area label of each column (its layer; 0 on single-layer sheets)
                     stimuli.json   the stimulus IDs in row order (file names, array rows or split indices)
                     meta.json      run, checkpoint, source, reduction, shapes

Stimulus sources: ``split:NAME`` (a split of the run's own data, e.g. ``split:test``), an ``.npy`` array of model
inputs (images (S, C, H, W) or (S, H, W) already normalised as the run's data; token sequences (S, L) for the
algorithmic tasks), or a folder of image files (decoded and centre-cropped with the run's evaluation transform).

Reductions of the channels C of each column state: ``none`` (K = C), ``mean`` (K = 1, the mean over channels),
``random:K`` (a fixed Gaussian projection, seed 0, scaled by 1/sqrt(K)), ``pca:K`` (the top K principal
components of the channel vectors over all stimuli, steps and columns: their exact covariance is accumulated
in a first pass over the chunks, the projection applied in a second). No more than one chunk of stimuli (``chunk``) is in memory at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REDUCTIONS = ("none", "mean", "random:K", "pca:K")


@dataclass
class FeatureSet:
    """The arrays of one export (``features`` is a read-only memory map of the written file)."""

    features: np.ndarray  # (S, T, N, K)
    coords: np.ndarray  # (N, D)
    areas: np.ndarray  # (N,)
    stimulus_ids: list[str]
    path: Path


def parse_reduce(spec: str) -> tuple[str, int | None]:
    """``none`` / ``mean`` / ``random:K`` / ``pca:K`` -> (kind, K)."""
    m = re.fullmatch(r"(none|mean)|(random|pca):(\d+)", spec)
    if m is None or (m.group(3) is not None and int(m.group(3)) < 1):
        raise ValueError(f"--reduce {spec!r}: use none, mean, random:K or pca:K with K >= 1 (e.g. pca:16)")
    return (m.group(1), None) if m.group(1) else (m.group(2), int(m.group(3)))


class _ArrayStimuli(torch.utils.data.Dataset):
    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.array(self.array[i]))  # a copy: the array may be a read-only memory map
        return (x,)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], transform, mode: str):
        self.files, self.transform, self.mode = files, transform, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from ..data.transforms import decode_image

        try:
            img = decode_image(self.files[i], self.mode)
        except Exception as exc:
            raise ValueError(f"stimulus image {str(self.files[i])!r} cannot be decoded ({exc})") from None
        return (self.transform(img),)


def load_stimuli(source: str, cfg, task) -> tuple[torch.utils.data.Dataset, list[str]]:
    """The stimuli of ``source`` as a dataset whose items start with the model input, and their IDs."""
    if source.startswith("split:"):
        split = source.removeprefix("split:")
        sets = task.datasets(cfg.data.model_copy(update={"augment": False}), cfg.model, seed=cfg.train.seed)
        if split not in sets:
            raise ValueError(f"--stimuli {source!r}: the run's data has the splits {', '.join(sets)}")
        ds = task.dataset(sets[split], split, seed=cfg.train.seed)
        return ds, [f"{split}/{i}" for i in range(len(ds))]
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--stimuli {source!r} does not exist (a folder of images, an .npy array or split:NAME)")
    if path.is_file():
        if path.suffix != ".npy":
            raise ValueError(f"--stimuli {source!r}: a file must be an .npy array of model inputs")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"--stimuli {source!r} is not a plain .npy array ({exc})") from None
        if cfg.task.name in ("classify", "mim"):  # image runs; the algorithmic tasks take token sequences
            if array.ndim == 3 and cfg.model.in_chans == 1:
                array = array[:, None]
            want = (cfg.model.in_chans, *cfg.model.image_size)
            if array.ndim != 4 or tuple(array.shape[1:]) != want:
                raise ValueError(
                    f"--stimuli {source!r} has shape {tuple(array.shape)}; this run takes images (S, {want[0]}, "
                    f"{want[1]}, {want[2]}) normalised like its data"
                )
            array = array.astype(np.float32, copy=False)
        elif array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"--stimuli {source!r}: this run takes integer token sequences (S, L), got "
                             f"{array.dtype} {tuple(array.shape)}")
        return _ArrayStimuli(array), [f"{path.name}[{i}]" for i in range(len(array))]
    from ..data.folder import IMAGE_EXTENSIONS
    from ..data.transforms import build_transforms

    if cfg.task.name not in ("classify", "mim"):
        raise ValueError(f"--stimuli {source!r}: a folder of images needs an image run (this one is {cfg.task.name})")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"--stimuli {source!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    _, evaluate = build_transforms(cfg.data, cfg.model)
    mode = "L" if cfg.model.in_chans == 1 else "RGB"
    return _ImageFiles(files, evaluate, mode), [str(f.relative_to(path)) for f in files]


@torch.no_grad()
def _column_states(model, inputs: torch.Tensor, steps: int | None) -> torch.Tensor:
    """(B, T, N, C) float32 column states after every step."""
    _, trace = model(inputs, record=("features",), **({} if steps is None else {"steps": steps}))
    return torch.stack(trace.features, dim=1).float()  # (B, T, N, C)


def export_features(
    run_dir: str | Path, stimuli: str, out: str | Path | None = None, reduce: str = "none", chunk: int = 256,
    checkpoint: str = "last", steps: int | None = None, progress: bool = True,
) -> FeatureSet:
    """Write the column states of ``stimuli`` (see the module docstring) into ``out``; return the arrays."""
    from tqdm import tqdm

    from ..run import load_run
    from ..tasks import build_task

    if chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {chunk}")
    kind, k = parse_reduce(reduce)
    run = load_run(run_dir, checkpoint=checkpoint)
    cfg, model = run.config, run.model
    if steps is not None and not cfg.model.sheet.recurrent:
        raise ValueError(f"--steps needs a recurrent run; this one has {cfg.model.sheet.steps} feed-forward blocks")
    task = build_task(cfg.task, cfg.model)
    ds, ids = load_stimuli(stimuli, cfg, task)
    if len(ds) == 0:
        raise ValueError(f"--stimuli {stimuli!r} holds no stimuli")
    sheet = model.sheet
    T, N, C = steps or cfg.model.sheet.steps, sheet.n, cfg.model.sheet.width
    if kind in ("random", "pca") and k > C:
        raise ValueError(f"--reduce {reduce}: K = {k} exceeds the column width {C}")
    out = Path(out) if out is not None else Path(run_dir) / "features" / _slug(stimuli)
    out.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=chunk, shuffle=False)

    def chunks(desc: str):
        return tqdm(loader, desc=desc, disable=not progress, leave=False)

    proj = None
    if kind == "random":
        proj = torch.randn(C, k, generator=torch.Generator().manual_seed(0)) / k**0.5  # (C, K)
    elif kind == "pca":  # first pass: exact channel covariance over every (stimulus, step, column), chunk by chunk
        total, outer, count = torch.zeros(C, dtype=torch.float64), torch.zeros(C, C, dtype=torch.float64), 0
        for batch in chunks("fitting PCA"):
            x = _column_states(model, batch[0], steps).reshape(-1, C).double()
            total += x.sum(0)
            outer += x.T @ x
            count += len(x)
        mu = total / count
        cov = outer / count - torch.outer(mu, mu)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(evals, descending=True)[:k]
        mean, comps = mu.float(), evecs[:, order].float()  # (C,), (C, K)
        explained = (evals[order].clamp_min(0) / evals.clamp_min(0).sum()).tolist()
    width = {"none": C, "mean": 1}.get(kind, k)
    tmp = out / "features.npy.tmp"
    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ds), T, N, width))
    row = 0
    for batch in chunks("features"):
        x = _column_states(model, batch[0], steps)  # (B, T, N, C)
        if kind == "mean":
            x = x.mean(-1, keepdim=True)
        elif kind == "random":
            x = x @ proj
        elif kind == "pca":
            x = (x - mean) @ comps
        feats[row : row + len(x)] = x.numpy()
        row += len(x)
    feats.flush()
    del feats
    tmp.replace(out / "features.npy")
    coords = np.asarray(sheet.geometry.coords, dtype=np.float64)
    areas = np.asarray(sheet.geometry.layer, dtype=np.int64)
    np.save(out / "coords.npy", coords)
    np.save(out / "areas.npy", areas)
    (out / "stimuli.json").write_text(json.dumps(ids))
    meta = {"run": str(run_dir), "checkpoint": run.checkpoint, "stimuli": stimuli, "reduce": reduce,
            "shape": {"stimuli": len(ds), "steps": T, "columns": N, "channels": width}, "chunk": chunk,
            "dtype": "float32", "layout": "features[stimulus, step, column, channel]"}
    if kind == "pca":
        meta["pca_explained_variance_ratio"] = [float(v) for v in explained]
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return FeatureSet(np.load(out / "features.npy", mmap_mode="r"), coords, areas, ids, out)


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).name if not source.startswith("split:") else source)


def _cmd_features(args) -> int:
    result = export_features(args.run_dir, args.stimuli, args.out, args.reduce, args.chunk, args.checkpoint, args.steps)
    S, T, N, K = result.features.shape
    print(json.dumps({"out": str(result.path), "stimuli": S, "steps": T, "columns": N, "channels": K}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "features", help="export the sheet's column states per stimulus, column and step",
        description="Stream stimuli through a run's model and write its column states (per stimulus, step, column; "
        "optionally reduced) with the column coordinates and area labels to .npy files (written chunk by chunk).",
    )
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--stimuli", required=True, help="split:NAME (the run's data), an .npy array of inputs, or a folder of images")
    p.add_argument("--out", default=None, help="output folder (default RUN/features/<stimuli>)")
    p.add_argument("--reduce", default="none", help="none, mean, random:K or pca:K (default none)")
    p.add_argument("--chunk", type=int, default=256, help="stimuli per forward pass and in memory at a time (default 256)")
    p.add_argument("--checkpoint", default="last", choices=("best", "last"))
    p.add_argument("--steps", type=int, default=None, help="recurrent runs: unroll this many steps (default as trained)")
    p.set_defaults(func=_cmd_features)
