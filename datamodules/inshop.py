"""In-Shop Clothes Retrieval (DeepFashion) reader.

Official layout (the ``In-shop Clothes Retrieval Benchmark`` folder, with ``Img/img.zip``
extracted so that ``img/`` sits next to the list file's folder)::

    In-shop Clothes Retrieval Benchmark/
        Eval/list_eval_partition.txt    (list_eval_partition.txt at the top level also works)
        img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...   (Img/img/... also works)

``list_eval_partition.txt``: line 1 the number of rows (52,712), line 2 the header
"image_name item_id evaluation_status", then rows such as
``img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train``.

Split: the official one: 3,997 train items (25,882 images); 3,985 test items whose 14,218
query images search the 12,612 gallery images (queries are never gallery items).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.core.contracts import register_dataset
from datamodules.base import RetrievalDataModule
from datamodules.records import (
    DatasetError,
    DatasetRecords,
    SplitRecords,
    absolute_paths,
    check_unique,
    parse_int_column,
    read_table,
    require_dir,
)

INSHOP_URL = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
INSHOP_HINT = (
    f"Get Eval/list_eval_partition.txt and Img/img.zip of the DeepFashion In-shop Clothes Retrieval "
    f"Benchmark (Google Drive folder linked from {INSHOP_URL}; or run `python -m datamodules.prepare "
    "inshop --root ROOT --source DOWNLOADED_FOLDER`). Extract img.zip so that ROOT/img/<MEN|WOMEN>/... "
    "exists next to ROOT/Eval/list_eval_partition.txt (or ROOT/list_eval_partition.txt); pass ROOT as root."
)
INSHOP_COLUMNS = ("image_name", "item_id", "evaluation_status")
INSHOP_STATUSES = ("train", "query", "gallery")
INSHOP_EXPECTED_SIZES = {"train": 25882, "query": 14218, "gallery": 12612, "test": 26830}


def find_inshop_list(root: Path) -> Path:
    """``root/list_eval_partition.txt`` or ``root/Eval/list_eval_partition.txt``."""
    root = Path(root).expanduser()
    require_dir(root, "In-Shop", INSHOP_HINT)
    candidates = (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt")
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise DatasetError(f"In-Shop: neither {candidates[0]} nor {candidates[1]} exists. {INSHOP_HINT}")


def _image_base(root: Path) -> Path:
    """Directory the ``img/...`` names are relative to: ``root``, or ``root/Img`` if only it has ``img/``."""
    if not (root / "img").is_dir() and (root / "Img" / "img").is_dir():
        return root / "Img"
    if not (root / "img").is_dir() and (root.parent / "img").is_dir() and (root / "list_eval_partition.txt").is_file():
        raise DatasetError(
            f"In-Shop: root {root} is one level too deep: the images (img/) are in {root.parent}. "
            f"Pass --data.root '{root.parent}' (the folder that holds Eval/ and img/)."
        )
    return root


def read_inshop(root: Path) -> DatasetRecords:
    """Read In-Shop with the official train / query / gallery partition.

    The test split holds the query rows (``is_query``) followed by the gallery rows
    (``is_gallery``), labelled jointly so a query and the gallery images of its item share a
    label.
    """
    kw = {"dataset": "In-Shop", "hint": INSHOP_HINT}
    list_path = find_inshop_list(root)
    root = Path(root).expanduser().resolve()

    with list_path.open(encoding="utf-8-sig", errors="replace") as f:
        first = f.readline().strip()
    try:
        declared = int(first)
    except ValueError:
        raise DatasetError(
            f"In-Shop: {list_path}, line 1: expected the number of images, found {first!r}. {INSHOP_HINT}"
        ) from None
    table, lines = read_table(list_path, INSHOP_COLUMNS, skip=1, header=True, **kw)
    if declared != len(table):
        raise DatasetError(
            f"In-Shop: {list_path}: line 1 declares {declared} images but {len(table)} rows follow "
            f"(truncated or edited file?). {INSHOP_HINT}"
        )
    names, items, status = table[:, 0], table[:, 1], table[:, 2]

    bad = np.flatnonzero(~np.char.startswith(items, "id_"))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"In-Shop: {list_path}, line {lines[i]}: item_id must look like 'id_00000002', "
            f"found {str(items[i])!r}. {INSHOP_HINT}"
        )
    item_ids = parse_int_column(np.char.replace(items, "id_", "", count=1), lines, list_path, "item_id", **kw)
    bad = np.flatnonzero(~np.isin(status, INSHOP_STATUSES))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"In-Shop: {list_path}, line {lines[i]}: evaluation_status must be one of "
            f"{'/'.join(INSHOP_STATUSES)}, found {str(status[i])!r}. {INSHOP_HINT}"
        )
    check_unique(names, lines, list_path, "image_name", **kw)

    is_train, is_query, is_gallery = (status == s for s in INSHOP_STATUSES)
    shared = np.intersect1d(item_ids[is_train], item_ids[~is_train])
    if shared.size:
        i = int(np.flatnonzero(~is_train & (item_ids == shared[0]))[0])
        raise DatasetError(
            f"In-Shop: {list_path}, line {lines[i]}: item id_{shared[0]:08d} is both a train and a "
            f"test item; the splits must be item-disjoint. {INSHOP_HINT}"
        )

    paths = absolute_paths(_image_base(root), names.tolist())
    train_idx = np.flatnonzero(is_train)
    train = SplitRecords.from_original_ids([paths[i] for i in train_idx], item_ids[train_idx])
    query_idx, gallery_idx = np.flatnonzero(is_query), np.flatnonzero(is_gallery)
    for split, idx in (("train", train_idx), ("query", query_idx), ("gallery", gallery_idx)):
        if idx.size == 0:
            raise DatasetError(f"In-Shop: {list_path} lists no {split} images. {INSHOP_HINT}")
    test_idx = np.concatenate([query_idx, gallery_idx])
    test = SplitRecords.from_original_ids(
        [paths[i] for i in test_idx],
        item_ids[test_idx],
        is_query=np.arange(len(test_idx)) < len(query_idx),
        is_gallery=np.arange(len(test_idx)) >= len(query_idx),
    )
    return DatasetRecords(
        name="inshop", root=root, train=train, test=test, expected_sizes=dict(INSHOP_EXPECTED_SIZES)
    )


@register_dataset("inshop")
class InShop(RetrievalDataModule):
    """DeepFashion In-Shop Clothes Retrieval (Liu et al., CVPR 2016): queries search a separate gallery."""

    recall_ks = (1, 10, 20, 30, 40)
    compute_nmi = False

    def read_records(self, root: Path) -> DatasetRecords:
        return read_inshop(root)
