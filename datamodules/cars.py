"""Cars196 (Stanford Cars) reader.

Official layout (``cars_annos.mat`` next to the extracted ``car_ims.tgz``)::

    ROOT/
        cars_annos.mat   struct array `annotations` (1 x 16,185) with fields relative_im_path
                         ('car_ims/000001.jpg'), bbox_x1, bbox_y1, bbox_x2, bbox_y2,
                         class (1..196), test (0/1); cell array `class_names` (1 x 196)
        car_ims/000001.jpg ... car_ims/016185.jpg

Deep-metric-learning split (class-disjoint; the ``test`` flag of the classification split is
ignored): classes 1-98 train (8,054 images), classes 99-196 test (8,131 images); every test
image is both a query and a gallery item.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from benchmark.core.contracts import register_dataset
from datamodules.base import RetrievalDataModule
from datamodules.records import (
    DatasetError,
    DatasetRecords,
    absolute_paths,
    check_range,
    check_unique,
    require_dir,
    require_file,
    split_by_class,
)

CARS_URL = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
CARS_HINT = (
    f"Get cars_annos.mat and car_ims.tgz (Stanford AI Lab, {CARS_URL}; the site is often down, "
    "in which case use a mirror of these two original files) and extract car_ims.tgz next to "
    "cars_annos.mat so that ROOT/cars_annos.mat and ROOT/car_ims/000001.jpg exist; pass ROOT as root. "
    "The cars_train/cars_test classification archives are a different layout."
)
CARS_NUM_CLASSES = 196
CARS_TRAIN_CLASSES = 98  # classes 1..98 train, 99..196 test
CARS_EXPECTED_SIZES = {"train": 8054, "test": 8131}
_FIELDS = ("relative_im_path", "class")


def _load_annotations(mat_path: Path) -> np.ndarray:
    """The ``annotations`` struct array of ``cars_annos.mat`` as a 1-D record array."""
    name = "Cars196"
    require_file(mat_path, name, CARS_HINT)
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=True)
    except NotImplementedError as err:  # MATLAB v7.3 (HDF5) files
        raise DatasetError(f"{name}: {mat_path} is not a MATLAB v5 file ({err}). {CARS_HINT}") from err
    except Exception as err:  # scipy raises ValueError/TypeError/MatReadError on corrupt files
        raise DatasetError(
            f"{name}: cannot read {mat_path} ({type(err).__name__}: {err}). {CARS_HINT}"
        ) from err
    annos = mat.get("annotations")
    if annos is None:
        raise DatasetError(f"{name}: {mat_path} has no variable 'annotations'. {CARS_HINT}")
    annos = np.atleast_1d(annos)  # squeeze_me turns a 1x1 struct array into a 0-d record
    missing = [f for f in _FIELDS if annos.dtype.names is None or f not in annos.dtype.names]
    if missing:
        raise DatasetError(
            f"{name}: {mat_path}: 'annotations' lacks field(s) {', '.join(missing)} "
            f"(has {annos.dtype.names}). {CARS_HINT}"
        )
    return annos.reshape(-1)


def read_cars(root: Path) -> DatasetRecords:
    """Read Cars196 with the class-disjoint split (classes 1-98 train, 99-196 test)."""
    name = "Cars196"
    root = Path(root).expanduser()
    require_dir(root, name, CARS_HINT)
    root = root.resolve()
    mat_path = root / "cars_annos.mat"
    annos = _load_annotations(mat_path)
    kw = {"dataset": name, "hint": CARS_HINT}
    # "line numbers" of a .mat are the 1-based annotation indices.
    where = f"{mat_path} (annotations)"
    index = np.arange(1, len(annos) + 1)

    rel_paths = [str(p) for p in annos["relative_im_path"].tolist()]
    bad = [i for i, p in enumerate(rel_paths) if not p or p.startswith(("/", "\\"))]
    if bad:
        raise DatasetError(
            f"{name}: {where}, entry {bad[0] + 1}: relative_im_path {str(rel_paths[bad[0]])!r} is not a "
            f"relative image path. {CARS_HINT}"
        )
    try:
        raw = np.asarray(annos["class"].tolist(), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{name}: {where}: field 'class' is not numeric ({err}). {CARS_HINT}") from err
    if raw.shape != (len(annos),):
        raise DatasetError(f"{name}: {where}: field 'class' must hold one number per image. {CARS_HINT}")
    not_int = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
    if not_int.size:
        i = int(not_int[0])
        raise DatasetError(
            f"{name}: {where}, entry {i + 1}: class must be an integer, found {raw[i]}. {CARS_HINT}"
        )
    classes = raw.astype(np.int64)
    check_range(classes, 1, CARS_NUM_CLASSES, index, where, "class", unit="entry", **kw)
    check_unique(np.array(rel_paths, dtype=str), index, where, "relative_im_path", unit="entry", **kw)

    paths = absolute_paths(root, rel_paths)
    splits = split_by_class(paths, classes, CARS_TRAIN_CLASSES, mat_path, **kw)
    return DatasetRecords(
        name="cars",
        root=root,
        train=splits["train"],
        test=splits["test"],
        expected_sizes=dict(CARS_EXPECTED_SIZES),
    )


@register_dataset("cars")
class Cars196(RetrievalDataModule):
    """Cars196 / Stanford Cars, 196 car models (Krause et al., 2013), class-disjoint 98/98 DML split."""

    recall_ks = (1, 2, 4, 8)
    compute_nmi = True

    def read_records(self, root: Path) -> DatasetRecords:
        return read_cars(root)
