"""Tiny copies of the four DML datasets, written in their exact official on-disk layouts.

Each ``make_*`` writes the official list files (same names, header lines, 1-based ids; the
``cars_annos.mat`` struct array for Cars196) and, unless ``images=False``, a small solid-colour
JPEG per listed image, so the readers and the datamodule (image loading, verification) can
be tested without the real data. Colours are a deterministic function of the class, so a
model can in principle separate classes. Each function returns the dataset root to pass to
the reader / datamodule.

Naming conventions (tests rely on them to know the class of an image from its path alone):

* CUB: ``images/{c:03d}.Class_{c:03d}/Class_{c:03d}_{k:04d}_{image_id}.jpg``, class ``c``.
* Cars: ``car_ims/{image_id:06d}.jpg``; images are numbered class by class.
* SOP: ``{super}_final/{SOP_PRODUCT_BASE + class_id}_{k}.JPG``.
* In-Shop: ``img/{MEN|WOMEN}/{category}/id_{item:08d}/{seq:02d}_{view}.jpg``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

IMAGE_SIZE = 16
SOP_SUPER_CLASSES = (
    "bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle",
    "lamp", "mug", "sofa", "stapler", "table", "toaster",
)  # fmt: skip
SOP_PRODUCT_BASE = 111085122000
INSHOP_CATEGORIES = (
    ("WOMEN", "Dresses"), ("MEN", "Denim"), ("WOMEN", "Blouses_Shirts"), ("MEN", "Jackets_Vests"),
)  # fmt: skip
INSHOP_VIEWS = ("1_front", "2_side", "3_back", "4_full", "5_additional", "6_flat", "7_additional")
INSHOP_ROOT_NAME = "In-shop Clothes Retrieval Benchmark"


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A deterministic, well-spread RGB colour for a class id."""
    return ((67 * class_id) % 256, (151 * class_id + 40) % 256, (29 * class_id + 90) % 256)


