"""Hugging Face ``datasets`` as image-classification data: hub names, local folders, saved datasets, parquet.

``data.path`` may be

* a hub name (``clane9/imagenet-100``, ``uoft-cs/cifar10``; ``data.hf_config`` picks a configuration),
* a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder (``load_from_disk``),
* a parquet file, or a folder of data files that ``load_dataset`` understands (parquet named
  ``train-*.parquet``/``test-*.parquet``..., an image folder, ...).

A local-looking path that does not exist is an error (never silently tried on the hub).

Columns: ``data.image_column`` / ``data.label_column``, or found automatically ('image'/'img' or the
``Image`` feature; 'label'/'labels' or the ``ClassLabel`` feature). Images are decoded here with
Pillow (the column is read undecoded), so an undecodable image follows ``data.bad_images``.
Splits: see ``data.images.resolve_splits`` (e.g. ImageNet-100 has train + validation: test =
validation, val carved from train; CIFAR-10 has train + test: val carved from train).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..extras import require
from .images import DataError, build_split_datasets, check_labels, resolve_splits
from .transforms import build_transforms

IMAGE_NAMES = ("image", "img", "pixel_values", "jpg", "png")
LABEL_NAMES = ("label", "labels", "fine_label", "class", "cls", "target")


def _datasets():
    return require("datasets", "data.name=hf (Hugging Face datasets)", "hf")


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.endswith((".parquet", ".arrow", ".csv", ".json", ".jsonl"))
        or path.count("/") > 1
        or "\\" in path
    )


def load_hf(data_cfg):
    """A ``DatasetDict`` for ``data.path`` (see the module docstring) with clear errors."""
    datasets = _datasets()
    path = data_cfg.path
    if not path:
        raise DataError("data.name=hf needs data.path: a hub name (e.g. uoft-cs/cifar10) or a local path")
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            ds = datasets.load_from_disk(str(local))
        elif local.is_file() and local.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files={"train": str(local)})
        elif local.is_dir() and not any(local.iterdir()):
            raise DataError(f"data.path {path!r} is an empty folder")
        else:
            try:
                ds = datasets.load_dataset(str(local), name=data_cfg.hf_config)
            except (ValueError, FileNotFoundError) as exc:
                raise DataError(f"data.path {path!r}: the Hugging Face loader cannot read it ({exc})") from None
    elif _looks_local(path):
        raise FileNotFoundError(f"data.path {path!r} does not exist (data.name=hf)")
    else:
        try:
            ds = datasets.load_dataset(path, name=data_cfg.hf_config)
        except Exception as exc:  # DatasetNotFoundError, connection errors, gated repos, ...
            raise DataError(
                f"could not load {path!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                "check the name and network access (HF_HUB_OFFLINE=1 reads the local cache), or pass a local path"
            ) from None
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({data_cfg.train_split: ds})
    return ds


def _pick_column(split_ds, wanted: str | None, names: tuple[str, ...], feature_type, role: str, key: str, where: str) -> str:
    columns = list(split_ds.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{where} has no {role} column {wanted!r} (data.{key}); available columns: {', '.join(columns)}")
        return wanted
    for name in names:
        if name in columns:
            return name
    typed = [c for c, f in split_ds.features.items() if isinstance(f, feature_type)]
    if len(typed) == 1:
        return typed[0]
    raise DataError(f"{where}: cannot tell which column holds the {role}s; set data.{key} to one of: {', '.join(columns)}")


class HFSource:
    """Undecoded image items of one split (picklable: memory-mapped Arrow tables pickle by file)."""

    def __init__(self, ds, column: str):
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return len(self.ds)

    def raw(self, i: int) -> Any:
        return self.ds[i][self.column]


def hf_datasets(data_cfg, model_cfg, seed: int = 0) -> dict:
    datasets = _datasets()
    dd = load_hf(data_cfg)
    where = f"Hugging Face dataset {data_cfg.path!r}"
    roles = resolve_splits(list(dd.keys()), data_cfg, where)
    train = dd[roles["train"]]
    image_col = _pick_column(train, data_cfg.image_column, IMAGE_NAMES, datasets.Image, "image", "image_column", where)
    label_col = _pick_column(train, data_cfg.label_column, LABEL_NAMES, datasets.ClassLabel, "label", "label_column", where)
    feature = train.features[label_col]
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    string_labels = False
    if classes is None:
        values = np.asarray(train[label_col])
        if values.dtype.kind in "US" or values.dtype == object:
            classes, string_labels = sorted({str(v) for v in values}), True
        elif values.dtype.kind not in "iu":
            raise DataError(f"{where}: label column {label_col!r} holds {values.dtype} values; class indices or names are needed")
    sources, labels = {}, {}
    for name in {n for n in roles.values() if n is not None}:
        split = dd[name]
        for col, role, key in ((image_col, "image", "image_column"), (label_col, "label", "label_column")):
            if col not in split.column_names:
                raise DataError(
                    f"{where} split {name!r} has no {role} column {col!r} (data.{key}); available columns: {', '.join(split.column_names)}"
                )
        values = np.asarray(split[label_col])
        if string_labels:
            index = {c: k for k, c in enumerate(classes)}
            unknown = sorted({str(v) for v in values} - index.keys())
            if unknown:
                raise DataError(f"{where} split {name!r} has labels not in the training split: {unknown[:5]}")
            values = np.array([index[str(v)] for v in values], dtype=np.int64)
        elif classes is not None and isinstance(split.features[label_col], datasets.ClassLabel):
            if list(split.features[label_col].names) != classes:
                raise DataError(f"{where}: split {name!r} names its classes differently from split {roles['train']!r}")
        labels[name] = values.astype(np.int64)
        check_labels(labels[name], classes, model_cfg, f"{where} split {name!r}")
        if isinstance(split.features[image_col], datasets.Image):
            split = split.cast_column(image_col, datasets.Image(decode=False))
        sources[name] = HFSource(split.select_columns([image_col]), image_col)
    train_tf, eval_tf = build_transforms(data_cfg, model_cfg)
    return build_split_datasets(sources, labels, roles, train_tf, eval_tf, data_cfg, seed, classes)
