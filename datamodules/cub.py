"""CUB-200-2011 reader.

Official layout (the extracted ``CUB_200_2011.tgz``)::

    CUB_200_2011/
        images.txt              <image_id> <image_name>      1-based ids, 11,788 lines
        image_class_labels.txt  <image_id> <class_id>        class ids 1..200
        images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...

Deep-metric-learning split (class-disjoint, not the official ``train_test_split.txt``
classification split): classes 1-100 train (5,864 images), classes 101-200 test (5,924
images); every test image is both a query and a gallery item.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.core.contracts import register_dataset
from datamodules.base import RetrievalDataModule
from datamodules.records import (
    DatasetError,
    DatasetRecords,
    absolute_paths,
    check_range,
    check_unique,
    find_dataset_dir,
    parse_int_column,
    read_table,
    split_by_class,
)

CUB_URL = "https://data.caltech.edu/records/65de6-vp158"
CUB_HINT = (
    f"Download CUB_200_2011.tgz from {CUB_URL} (or run `python -m datamodules.prepare cub --root DIR`) "
    "and extract it so that DIR/CUB_200_2011/ holds images.txt, image_class_labels.txt and images/; "
    "pass DIR or DIR/CUB_200_2011 as root."
)
CUB_NUM_CLASSES = 200
CUB_TRAIN_CLASSES = 100  # classes 1..100 train, 101..200 test
CUB_EXPECTED_SIZES = {"train": 5864, "test": 5924}


# --------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------


def find_cub_dir(root: Path) -> Path:
    """The ``CUB_200_2011`` directory: ``root`` itself or ``root/CUB_200_2011``."""
    return find_dataset_dir(root, "images.txt", "CUB_200_2011", dataset="CUB-200-2011", hint=CUB_HINT)


def read_cub(
    root: Path, *, num_classes: int = CUB_NUM_CLASSES, num_train_classes: int = CUB_TRAIN_CLASSES
) -> DatasetRecords:
    """Read CUB-200-2011 with the class-disjoint split (classes 1-100 train, 101-200 test).

    ``num_classes`` / ``num_train_classes`` read other datasets written in the CUB layout
    (the embedded synthetic default): class ids must lie in ``1..num_classes`` and
    ``1..num_train_classes`` are the training classes. The published CUB sizes are attached
    as ``expected_sizes`` only for the CUB defaults.
    """
    name = "CUB-200-2011"
    base = find_cub_dir(root)
    kw = {"dataset": name, "hint": CUB_HINT}

    images_txt = base / "images.txt"
    table, lines = read_table(images_txt, ("image_id", "image_name"), **kw)
    image_ids = parse_int_column(table[:, 0], lines, images_txt, "image_id", **kw)
    image_names = table[:, 1]
    check_unique(image_ids, lines, images_txt, "image_id", **kw)
    check_unique(image_names, lines, images_txt, "image_name", **kw)

    labels_txt = base / "image_class_labels.txt"
    ltable, llines = read_table(labels_txt, ("image_id", "class_id"), **kw)
    label_ids = parse_int_column(ltable[:, 0], llines, labels_txt, "image_id", **kw)
    class_ids = parse_int_column(ltable[:, 1], llines, labels_txt, "class_id", **kw)
    check_unique(label_ids, llines, labels_txt, "image_id", **kw)
    check_range(class_ids, 1, num_classes, llines, labels_txt, "class_id", **kw)

    # Join the two files on image_id (the official files are aligned line by line, but only
    # the ids are a contract).
    _, in_images, in_labels = np.intersect1d(image_ids, label_ids, assume_unique=True, return_indices=True)
    if len(in_images) < len(image_ids):
        i = int(np.flatnonzero(~np.isin(image_ids, label_ids))[0])
        raise DatasetError(
            f"{name}: {images_txt}, line {lines[i]}: image_id {image_ids[i]} has no class in "
            f"{labels_txt}. {CUB_HINT}"
        )
    if len(in_labels) < len(label_ids):
        i = int(np.flatnonzero(~np.isin(label_ids, image_ids))[0])
        raise DatasetError(
            f"{name}: {labels_txt}, line {llines[i]}: image_id {label_ids[i]} is not listed in "
            f"{images_txt}. {CUB_HINT}"
        )
    image_class = np.empty_like(image_ids)
    image_class[in_images] = class_ids[in_labels]

    is_cub = (num_classes, num_train_classes) == (CUB_NUM_CLASSES, CUB_TRAIN_CLASSES)
    paths = absolute_paths(base / "images", image_names.tolist())
    splits = split_by_class(paths, image_class, num_train_classes, labels_txt, **kw)
    return DatasetRecords(
        name="cub",
        root=base,
        train=splits["train"],
        test=splits["test"],
        expected_sizes=dict(CUB_EXPECTED_SIZES) if is_cub else {},
    )


@register_dataset("cub")
class CUB200(RetrievalDataModule):
    """CUB-200-2011 birds, 200 species (Wah et al., 2011), class-disjoint 100/100 DML split."""

    recall_ks = (1, 2, 4, 8)
    compute_nmi = True

    def read_records(self, root: Path) -> DatasetRecords:
        return read_cub(root)
