"""Image datasets (issue 6): Hugging Face datasets (save_to_disk, parquet) and image folders, built
on disk by the tests (no network); transforms, determinism, workers, and bad-data errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from columnformer.config import build_config  # noqa: E402
from columnformer.data import build_datasets  # noqa: E402
from columnformer.data.base import sample_rng  # noqa: E402
from columnformer.data.images import DataError  # noqa: E402
from columnformer.data.transforms import (  # noqa: E402
    BadImageError,
    EvalTransform,
    TrainTransform,
    random_resized_crop_box,
)

CLASSES = ["cat", "dog", "owl"]
MODEL = ["model.image_size=[16,16]", "model.in_chans=3", "model.patch=4", "model.num_classes=3",
         "model.geometry.shape=[4,4]", "model.sheet.width=16", "model.sheet.qk_dim=8", "model.sheet.steps=2"]


def _image(k: int, size=(20, 24)) -> Image.Image:
    rng = np.random.default_rng(k)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def cfg(*overrides):
    return build_config({}, [*MODEL, *overrides])


@pytest.fixture
def folder(tmp_path) -> Path:
    """root/{train,val}/<class>/*.png (no test split: it falls back to val, val is carved from train)."""
    root = tmp_path / "folder"
    k = 0
    for split, n in (("train", 6), ("val", 2)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _image(k).save(root / split / c / f"{i}.png")
                k += 1
    (root / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    return root


def _hf_dict(n_train=12, n_test=6, label_name="label"):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), label_name: datasets.ClassLabel(names=CLASSES)})
    make = lambda n, off: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [_image(off + i) for i in range(n)], label_name: [i % 3 for i in range(n)]}, features=feats
    )
    return datasets.DatasetDict({"train": make(n_train, 0), "test": make(n_test, 100)})


@pytest.fixture(scope="module")
def hf_disk(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "saved"
    _hf_dict().save_to_disk(str(path))
    return path


# ------------------------------------------------------------------ transforms
def test_random_resized_crop_box_in_bounds_and_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        l, t, r, b = random_resized_crop_box(40, 30, (0.3, 0.9), (3 / 4, 4 / 3), rng)
        assert 0 <= l < r <= 40 and 0 <= t < b <= 30
        area = (r - l) * (b - t) / (40 * 30)
        assert 0.2 <= area <= 1.0  # rounding aside, the area fraction is in range (or the centre fallback)
    # on a large image rounding is negligible: every area fraction lies in the scale range, and spans it
    areas = []
    for _ in range(300):
        l, t, r, b = random_resized_crop_box(1000, 800, (0.3, 0.6), (3 / 4, 4 / 3), rng)
        areas.append((r - l) * (b - t) / (1000 * 800))
    assert 0.3 - 5e-3 <= min(areas) < 0.33 and 0.57 < max(areas) <= 0.6 + 5e-3
    from columnformer.data.transforms import build_transforms

    c = cfg("data.name=folder", "data.path=.", "data.crop_scale=[0.3,0.6]")
    assert build_transforms(c.data, c.model)[0].scale == (0.3, 0.6)  # the configured range reaches the transform


def test_transforms_shapes_determinism_and_normalisation():
    img = _image(3, size=(37, 23))
    tr = TrainTransform((16, 12), (0.5,) * 3, (0.25,) * 3, scale=(0.2, 1.0), hflip=True, jitter=0.4)
    ev = EvalTransform((16, 12), (0.5,) * 3, (0.25,) * 3, crop_frac=0.875)
    a = tr(img, sample_rng(0, 0, 5))
    assert a.shape == (3, 16, 12) and a.dtype == torch.float32
    assert torch.equal(a, tr(img, sample_rng(0, 0, 5)))  # same (seed, epoch, index): same sample
    assert not torch.equal(a, tr(img, sample_rng(0, 1, 5)))  # another epoch: another crop
    e = ev(img)
    assert e.shape == (3, 16, 12) and torch.equal(e, ev(img))
    assert e.min() >= -2.0 - 1e-6 and e.max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25 with x in [0, 1]
    grey = EvalTransform((8, 8), (0.5,), (0.5,))
    assert grey(img.convert("L")).shape == (1, 8, 8)


# ------------------------------------------------------------------ image folder
def test_folder_splits_shapes_and_determinism(folder):
    c = cfg("data.name=folder", f"data.path={folder}", "data.color_jitter=0.3")
    sets = build_datasets(c.data, c.model, seed=0)
    # train/ has 18 images: val carved out (10%, seeded), test = val/ (6 images)
    assert len(sets["test"]) == 6 and len(sets["val"]) == 2 and len(sets["train"]) == 16
    assert sets["train"].classes == CLASSES
    x, y = sets["train"][0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and int(y) in (0, 1, 2)
    x3 = sets["train"][3][0]
    assert torch.equal(sets["train"][3][0], x3)
    sets["train"].set_epoch(1)
    assert not torch.equal(sets["train"][3][0], x3)  # another epoch: another augmentation
    assert torch.equal(sets["test"][2][0], sets["test"][2][0])  # eval: deterministic
    again = build_datasets(c.data, c.model, seed=0)
    assert torch.equal(again["val"][1][0], sets["val"][1][0]) and again["val"].labels.tolist() == sets["val"].labels.tolist()


def test_folder_without_splits_is_carved(tmp_path):
    root = tmp_path / "flat"
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(10):
            _image(10 * k + i).save(root / c / f"{i}.jpg")
    c = cfg("data.name=folder", f"data.path={root}", "data.val_fraction=0.1", "data.test_fraction=0.2")
    sets = build_datasets(c.data, c.model, seed=0)
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (21, 3, 6)
    seen = set()
    for s in sets.values():
        seen |= set(s.indices.tolist())
    assert seen == set(range(30))  # a partition


def test_workers_give_identical_batches(folder):
    c = cfg("data.name=folder", f"data.path={folder}")
    ds = build_datasets(c.data, c.model, seed=0)["train"]
    ds.set_epoch(2)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4][0], ds[4][0])
    a = torch.cat([x for x, _ in DataLoader(ds, batch_size=5, num_workers=0)])
    b = torch.cat([x for x, _ in DataLoader(ds, batch_size=5, num_workers=2)])
    assert torch.equal(a, b)


def test_folder_trains_end_to_end(folder, tmp_path):
    from columnformer.train import train

    c = build_config({}, [*MODEL, "data.name=folder", f"data.path={folder}", f"out_dir={tmp_path / 'runs'}",
                          "train.epochs=2", "train.batch_size=8", "train.threads=1", "train.progress=false",
                          "data.num_workers=1"])
    summary = train(c)
    assert summary["steps"] == 4 and 0 <= summary["test_acc"] <= 1
    assert summary["bad_images"] == {"train": 0, "val": 0, "test": 0}


# ------------------------------------------------------------------ Hugging Face
def test_hf_save_to_disk(hf_disk):
    c = cfg("data.name=hf", f"data.path={hf_disk}")
    sets = build_datasets(c.data, c.model, seed=0)
    # train + test: test = test, val carved from train (10% of 12 -> 1)
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (11, 1, 6)
    assert sets["train"].classes == CLASSES
    x, y = sets["train"][0]
    assert x.shape == (3, 16, 16) and y.dtype == torch.long
    sets["test"].set_epoch(3)
    again = build_datasets(c.data, c.model, seed=1)["test"][1][0]  # eval transform: no epoch, no seed in it
    assert torch.equal(sets["test"][1][0], again)
    assert sets["test"].labels.tolist() == [i % 3 for i in range(6)]
    pickle.loads(pickle.dumps(sets["train"]))


def test_hf_parquet_and_explicit_splits(tmp_path):
    dd = _hf_dict(label_name="fine_label")
    folder = tmp_path / "pq"
    folder.mkdir()
    for name, split in dd.items():
        split.to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    c = cfg("data.name=hf", f"data.path={folder}", "data.val_split=test", "data.test_split=test",
            "data.label_column=fine_label", "data.augment=false")
    sets = build_datasets(c.data, c.model, seed=0)
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (12, 6, 6)
    first = sets["train"][2][0]
    sets["train"].set_epoch(1)
    assert torch.equal(sets["train"][2][0], first)  # augment=false: the eval transform, the same every epoch
    single = cfg("data.name=hf", f"data.path={folder / 'train-00000-of-00001.parquet'}", "data.label_column=fine_label")
    s2 = build_datasets(single.data, single.model, seed=0)  # one file: val and test carved out of it
    assert len(s2["train"]) + len(s2["val"]) + len(s2["test"]) == 12


# ------------------------------------------------------------------ errors
def test_missing_path_errors(tmp_path):
    for name in ("folder", "hf"):
        c = cfg(f"data.name={name}", f"data.path={tmp_path / 'nope'}")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            build_datasets(c.data, c.model)
    with pytest.raises(DataError, match="needs data.path"):
        c = cfg("data.name=hf")
        build_datasets(c.data, c.model)


def test_missing_split_and_column_errors(hf_disk, folder):
    c = cfg("data.name=hf", f"data.path={hf_disk}", "data.val_split=validation")
    with pytest.raises(DataError, match=r"no split 'validation'.*available splits: train, test"):
        build_datasets(c.data, c.model)
    c = cfg("data.name=hf", f"data.path={hf_disk}", "data.label_column=fine_label")
    with pytest.raises(DataError, match=r"no label column 'fine_label'.*available columns: image, label"):
        build_datasets(c.data, c.model)
    c = cfg("data.name=folder", f"data.path={folder}", "data.test_split=test")
    with pytest.raises(DataError, match=r"no split 'test'.*available splits: train, val"):
        build_datasets(c.data, c.model)
    c = cfg("data.name=hf", f"data.path={hf_disk}", "model.num_classes=2")
    with pytest.raises(DataError, match="3 classes but model.num_classes=2"):
        build_datasets(c.data, c.model)


@pytest.fixture
def bad_folder(folder) -> Path:
    (folder / "train" / "dog" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (folder / "train" / "owl" / "3.png").write_bytes(b"")
    return folder


def test_bad_images_fail(bad_folder):
    from columnformer.data.folder import folder_datasets

    c = cfg("data.name=folder", f"data.path={bad_folder}", "data.augment=false")
    train = folder_datasets(c.data, c.model)["train"]
    with pytest.raises(BadImageError, match=r"dog/0.png.*cannot be decoded.*data.bad_images=skip"):
        for i in range(len(train)):
            train[i]
    with pytest.raises(BadImageError, match="cannot be decoded"):  # also raised through worker processes
        list(DataLoader(train, batch_size=4, num_workers=1))


def test_bad_images_skip_counts(bad_folder, capfd):
    from columnformer.data.folder import folder_datasets

    c = cfg("data.name=folder", f"data.path={bad_folder}", "data.bad_images=skip", "data.val_fraction=0.05")
    train = folder_datasets(c.data, c.model)["train"]
    batches = list(DataLoader(train, batch_size=4, num_workers=2))  # counted across worker processes
    assert sum(len(y) for _, y in batches) == len(train)
    assert train.bad_count() == 2 and len(train.bad_indices()) == 2
    assert "warning: skipping image" in capfd.readouterr().err
    x, y = train[train.bad_indices()[0]]  # replaced by the next decodable image, with its label
    assert x.shape == (3, 16, 16)


def test_hf_bad_image_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    good = [{"bytes": _png_bytes(i), "path": None} for i in range(8)]
    good[5] = {"bytes": b"garbage", "path": "broken.png"}
    ds = datasets.Dataset.from_dict({"image": good, "label": [i % 3 for i in range(8)]}, features=feats)
    ds.save_to_disk(str(tmp_path / "bad"))
    c = cfg("data.name=hf", f"data.path={tmp_path / 'bad'}", "data.bad_images=skip",
            "data.val_fraction=0.2", "data.test_fraction=0.2", "data.augment=false")
    sets = build_datasets(c.data, c.model)
    for s in sets.values():
        assert all(s[i][0].shape == (3, 16, 16) for i in range(len(s)))
    assert sum(s.bad_count() for s in sets.values()) == 1
    from columnformer.data.hf import hf_datasets

    c = cfg("data.name=hf", f"data.path={tmp_path / 'bad'}", "data.val_fraction=0.2", "data.test_fraction=0.2")
    sets = hf_datasets(c.data, c.model)
    with pytest.raises(BadImageError, match="broken.png"):
        for s in sets.values():
            for i in range(len(s)):
                s[i]


def _png_bytes(k: int) -> bytes:
    import io

    buf = io.BytesIO()
    _image(k).save(buf, format="PNG")
    return buf.getvalue()


def test_config_validation():
    from columnformer.config import ConfigError

    with pytest.raises(ConfigError, match="crop_scale"):
        cfg("data.crop_scale=[0.9,0.5]")
    with pytest.raises(ConfigError, match="mean and data.std"):
        cfg("data.mean=[0.5,0.5,0.5]")



def test_normalisation_channels_must_match(folder):
    c = cfg("data.name=folder", f"data.path={folder}", "data.mean=[0.5]", "data.std=[0.5]")
    with pytest.raises(ValueError, match="1 values but model.in_chans=3"):
        build_datasets(c.data, c.model)
    grey = cfg("data.name=folder", f"data.path={folder}", "model.in_chans=1")
    x, _ = build_datasets(grey.data, grey.model)["train"][0]
    assert x.shape == (1, 16, 16)


# ------------------------------------------------------------------ splits and options take effect
def _image_keys(ds) -> list[bytes]:
    """One key per sample: its (deterministic, augment=false) image tensor's bytes."""
    return [ds[i][0].numpy().tobytes() for i in range(len(ds))]


def _assert_disjoint(sets, total: int | None = None):
    keys = {role: _image_keys(ds) for role, ds in sets.items()}
    for role, k in keys.items():
        assert len(set(k)) == len(k), f"{role} holds a sample twice"
    roles = ("train", "val", "test")
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            if sets[a] is not sets[b] and sets[a].split != sets[b].split:  # a split reused for two roles is allowed
                assert not set(keys[a]) & set(keys[b]), f"{a} and {b} share images"
    if total is not None:
        assert len(set().union(*keys.values())) == total


def test_folder_splits_are_disjoint(folder):
    sets = build_datasets(*_cfg_parts(cfg("data.name=folder", f"data.path={folder}", "data.augment=false")), seed=0)
    _assert_disjoint(sets)
    assert len(sets["train"]) + len(sets["val"]) == 18  # the 18 training-folder images, carved into train + val


def test_hf_splits_are_disjoint(hf_disk, tmp_path):
    sets = build_datasets(*_cfg_parts(cfg("data.name=hf", f"data.path={hf_disk}", "data.augment=false")), seed=0)
    _assert_disjoint(sets, total=18)  # 12 train (carved into train + val) + 6 test
    folder = tmp_path / "pq"
    folder.mkdir()
    _hf_dict(n_train=20)["train"].to_parquet(str(folder / "train-00000-of-00001.parquet"))
    for split_seed in (0, 1):  # one file: val and test both carved out of it
        c = cfg("data.name=hf", f"data.path={folder}", "data.augment=false", f"data.split_seed={split_seed}")
        _assert_disjoint(build_datasets(*_cfg_parts(c), seed=0), total=20)


def test_augment_false_gives_identical_batches_across_epochs(folder):
    for augment, same in (("false", True), ("true", False)):
        train = build_datasets(*_cfg_parts(cfg("data.name=folder", f"data.path={folder}", f"data.augment={augment}")),
                               seed=0)["train"]
        train.set_epoch(0)
        first = torch.stack([train[i][0] for i in range(len(train))])
        train.set_epoch(1)
        second = torch.stack([train[i][0] for i in range(len(train))])
        assert torch.equal(first, second) == same, f"augment={augment}"


def _cfg_parts(c):
    return c.data, c.model
