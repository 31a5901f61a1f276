"""Image folders: ``root/<class>/<image>``, optionally split as ``root/train/<class>/...``,
``root/val/<class>/...`` (or ``validation``), ``root/test/<class>/...``.

Split mode is used when ``root/<data.train_split>`` (default ``train``) holds class sub-folders;
missing val/test splits are carved out of train with a seeded permutation (``data.split_seed``).
Without split folders the whole tree is one pool, split the same way. Classes are the sorted
names of the training class folders that hold at least one image; files are taken in sorted order.
Files whose extension is not an image extension are ignored; an image file that cannot be decoded
follows ``data.bad_images``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import DataError, ListSource, build_split_datasets, check_labels, resolve_splits
from .transforms import build_transforms

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _class_dirs(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files (recursively) for each sub-folder that holds images."""
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        if files:
            out[d.name] = files
    return out


def _has_class_dirs(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())


def folder_datasets(data_cfg, model_cfg, seed: int = 0) -> dict:
    if not data_cfg.path:
        raise DataError("data.name=folder needs data.path: a folder of class sub-folders (root/<class>/<image>)")
    root = Path(data_cfg.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.path {data_cfg.path!r} does not exist (data.name=folder)")
    if not root.is_dir():
        raise DataError(f"data.path {data_cfg.path!r} is not a folder (data.name=folder wants root/<class>/<image>)")
    where = f"image folder {str(root)!r}"
    split_mode = _has_class_dirs(root / data_cfg.train_split) and any(
        _is_image(p) for p in (root / data_cfg.train_split).rglob("*")
    ) and not any(_is_image(p) for p in (root / data_cfg.train_split).iterdir())
    if split_mode:
        available = [p.name for p in sorted(root.iterdir()) if _has_class_dirs(p)]
    else:
        if data_cfg.val_split is not None or data_cfg.test_split is not None:
            raise DataError(
                f"{where} has no split sub-folders ({data_cfg.train_split}/, val/, test/ holding class folders) "
                "but data.val_split/data.test_split is set"
            )
        available = [data_cfg.train_split]
    roles = resolve_splits(available, data_cfg, where)
    per_split = {}
    for name in {n for n in roles.values() if n is not None}:
        per_split[name] = _class_dirs(root / name if split_mode else root)
    classes = list(per_split[roles["train"]])
    if not classes:
        raise DataError(
            f"{where} holds no images in class sub-folders (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    index = {c: k for k, c in enumerate(classes)}
    sources, labels = {}, {}
    for name, by_class in per_split.items():
        unknown = sorted(set(by_class) - index.keys())
        if unknown:
            raise DataError(f"{where} split {name!r} has class folders that the training split lacks: {unknown[:5]}")
        files = [f for c in by_class for f in by_class[c]]
        labels[name] = np.array([index[c] for c in by_class for _ in by_class[c]], dtype=np.int64)
        if not files:
            raise DataError(f"{where} split {name!r} holds no images")
        sources[name] = ListSource([str(f) for f in files])
        check_labels(labels[name], classes, model_cfg, where)
    train_tf, eval_tf = build_transforms(data_cfg, model_cfg)
    return build_split_datasets(sources, labels, roles, train_tf, eval_tf, data_cfg, seed, classes)
