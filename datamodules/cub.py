"""CUB-200-2011 reader (and the list-file parsing helpers shared by the other readers).

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

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.base import RetrievalDataModule
from datamodules.records import DatasetError, DatasetRecords, SplitRecords, require_dir, require_file

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
# List-file helpers shared by all readers: whitespace-separated tables, integer columns,
# uniqueness and range checks, each failing with a DatasetError naming file and line.
# --------------------------------------------------------------------------------------


def read_table(
    path: Path,
    columns: Sequence[str],
    *,
    dataset: str,
    hint: str,
    skip: int = 0,
    header: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a whitespace-separated list file into an ``(N, len(columns))`` array of strings.

    The first ``skip`` lines are ignored; with ``header=True`` the next line must then be
    exactly the column names. Blank lines are ignored. Also returns the 1-based line number
    of every row, so later checks can point at the offending line.
    """
    require_file(path, dataset, hint)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM
    except UnicodeDecodeError as err:
        raise DatasetError(f"{dataset}: {path} is not a UTF-8 text file ({err}). {hint}") from err
    lines = text.splitlines()
    if header:
        found = lines[skip] if skip < len(lines) else "<end of file>"
        if found.split() != list(columns):
            raise DatasetError(
                f"{dataset}: {path}, line {skip + 1}: expected the header {' '.join(columns)!r}, "
                f"found {found!r}. {hint}"
            )
        skip += 1
    lines = lines[skip:]
    fields = [line.split() for line in lines]
    counts = np.fromiter(map(len, fields), dtype=np.int64, count=len(fields))
    nonblank = counts > 0
    bad = np.flatnonzero(nonblank & (counts != len(columns)))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"{dataset}: {path}, line {i + skip + 1}: expected {len(columns)} whitespace-separated "
            f"fields ({' '.join(columns)}), found {counts[i]}: {lines[i]!r}. {hint}"
        )
    if not nonblank.all():
        fields = [f for f, keep in zip(fields, nonblank) if keep]
    table = np.array(fields, dtype=str).reshape(-1, len(columns))
    line_numbers = np.flatnonzero(nonblank) + skip + 1
    return table, line_numbers


def parse_int_column(
    values: np.ndarray, line_numbers: np.ndarray, path: Path, column: str, *, dataset: str, hint: str
) -> np.ndarray:
    """Convert a column of strings to int64, naming the first non-integer entry and its line."""
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    for value, line in zip(values, line_numbers):
        try:
            np.int64(int(value))
        except (ValueError, OverflowError):
            raise DatasetError(
                f"{dataset}: {path}, line {line}: {column} must be an integer, found {value!r}. {hint}"
            ) from None
    raise DatasetError(f"{dataset}: {path}: column {column} is not a valid integer column. {hint}")


def check_unique(
    values: np.ndarray,
    line_numbers: np.ndarray,
    path: Path | str,
    what: str,
    *,
    dataset: str,
    hint: str,
    unit: str = "line",
) -> None:
    """Raise if ``values`` has a duplicate, naming both occurrences (``unit``: "line", "entry")."""
    uniq, counts = np.unique(values, return_counts=True)
    if len(uniq) == len(values):
        return
    dup = uniq[np.argmax(counts > 1)].item()
    where = np.flatnonzero(values == dup)[:2]
    raise DatasetError(
        f"{dataset}: {path}: duplicate {what} {dup!r} at {unit} {line_numbers[where[0]]} and "
        f"{unit} {line_numbers[where[1]]}. {hint}"
    )


def check_range(
    values: np.ndarray,
    low: int,
    high: int,
    line_numbers: np.ndarray,
    path: Path | str,
    what: str,
    *,
    dataset: str,
    hint: str,
    unit: str = "line",
) -> None:
    """Raise if any of ``values`` lies outside ``[low, high]``, naming the first one and its line."""
    bad = np.flatnonzero((values < low) | (values > high))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"{dataset}: {path}, {unit} {line_numbers[i]}: {what} {values[i]} is outside {low}..{high}. {hint}"
        )


def absolute_paths(base: Path, relative: Sequence[str]) -> list[str]:
    """Join relative image paths onto ``base`` as absolute strings (fast for 100k+ entries)."""
    prefix = str(base.expanduser().resolve()) + os.sep
    return [prefix + p for p in relative]


def require_nonempty(split: SplitRecords, name: str, source: Path | str, *, dataset: str, hint: str) -> None:
    """Raise if a split has no images (e.g. a truncated list file)."""
    if len(split) == 0:
        raise DatasetError(f"{dataset}: the {name} split read from {source} is empty. {hint}")


# --------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------


def find_cub_dir(root: Path) -> Path:
    """The ``CUB_200_2011`` directory: ``root`` itself or ``root/CUB_200_2011``."""
    root = Path(root).expanduser()
    require_dir(root, "CUB-200-2011", CUB_HINT)
    if (root / "images.txt").is_file():
        return root.resolve()
    nested = root / "CUB_200_2011"
    if nested.is_dir():
        return nested.resolve()
    raise DatasetError(
        f"CUB-200-2011: neither {root / 'images.txt'} nor {nested / 'images.txt'} exists. {CUB_HINT}"
    )


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
    is_train = image_class <= num_train_classes
    splits = {}
    for split, mask in (("train", is_train), ("test", ~is_train)):
        idx = np.flatnonzero(mask)
        splits[split] = SplitRecords.from_original_ids([paths[i] for i in idx], image_class[idx])
        require_nonempty(splits[split], split, labels_txt, **kw)
    return DatasetRecords(
        name="cub",
        root=base,
        train=splits["train"],
        test=splits["test"],
        expected_sizes=dict(CUB_EXPECTED_SIZES) if is_cub else {},
    )


class CUB200(RetrievalDataModule):
    """CUB-200-2011 birds, 200 species (Wah et al., 2011), class-disjoint 100/100 DML split."""

    name = "cub"
    recall_ks = (1, 2, 4, 8)
    compute_nmi = True

    def read_records(self, root: Path) -> DatasetRecords:
        return read_cub(root)
