"""Stanford Online Products (SOP) reader.

Official layout (the extracted ``Stanford_Online_Products.zip``)::

    Stanford_Online_Products/
        Ebay_train.txt   header "image_id class_id super_class_id path", 59,551 rows
        Ebay_test.txt    same header, 60,502 rows
        bicycle_final/111085122871_0.JPG ... (12 "<super class>_final/" folders)

Split: the official one, already class-disjoint: 11,318 train classes (ids 1..11318) and
11,316 test classes (ids 11319..22634); every test image is both a query and a gallery item.
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
    check_range,
    check_unique,
    find_dataset_dir,
    parse_int_column,
    read_table,
    require_nonempty,
)

SOP_URL = "https://cvgl.stanford.edu/projects/lifted_struct/"
SOP_HINT = (
    f"Download Stanford_Online_Products.zip (linked from {SOP_URL}; or run "
    "`python -m datamodules.prepare sop --root DIR`) and extract it so that "
    "DIR/Stanford_Online_Products/ holds Ebay_train.txt, Ebay_test.txt and the *_final/ image "
    "folders; pass DIR or DIR/Stanford_Online_Products as root."
)
SOP_COLUMNS = ("image_id", "class_id", "super_class_id", "path")
SOP_NUM_CLASSES = 22634
SOP_NUM_SUPER_CLASSES = 12
SOP_EXPECTED_SIZES = {"train": 59551, "test": 60502}


def find_sop_dir(root: Path) -> Path:
    """The ``Stanford_Online_Products`` directory: ``root`` itself or ``root/Stanford_Online_Products``."""
    return find_dataset_dir(root, "Ebay_train.txt", "Stanford_Online_Products", dataset="SOP", hint=SOP_HINT)


def _read_ebay_list(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """(image_ids, class_ids, relative paths, line numbers) of one ``Ebay_*.txt`` file."""
    kw = {"dataset": "SOP", "hint": SOP_HINT}
    table, lines = read_table(path, SOP_COLUMNS, header=True, **kw)
    image_ids = parse_int_column(table[:, 0], lines, path, "image_id", **kw)
    class_ids = parse_int_column(table[:, 1], lines, path, "class_id", **kw)
    super_ids = parse_int_column(table[:, 2], lines, path, "super_class_id", **kw)
    check_range(image_ids, 1, np.iinfo(np.int64).max, lines, path, "image_id", **kw)
    check_range(class_ids, 1, SOP_NUM_CLASSES, lines, path, "class_id", **kw)
    check_range(super_ids, 1, SOP_NUM_SUPER_CLASSES, lines, path, "super_class_id", **kw)
    check_unique(image_ids, lines, path, "image_id", **kw)
    return image_ids, class_ids, table[:, 3].tolist(), lines


def read_sop(root: Path) -> DatasetRecords:
    """Read Stanford Online Products with the official class-disjoint train/test lists."""
    base = find_sop_dir(root)
    kw = {"dataset": "SOP", "hint": SOP_HINT}
    train_txt, test_txt = base / "Ebay_train.txt", base / "Ebay_test.txt"
    train_ids, train_classes, train_paths, train_lines = _read_ebay_list(train_txt)
    test_ids, test_classes, test_paths, test_lines = _read_ebay_list(test_txt)

    # The two lists are one numbering of 120,053 images and 22,634 classes.
    shared_ids = np.intersect1d(train_ids, test_ids)
    if shared_ids.size:
        i = int(np.flatnonzero(test_ids == shared_ids[0])[0])
        raise DatasetError(
            f"SOP: {test_txt}, line {test_lines[i]}: image_id {shared_ids[0]} is also listed in "
            f"{train_txt}. {SOP_HINT}"
        )
    shared_classes = np.intersect1d(train_classes, test_classes)
    if shared_classes.size:
        i = int(np.flatnonzero(test_classes == shared_classes[0])[0])
        raise DatasetError(
            f"SOP: {test_txt}, line {test_lines[i]}: class_id {shared_classes[0]} is also a training "
            f"class in {train_txt}; the splits must be class-disjoint. {SOP_HINT}"
        )

    train = SplitRecords.from_original_ids(absolute_paths(base, train_paths), train_classes)
    test = SplitRecords.from_original_ids(absolute_paths(base, test_paths), test_classes)
    require_nonempty(train, "train", train_txt, **kw)
    require_nonempty(test, "test", test_txt, **kw)
    return DatasetRecords(
        name="sop", root=base, train=train, test=test, expected_sizes=dict(SOP_EXPECTED_SIZES)
    )


@register_dataset("sop")
class StanfordOnlineProducts(RetrievalDataModule):
    """Stanford Online Products, 22,634 eBay products (Oh Song et al., CVPR 2016), official split.

    NMI is off by default: clustering 60k test embeddings into 11k clusters is costly.
    """

    recall_ks = (1, 10, 100, 1000)
    compute_nmi = False

    def read_records(self, root: Path) -> DatasetRecords:
        return read_sop(root)
