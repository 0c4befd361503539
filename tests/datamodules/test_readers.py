"""Readers of the four official layouts: splits, labels, flags, and every bad-input error."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from datamodules.cars import read_cars
from datamodules.cub import read_cub
from datamodules.inshop import read_inshop
from datamodules.prepare import prepare
from datamodules.records import DatasetError, DatasetRecords, SplitRecords
from datamodules.sop import read_sop
from tests.datamodules.fixtures import (
    INSHOP_ROOT_NAME,
    SOP_PRODUCT_BASE,
    cars_annotations,
    inshop_item_id,
    make_cars,
    make_cub,
    make_inshop,
    make_sop,
    write_cars_mat,
)

# --------------------------------------------------------------------------- helpers


def edit_lines(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    """Rewrite a list file through ``edit`` (a function of its lines)."""
    lines = path.read_text().splitlines()
    path.write_text("".join(f"{line}\n" for line in edit(lines)))


def replace_line(path: Path, lineno: int, text: str) -> None:
    """Replace the 1-based line ``lineno`` of ``path``."""
    edit_lines(path, lambda lines: lines[: lineno - 1] + [text] + lines[lineno:])


def raises_naming(*fragments: str | Path):
    """``pytest.raises(DatasetError)`` whose message contains every fragment, in order.

    Paths are resolved, as the readers report resolved paths; the hint at the end of every
    message also names the files, so tests name files by their full path.
    """
    texts = [str(f.resolve()) if isinstance(f, Path) else f for f in fragments]
    return pytest.raises(DatasetError, match=".*".join(re.escape(t) for t in texts))


def assert_split_invariants(split: SplitRecords) -> None:
    """Labels are 0..C-1, contiguous, and ``class_ids`` maps them back in increasing order."""
    assert split.labels.dtype == np.int64
    assert np.array_equal(np.unique(split.labels), np.arange(len(split.class_ids)))
    assert np.all(np.diff(split.class_ids) > 0)
    assert all(os.path.isabs(p) for p in split.paths)


def assert_class_disjoint(records: DatasetRecords) -> None:
    assert np.intersect1d(records.train.class_ids, records.test.class_ids).size == 0


# --------------------------------------------------------------------------- CUB-200-2011

# Class c has 1 + c % 3 images: classes 1..100 -> 200 images, classes 101..200 -> 201 images.
CUB_PER_CLASS = [1 + c % 3 for c in range(1, 201)]


@pytest.fixture(scope="module")
def cub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cub(tmp_path_factory.mktemp("cub"), per_class=CUB_PER_CLASS)


def cub_class_of(path: str) -> int:
    """Fixture convention: images/{c:03d}.Class_{c:03d}/... belongs to class c."""
    return int(Path(path).parent.name[:3])


def test_cub_splits(cub_dir: Path) -> None:
    records = read_cub(cub_dir)
    assert records.name == "cub"
    assert records.root == cub_dir.resolve()
    assert (len(records.train), len(records.test)) == (200, 201)
    assert np.array_equal(records.train.class_ids, np.arange(1, 101))
    assert np.array_equal(records.test.class_ids, np.arange(101, 201))
    for split in (records.train, records.test):
        assert_split_invariants(split)
        originals = [cub_class_of(p) for p in split.paths]
        assert np.array_equal(split.class_ids[split.labels], originals)
    assert_class_disjoint(records)
    assert records.test.is_query.all() and records.test.is_gallery.all()
    # First test image: image id 201 (class 101, 1 + 101 % 3 = 3 images, first of them).
    assert records.test.paths[0] == str(cub_dir.resolve() / "images/101.Class_101/Class_101_0001_201.jpg")
    assert records.test.labels[:4].tolist() == [0, 0, 0, 1]
    assert all(Path(p).is_file() for p in records.train.paths + records.test.paths)
    assert records.expected_sizes == {"train": 5864, "test": 5924}


def test_cub_root_may_be_parent_or_relative(cub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct = read_cub(cub_dir)
    assert read_cub(cub_dir.parent).test.paths == direct.test.paths
    monkeypatch.chdir(cub_dir.parent)
    relative = read_cub(Path("CUB_200_2011"))
    assert relative.train.paths == direct.train.paths  # absolute even from a relative root


def test_cub_joins_labels_by_image_id_not_line_order(tmp_path: Path) -> None:
    base = make_cub(tmp_path, per_class=1, images=False)
    edit_lines(base / "image_class_labels.txt", lambda lines: lines[::-1])
    records = read_cub(base)
    assert np.array_equal(records.train.class_ids[records.train.labels], np.arange(1, 101))
    assert np.array_equal(records.test.class_ids[records.test.labels], np.arange(101, 201))


def test_cub_layout_with_other_class_counts(tmp_path: Path) -> None:
    base = make_cub(tmp_path, classes=10, per_class=3, images=False)
    records = read_cub(base, num_classes=10, num_train_classes=4)
    assert (len(records.train), len(records.test)) == (12, 18)
    assert records.test.class_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert records.expected_sizes == {}  # not the published CUB: no size warning
    with raises_naming(base / "image_class_labels.txt", "line 28", "class_id 10", "1..9"):
        read_cub(base, num_classes=9, num_train_classes=4)


@pytest.fixture
def small_cub(tmp_path: Path) -> Path:
    return make_cub(tmp_path, per_class=1, images=False)


def test_cub_missing_root(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nowhere", "is missing", "CUB_200_2011.tgz", "data.caltech.edu"):
        read_cub(tmp_path / "nowhere")


def test_cub_root_without_dataset(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "images.txt", tmp_path / "CUB_200_2011" / "images.txt", "data.caltech.edu"):
        read_cub(tmp_path)


def test_cub_missing_list_files(small_cub: Path) -> None:
    (small_cub / "image_class_labels.txt").unlink()
    with raises_naming(small_cub / "image_class_labels.txt", "is missing", "data.caltech.edu"):
        read_cub(small_cub)
    (small_cub / "images.txt").unlink()  # the folder is then not recognised as CUB at all
    with raises_naming(small_cub / "images.txt", "data.caltech.edu"):
        read_cub(small_cub)


@pytest.mark.parametrize(
    ("name", "lineno", "text", "fragments"),
    [
        ("images.txt", 3, "3", ("line 3", "expected 2")),
        ("images.txt", 5, "5 a.jpg extra", ("line 5", "found 3")),
        ("images.txt", 4, "four 004.Class_004/x.jpg", ("line 4", "image_id", "'four'")),
        ("image_class_labels.txt", 7, "7 seven", ("line 7", "class_id", "'seven'")),
        ("image_class_labels.txt", 2, "2 201", ("line 2", "class_id 201", "1..200")),
        ("image_class_labels.txt", 9, "9 0", ("line 9", "class_id 0", "1..200")),
        (
            "images.txt",
            6,
            "5 006.Class_006/Class_006_0001_6.jpg",
            ("duplicate image_id 5", "line 5", "line 6"),
        ),
        ("image_class_labels.txt", 8, "7 8", ("duplicate image_id 7", "line 7", "line 8")),
        (
            "images.txt",
            8,
            "8 007.Class_007/Class_007_0001_7.jpg",
            ("duplicate image_name", "line 7", "line 8"),
        ),
    ],
)
def test_cub_bad_lines(
    small_cub: Path, name: str, lineno: int, text: str, fragments: tuple[str, ...]
) -> None:
    replace_line(small_cub / name, lineno, text)
    with raises_naming(small_cub / name, *fragments, "data.caltech.edu"):
        read_cub(small_cub)


def test_cub_image_without_label(small_cub: Path) -> None:
    edit_lines(small_cub / "image_class_labels.txt", lambda lines: lines[:-1])
    with raises_naming(
        small_cub / "images.txt",
        "line 200",
        "image_id 200 has no class",
        small_cub / "image_class_labels.txt",
    ):
        read_cub(small_cub)


def test_cub_label_of_unknown_image(small_cub: Path) -> None:
    edit_lines(small_cub / "image_class_labels.txt", lambda lines: [*lines, "999 10"])
    with raises_naming(
        small_cub / "image_class_labels.txt",
        "line 201",
        "image_id 999 is not listed",
        small_cub / "images.txt",
    ):
        read_cub(small_cub)


def test_cub_empty_split(tmp_path: Path) -> None:
    base = make_cub(tmp_path, classes=100, per_class=1, images=False)
    with raises_naming("test split", base / "image_class_labels.txt", "is empty"):
        read_cub(base)


def test_cub_blank_lines_are_ignored(small_cub: Path) -> None:
    edit_lines(small_cub / "images.txt", lambda lines: [*lines[:10], "", *lines[10:], "", ""])
    assert len(read_cub(small_cub).train) == 100


# --------------------------------------------------------------------------- Cars196

# Class c has 1 + c % 2 images: classes 1..98 -> 147 images, classes 99..196 -> 147 images.
CARS_PER_CLASS = [1 + c % 2 for c in range(1, 197)]


@pytest.fixture(scope="module")
def cars_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cars(tmp_path_factory.mktemp("cars"), per_class=CARS_PER_CLASS)


def test_cars_splits(cars_dir: Path) -> None:
    records = read_cars(cars_dir)
    assert records.name == "cars"
    assert (len(records.train), len(records.test)) == (147, 147)
    assert np.array_equal(records.train.class_ids, np.arange(1, 99))
    assert np.array_equal(records.test.class_ids, np.arange(99, 197))
    # Fixture convention: images are numbered class by class.
    image_class = np.repeat(np.arange(1, 197), CARS_PER_CLASS)
    for split in (records.train, records.test):
        assert_split_invariants(split)
        numbers = [int(Path(p).stem) for p in split.paths]
        assert np.array_equal(split.class_ids[split.labels], image_class[np.array(numbers) - 1])
    assert_class_disjoint(records)
    assert records.test.is_query.all() and records.test.is_gallery.all()
    # Class 98 is the last train class (1 image: 1 + 98 % 2); image 148 is class 99's first.
    assert records.train.paths[-1] == str(cars_dir.resolve() / "car_ims" / "000147.jpg")
    assert records.test.paths[0] == str(cars_dir.resolve() / "car_ims" / "000148.jpg")
    assert all(Path(p).is_file() for p in records.test.paths)
    assert records.expected_sizes == {"train": 8054, "test": 8131}


def test_cars_ignores_classification_test_flag(cars_dir: Path) -> None:
    import scipy.io

    flags = scipy.io.loadmat(cars_dir / "cars_annos.mat", squeeze_me=True)["annotations"]["test"]
    assert set(flags.tolist()) == {0, 1}  # the fixture mixes both flags within each split
    assert len(read_cars(cars_dir).train) == 147


def test_cars_single_annotation_struct(tmp_path: Path) -> None:
    write_cars_mat(tmp_path / "cars_annos.mat", cars_annotations([5]))
    with raises_naming("test split", tmp_path / "cars_annos.mat", "is empty"):
        read_cars(tmp_path)


def test_cars_missing_root_and_mat(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nowhere", "is missing", "ai.stanford.edu"):
        read_cars(tmp_path / "nowhere")
    with raises_naming(tmp_path / "cars_annos.mat", "is missing", "car_ims.tgz"):
        read_cars(tmp_path)


def _classes(n_per_class: int = 1) -> list[int]:
    return [c for c in range(1, 197) for _ in range(n_per_class)]


@pytest.mark.parametrize(
    ("classes", "paths", "fragments"),
    [
        ([*_classes()[:-1], 197], None, ("entry 196", "class 197", "1..196")),
        ([0, *_classes()[1:]], None, ("entry 1", "class 0", "1..196")),
        (_classes(), ["car_ims/000001.jpg"] * 196, ("duplicate relative_im_path", "entry 1", "entry 2")),
    ],
)
def test_cars_bad_annotations(
    tmp_path: Path, classes: list[int], paths: list[str] | None, fragments: tuple[str, ...]
) -> None:
    write_cars_mat(tmp_path / "cars_annos.mat", cars_annotations(classes, paths))
    with raises_naming(tmp_path / "cars_annos.mat", *fragments, "ai.stanford.edu"):
        read_cars(tmp_path)


def test_cars_empty_split(tmp_path: Path) -> None:
    base = make_cars(tmp_path, classes=98, per_class=1, images=False)
    with raises_naming("test split", base / "cars_annos.mat", "is empty"):
        read_cars(base)


def test_cars_non_integer_class(tmp_path: Path) -> None:
    annos = cars_annotations(_classes())
    annos["class"][0, 3] = 2.5
    write_cars_mat(tmp_path / "cars_annos.mat", annos)
    with raises_naming(tmp_path / "cars_annos.mat", "entry 4", "class must be an integer, found 2.5"):
        read_cars(tmp_path)


def test_cars_wrong_mat_contents(tmp_path: Path) -> None:
    import scipy.io

    mat = tmp_path / "cars_annos.mat"
    scipy.io.savemat(mat, {"class_names": np.array(["a", "b"], dtype=object)})
    with raises_naming(mat, "no variable 'annotations'"):
        read_cars(tmp_path)
    annos = np.empty((1, 2), dtype=[("relative_im_path", object), ("bbox_x1", object)])
    annos[0, 0] = ("car_ims/000001.jpg", 1)
    annos[0, 1] = ("car_ims/000002.jpg", 1)
    scipy.io.savemat(mat, {"annotations": annos})
    with raises_naming(mat, "lacks field(s) class"):
        read_cars(tmp_path)
    mat.write_bytes(b"this is not a MATLAB file at all" * 8)
    with raises_naming("cannot read", mat, "ai.stanford.edu"):
        read_cars(tmp_path)


# --------------------------------------------------------------------------- SOP

# 12 train classes (ids 1..12, 30 images), 10 test classes (ids 13..22, 25 images); class c
# has 1 + c % 4 images.
SOP_PER_CLASS = [1 + c % 4 for c in range(1, 23)]


@pytest.fixture(scope="module")
def sop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sop(tmp_path_factory.mktemp("sop"), 12, 10, SOP_PER_CLASS)


def sop_class_of(path: str) -> int:
    """Fixture convention: {super}_final/{SOP_PRODUCT_BASE + class}_{k}.JPG."""
    return int(Path(path).stem.split("_")[0]) - SOP_PRODUCT_BASE


def test_sop_splits(sop_dir: Path) -> None:
    records = read_sop(sop_dir)
    assert records.name == "sop"
    assert (len(records.train), len(records.test)) == (30, 25)
    assert np.array_equal(records.train.class_ids, np.arange(1, 13))
    assert np.array_equal(records.test.class_ids, np.arange(13, 23))
    for split in (records.train, records.test):
        assert_split_invariants(split)
        assert np.array_equal(split.class_ids[split.labels], [sop_class_of(p) for p in split.paths])
    assert_class_disjoint(records)
    assert records.test.is_query.all() and records.test.is_gallery.all()
    # Test class 13 belongs to super class (13 - 1) % 12 + 1 = 1, "bicycle".
    assert records.test.paths[0] == str(sop_dir.resolve() / f"bicycle_final/{SOP_PRODUCT_BASE + 13}_0.JPG")
    assert all(Path(p).is_file() for p in records.train.paths)
    assert records.expected_sizes == {"train": 59551, "test": 60502}


def test_sop_root_may_be_parent(sop_dir: Path) -> None:
    assert read_sop(sop_dir.parent).train.paths == read_sop(sop_dir).train.paths


@pytest.fixture
def small_sop(tmp_path: Path) -> Path:
    return make_sop(tmp_path, 6, 6, 2, images=False)


def test_sop_missing_root_and_files(small_sop: Path, tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nowhere", "is missing", "cvgl.stanford.edu/projects/lifted_struct"):
        read_sop(tmp_path / "nowhere")
    (small_sop / "Ebay_test.txt").unlink()
    with raises_naming(small_sop / "Ebay_test.txt", "is missing", "lifted_struct"):
        read_sop(small_sop)
    (small_sop / "Ebay_train.txt").unlink()
    with raises_naming(small_sop / "Ebay_train.txt", small_sop / "Stanford_Online_Products", "lifted_struct"):
        read_sop(small_sop)


@pytest.mark.parametrize(
    ("name", "lineno", "text", "fragments"),
    [
        ("Ebay_train.txt", 1, "image_id class_id path", ("line 1", "expected the header")),
        ("Ebay_train.txt", 3, "2 1 1", ("line 3", "expected 4", "found 3")),
        ("Ebay_test.txt", 4, "15 x7 1 bicycle_final/1_0.JPG", ("line 4", "class_id", "'x7'")),
        ("Ebay_test.txt", 2, "13 7 1.5 bicycle_final/1_0.JPG", ("line 2", "super_class_id", "'1.5'")),
        ("Ebay_train.txt", 2, "1 0 1 bicycle_final/1_0.JPG", ("line 2", "class_id 0", "1..22634")),
        ("Ebay_train.txt", 2, "1 1 13 bicycle_final/1_0.JPG", ("line 2", "super_class_id 13", "1..12")),
        ("Ebay_train.txt", 5, "3 2 2 cabinet_final/1_0.JPG", ("duplicate image_id 3", "line 4", "line 5")),
        ("Ebay_test.txt", 6, "17 2 2 cabinet_final/1_0.JPG", ("line 6", "class_id 2", "class-disjoint")),
    ],
)
def test_sop_bad_lines(
    small_sop: Path, name: str, lineno: int, text: str, fragments: tuple[str, ...]
) -> None:
    replace_line(small_sop / name, lineno, text)
    with raises_naming(small_sop / name, *fragments, "lifted_struct"):
        read_sop(small_sop)


def test_sop_image_in_both_lists(small_sop: Path) -> None:
    replace_line(small_sop / "Ebay_test.txt", 3, "1 8 8 mug_final/1_0.JPG")
    with raises_naming(small_sop / "Ebay_test.txt", "line 3", "image_id 1", small_sop / "Ebay_train.txt"):
        read_sop(small_sop)


def test_sop_empty_split(small_sop: Path) -> None:
    edit_lines(small_sop / "Ebay_test.txt", lambda lines: lines[:1])
    with raises_naming("test split", small_sop / "Ebay_test.txt", "is empty"):
        read_sop(small_sop)


# --------------------------------------------------------------------------- In-Shop

# 6 train items x 3 images; 5 test items x (2 queries + 3 gallery images).
INSHOP_SHAPE = {
    "train_items": 6,
    "test_items": 5,
    "train_per_item": 3,
    "query_per_item": 2,
    "gallery_per_item": 3,
}


@pytest.fixture(scope="module")
def inshop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inshop(tmp_path_factory.mktemp("inshop"), **INSHOP_SHAPE)


def inshop_item_of(path: str) -> int:
    """Fixture convention: img/.../id_{item:08d}/{seq}_{view}.jpg."""
    return int(Path(path).parent.name.removeprefix("id_"))


def test_inshop_splits(inshop_dir: Path) -> None:
    records = read_inshop(inshop_dir)
    assert records.name == "inshop"
    assert records.root == inshop_dir.resolve()
    assert (len(records.train), len(records.test)) == (18, 25)
    # Items alternate train/test: j = 0, 2, 4, 6, 8, 10 train; j = 1, 3, 5, 7, 9 test.
    assert records.train.class_ids.tolist() == [inshop_item_id(j) for j in (0, 2, 4, 6, 8, 10)]
    assert records.test.class_ids.tolist() == [inshop_item_id(j) for j in (1, 3, 5, 7, 9)]
    assert records.test.class_ids.tolist() == [5, 11, 17, 23, 29]
    test = records.test
    assert test.is_query.tolist() == [True] * 10 + [False] * 15
    assert test.is_gallery.tolist() == [False] * 10 + [True] * 15
    for split in (records.train, test):
        assert_split_invariants(split)
        assert np.array_equal(split.class_ids[split.labels], [inshop_item_of(p) for p in split.paths])
    assert_class_disjoint(records)
    # Query and gallery images of one item share the label; file order is kept within each.
    assert test.labels[test.is_query].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert test.labels[test.is_gallery].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    # The first test item's rows alternate gallery (seq 1), query (seq 2), ...: seq 2 is query 1.
    assert test.paths[0] == str(inshop_dir.resolve() / "img/MEN/Denim/id_00000005/02_2_side.jpg")
    assert all(Path(p).is_file() for p in records.train.paths + test.paths)
    assert records.expected_sizes == {"train": 25882, "query": 14218, "gallery": 12612, "test": 26830}


def test_inshop_alternative_layouts(tmp_path: Path) -> None:
    base = make_inshop(tmp_path / "a", list_in_eval=False)
    assert len(read_inshop(base).test) == 24
    base = make_inshop(tmp_path / "b", images_under_img_dir=True)
    records = read_inshop(base)
    assert records.test.paths[0].startswith(str(base.resolve() / "Img" / "img") + os.sep)
    assert all(Path(p).is_file() for p in records.test.paths)


@pytest.fixture
def small_inshop(tmp_path: Path) -> Path:
    return make_inshop(tmp_path, 4, 4, 2, 1, 2, images=False) / "Eval" / "list_eval_partition.txt"


def test_inshop_missing_root_and_list(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nowhere", "is missing", "mmlab.ie.cuhk.edu.hk"):
        read_inshop(tmp_path / "nowhere")
    with raises_naming(
        tmp_path / "list_eval_partition.txt", tmp_path / "Eval" / "list_eval_partition.txt", "Google Drive"
    ):
        read_inshop(tmp_path)


@pytest.mark.parametrize(
    ("lineno", "text", "fragments"),
    [
        (1, "many", ("line 1", "number of images", "'many'")),
        (1, "21", ("line 1 declares 21 images but 20 rows follow",)),
        (2, "image_name item_id", ("line 2", "expected the header")),
        (3, "img/WOMEN/Dresses/id_00000002/01_1_front.jpg id_00000002", ("line 3", "expected 3", "found 2")),
        (4, "img/x.jpg 00000002 train", ("line 4", "item_id must look like 'id_00000002'", "'00000002'")),
        (5, "img/x.jpg id_0000000x train", ("line 5", "item_id", "'0000000x'")),
        (6, "img/x.jpg id_00000005 validation", ("line 6", "evaluation_status", "'validation'")),
        (
            6,
            "img/WOMEN/Dresses/id_00000002/01_1_front.jpg id_00000005 query",
            ("duplicate image_name", "line 3", "line 6"),
        ),
        (3, "img/x.jpg id_00000005 train", ("line 5", "id_00000005 is both a train and a test item")),
    ],
)
def test_inshop_bad_lines(small_inshop: Path, lineno: int, text: str, fragments: tuple[str, ...]) -> None:
    replace_line(small_inshop, lineno, text)
    with raises_naming(small_inshop, *fragments, "mmlab.ie.cuhk.edu.hk"):
        read_inshop(small_inshop.parent.parent)


@pytest.mark.parametrize("status", ["train", "query", "gallery"])
def test_inshop_empty_partition(small_inshop: Path, status: str) -> None:
    def drop(lines: list[str]) -> list[str]:
        rows = [row for row in lines[2:] if not row.endswith(f" {status}")]
        return [str(len(rows)), lines[1], *rows]

    edit_lines(small_inshop, drop)
    with raises_naming(small_inshop, f"lists no {status} images"):
        read_inshop(small_inshop.parent.parent)


def test_inshop_root_name_has_spaces(inshop_dir: Path) -> None:
    assert inshop_dir.name == INSHOP_ROOT_NAME
    assert all(INSHOP_ROOT_NAME in p for p in read_inshop(inshop_dir).train.paths)


# --------------------------------------------------------------------------- prepare (offline)


def _tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


def test_prepare_unpacks_a_local_archive(tmp_path: Path) -> None:
    source = tmp_path / "downloads"
    source.mkdir()
    _tar(make_cub(tmp_path / "build", per_class=1), source / "CUB_200_2011.tgz")
    root = tmp_path / "data"
    records = prepare("cub", root, source, verify=False)
    assert (len(records.train), len(records.test)) == (100, 100)
    assert sorted(p.name for p in root.iterdir()) == ["CUB_200_2011"]  # no staging left behind
    assert all(Path(p).is_file() for p in records.test.paths)
    assert prepare("cub", root, source, verify=False).test.paths == records.test.paths  # already there


def test_prepare_rejects_checksum_mismatch_and_corrupt_archive(tmp_path: Path) -> None:
    source = tmp_path / "downloads"
    source.mkdir()
    archive = _tar(make_cub(tmp_path / "build", per_class=1, images=False), source / "CUB_200_2011.tgz")
    root = tmp_path / "data"
    with raises_naming(archive, "differs from the published 97eceeb196236b17998738112f37df78"):
        prepare("cub", root, source)
    archive.write_bytes(archive.read_bytes()[:300])
    with raises_naming("Cannot unpack", archive):
        prepare("cub", root, source, verify=False)
    assert list(root.iterdir()) == []  # nothing half-extracted


def test_prepare_inshop_from_drive_folder(tmp_path: Path) -> None:
    built = make_inshop(tmp_path / "build", 3, 3, 2, 1, 1)
    drive = tmp_path / "drive"
    (drive / "Eval").mkdir(parents=True)
    (drive / "Img").mkdir()
    shutil.copy(built / "Eval" / "list_eval_partition.txt", drive / "Eval")
    with zipfile.ZipFile(drive / "Img" / "img.zip", "w") as zf:
        for image in sorted((built / "img").rglob("*.jpg")):
            zf.write(image, image.relative_to(built).as_posix())
    records = prepare("inshop", tmp_path / "data", drive)
    assert (len(records.train), int(records.test.is_query.sum()), int(records.test.is_gallery.sum())) == (
        6,
        3,
        3,
    )
    assert all(Path(p).is_file() for p in records.train.paths + records.test.paths)