@cache
def _jpeg_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpeg(path: Path, class_id: int) -> None:
    """Write a small solid-colour JPEG for ``class_id`` at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(class_colour(class_id)))


def _counts(per_class: int | Sequence[int], n: int) -> list[int]:
    """Images per class: an int for all classes, or one count per class."""
    if isinstance(per_class, int):
        return [per_class] * n
    if len(per_class) != n:
        raise ValueError(f"per_class has {len(per_class)} entries for {n} classes")
    return list(per_class)


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def make_cub(
    root: Path, classes: int = 200, per_class: int | Sequence[int] = 2, *, images: bool = True
) -> Path:
    """Write ``root/CUB_200_2011/`` (images.txt, image_class_labels.txt, classes.txt,
    train_test_split.txt, images/) with ``classes`` classes numbered 1..classes.

    Returns the ``CUB_200_2011`` directory.
    """
    base = Path(root) / "CUB_200_2011"
    image_lines, label_lines, split_lines, class_lines = [], [], [], []
    image_id = 0
    for c, count in enumerate(_counts(per_class, classes), start=1):
        folder = f"{c:03d}.Class_{c:03d}"
        class_lines.append(f"{c} {folder}")
        for k in range(1, count + 1):
            image_id += 1
            name = f"{folder}/Class_{c:03d}_{k:04d}_{image_id}.jpg"
            image_lines.append(f"{image_id} {name}")
            label_lines.append(f"{image_id} {c}")
            split_lines.append(f"{image_id} {k % 2}")  # the classification split, unused by DML
            if images:
                write_jpeg(base / "images" / name, c)
    (base / "images").mkdir(parents=True, exist_ok=True)
    _write_lines(base / "images.txt", image_lines)
    _write_lines(base / "image_class_labels.txt", label_lines)
    _write_lines(base / "classes.txt", class_lines)
    _write_lines(base / "train_test_split.txt", split_lines)
    return base


def cars_annotations(classes: Sequence[int], paths: Sequence[str] | None = None) -> np.ndarray:
    """A 1 x N MATLAB struct array shaped like ``annotations`` in the official cars_annos.mat."""
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annos = np.empty((1, len(classes)), dtype=[(f, object) for f in fields])
    for i, c in enumerate(classes):
        path = paths[i] if paths is not None else f"car_ims/{i + 1:06d}.jpg"
        annos[0, i] = (
            path,
            np.uint16(1),
            np.uint16(2),
            np.uint16(IMAGE_SIZE - 1),
            np.uint16(IMAGE_SIZE - 2),
            np.uint8(c),
            np.uint8(i % 2),  # the classification train/test flag, ignored by the DML split
        )
    return annos


def write_cars_mat(path: Path, annotations: np.ndarray, num_classes: int = 196) -> None:
    """Save ``annotations`` and a 1 x ``num_classes`` ``class_names`` cell array like the official file."""
    class_names = np.empty((1, num_classes), dtype=object)
    for c in range(num_classes):
        class_names[0, c] = f"Maker Model {c + 1} 2012"
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"annotations": annotations, "class_names": class_names})


def make_cars(
    root: Path, classes: int = 196, per_class: int | Sequence[int] = 2, *, images: bool = True
) -> Path:
    """Write ``root/cars196/`` with ``cars_annos.mat`` and ``car_ims/000001.jpg ...``.

    Images are numbered class by class (class 1 first), as in the official release.
    Returns the ``cars196`` directory (the folder holding cars_annos.mat).
    """
    base = Path(root) / "cars196"
    labels = [c for c, count in enumerate(_counts(per_class, classes), start=1) for _ in range(count)]
    (base / "car_ims").mkdir(parents=True, exist_ok=True)
    write_cars_mat(base / "cars_annos.mat", cars_annotations(labels))
    if images:
        for i, c in enumerate(labels, start=1):
            write_jpeg(base / "car_ims" / f"{i:06d}.jpg", c)
    return base


def sop_row(image_id: int, class_id: int, k: int) -> str:
    """One ``Ebay_*.txt`` row for the ``k``-th image of ``class_id``."""
    super_id = (class_id - 1) % len(SOP_SUPER_CLASSES) + 1
    path = f"{SOP_SUPER_CLASSES[super_id - 1]}_final/{SOP_PRODUCT_BASE + class_id}_{k}.JPG"
    return f"{image_id} {class_id} {super_id} {path}"


def make_sop(
    root: Path,
    train_classes: int = 12,
    test_classes: int = 12,
    per_class: int | Sequence[int] = 2,
    *,
    images: bool = True,
) -> Path:
    """Write ``root/Stanford_Online_Products/`` with Ebay_train.txt, Ebay_test.txt, Ebay_info.txt.

    Train classes are 1..train_classes, test classes follow; image ids run over train then
    test, as in the official lists. ``per_class`` covers train then test classes.
    Returns the ``Stanford_Online_Products`` directory.
    """
    base = Path(root) / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    counts = _counts(per_class, train_classes + test_classes)
    rows = {"train": [], "test": []}
    image_id = 0
    for class_id, count in enumerate(counts, start=1):
        split = "train" if class_id <= train_classes else "test"
        for k in range(count):
            image_id += 1
            row = sop_row(image_id, class_id, k)
            rows[split].append(row)
            if images:
                write_jpeg(base / row.split()[3], class_id)
    base.mkdir(parents=True, exist_ok=True)
    _write_lines(base / "Ebay_train.txt", [header, *rows["train"]])
    _write_lines(base / "Ebay_test.txt", [header, *rows["test"]])
    _write_lines(base / "Ebay_info.txt", [header, *rows["train"], *rows["test"]])
    return base


def _alternate(a: str, n_a: int, b: str, n_b: int) -> list[str]:
    """``n_a`` times ``a`` and ``n_b`` times ``b``, alternating while both remain (a first)."""
    out: list[str] = []
    while n_a or n_b:
        if n_a:
            out.append(a)
            n_a -= 1
        if n_b:
            out.append(b)
            n_b -= 1
    return out


def inshop_item_id(j: int) -> int:
    """Sparse item numbers (2, 5, 8, ...): like the official ids, they are not contiguous."""
    return 2 + 3 * j


def make_inshop(
    root: Path,
    train_items: int = 8,
    test_items: int = 8,
    train_per_item: int = 3,
    query_per_item: int = 1,
    gallery_per_item: int = 2,
    *,
    list_in_eval: bool = True,
    images_under_img_dir: bool = False,
    images: bool = True,
) -> Path:
    """Write ``root/In-shop Clothes Retrieval Benchmark/`` with list_eval_partition.txt.

    Items alternate train / test while both remain (the ``j``-th item has id
    :func:`inshop_item_id` ``(j)``); within a test item, gallery and query rows alternate,
    gallery first, as in the official file (so readers must regroup queries first). Columns
    are padded with runs of spaces like the official file. The list goes to ``Eval/``
    (official) or, with ``list_in_eval=False``, to the top level; images go to ``img/`` or,
    with ``images_under_img_dir=True``, to ``Img/img/`` (img.zip extracted in place).
    Returns the benchmark directory.
    """
    base = Path(root) / INSHOP_ROOT_NAME
    image_dir = base / "Img" if images_under_img_dir else base
    rows = []
    kinds = _alternate("train", train_items, "test", test_items)
    for j, kind in enumerate(kinds):
        item = inshop_item_id(j)
        gender, category = INSHOP_CATEGORIES[j % len(INSHOP_CATEGORIES)]
        if kind == "test":
            statuses = _alternate("gallery", gallery_per_item, "query", query_per_item)
        else:
            statuses = ["train"] * train_per_item
        for seq, status in enumerate(statuses, start=1):
            view = INSHOP_VIEWS[(seq - 1) % len(INSHOP_VIEWS)]
            name = f"img/{gender}/{category}/id_{item:08d}/{seq:02d}_{view}.jpg"
            rows.append(f"{name:<56}id_{item:08d} {status}")
            if images:
                write_jpeg(image_dir / name, item)
    base.mkdir(parents=True, exist_ok=True)
    list_path = (
        base / "Eval" / "list_eval_partition.txt" if list_in_eval else base / "list_eval_partition.txt"
    )
    _write_lines(list_path, [str(len(rows)), "image_name item_id evaluation_status", *rows])
    return base
