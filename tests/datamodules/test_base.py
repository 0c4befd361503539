"""The shared datamodule: splits, protocols, loaders, views and bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.core.contracts import DataRequest, ViewRequest
from datamodules.cub import CUB200
from datamodules.records import DatasetError
from tests.datamodules.fixtures import make_cub


@pytest.fixture()
def cub_root(tmp_path: Path) -> Path:
    return make_cub(tmp_path, classes=200, per_class=3).parent


def _dm(root: Path, **kwargs) -> CUB200:
    defaults = dict(root=str(root), image_size=16, classes_per_batch=4, samples_per_class=2, eval_batch_size=64, num_workers=0)
    return CUB200(**{**defaults, **kwargs})


def test_paper_protocol_validates_on_test_split(cub_root: Path) -> None:
    dm = _dm(cub_root)
    with pytest.warns(UserWarning, match="differs from the published"):
        dm.setup("fit")
    assert dm.num_train_classes == 100
    assert dm.val_records is dm.test_records
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (64, 3, 16, 16)
    assert batch["is_query"].all() and batch["is_gallery"].all()
    assert torch.equal(batch["index"], torch.arange(64))


def test_holdout_protocol_is_class_disjoint_and_deterministic(cub_root: Path) -> None:
    dm = _dm(cub_root, protocol="holdout", val_fraction=0.2)
    with pytest.warns(UserWarning):
        dm.setup("fit")
    train, val = dm.train_records, dm.val_records
    assert dm.num_train_classes == 80 and val.num_classes == 20
    assert not set(train.class_ids.tolist()) & set(val.class_ids.tolist())
    assert set(train.class_ids.tolist()) | set(val.class_ids.tolist()) == set(range(1, 101))
    again = _dm(cub_root, protocol="holdout", val_fraction=0.2, seed=5)  # training seed does not move the split
    with pytest.warns(UserWarning):
        again.setup("fit")
    assert np.array_equal(again.val_records.class_ids, val.class_ids)
    assert dm.describe()["protocol"] == "holdout"


def test_train_loader_is_class_balanced_and_views_stack(cub_root: Path) -> None:
    dm = _dm(cub_root)
    with pytest.warns(UserWarning):
        dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16)
    _, counts = np.unique(batch["label"].numpy(), return_counts=True)
    assert (counts == 2).all() and len(counts) == 4
    dm.apply_request(DataRequest(views=ViewRequest(num_views=3, augment="randaugment")))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 3, 16, 16)
    subset = np.flatnonzero(dm.train_records.labels < 10)
    dm.apply_request(DataRequest(train_indices=subset))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["index"].tolist()) <= set(subset.tolist())


def test_missing_root_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="CUB"):
        _dm(tmp_path / "nowhere").setup("fit")


def test_missing_image_is_reported_before_training(cub_root: Path) -> None:
    victim = next((cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="missing.*" + victim.name):
        _dm(cub_root).setup("fit")


def test_truncated_image_is_reported_before_training(cub_root: Path) -> None:
    victim = sorted((cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="truncated"):
        _dm(cub_root).setup("fit")


def test_corrupt_image_decoding_error_names_the_file(cub_root: Path) -> None:
    dm = _dm(cub_root, verify_images="none")
    with pytest.warns(UserWarning):
        dm.setup("fit")
    Path(dm.test_records.paths[0]).write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="Cannot decode image"):
        next(iter(dm.val_dataloader()))
