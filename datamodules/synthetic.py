"""The embedded default dataset: procedurally generated "birds" in the CUB-200-2011 layout.

Real datasets and pretrained weights cannot be downloaded everywhere, so the benchmark runs
out of the box on this deterministic, class-disjoint stand-in for CUB-200-2011: by default
200 classes x 30 images of 64x64 RGB, classes 1..100 for training and 101..200 for testing.

Factor design
-------------
Every class is one combination of shared generative factors (see :data:`VOCABULARY` and
:func:`class_factors`):

* discrete: body ``shape``, ``primary`` and ``secondary`` colour from :data:`PALETTE`, body
  ``texture`` (plain, stripes, dots, checker, rings), a ``layout`` of parts (tail, forked tail,
  wing patch, crest; a head with an eye is always drawn) and a ``head_color``;
* continuous, fixed per class: aspect ratio, texture frequency and angle, head size and tail
  length.

The discrete combinations are a seeded permutation of all 64,800 possibilities, so no two
classes share one while every factor value is shared by many classes; the test classes are
new combinations of values seen in training (for the default 200 classes every value occurs
among the training classes), which is what a learned metric must generalise over on CUB.

Every image adds nuisances that a metric must learn to ignore: horizontal flip, rotation,
scale, position, a random two-colour gradient background with low-frequency mottling,
clutter blobs, a perch that may occlude the bird, global illumination / white balance and
pixel noise. They dominate raw-pixel and untrained-network statistics (low Recall@1 without
learning) while the class stays plainly visible.

On disk
-------
:func:`generate_synthetic` writes ``<root>/CUB_200_2011/`` exactly as the official archive
lays it out (``images.txt``, ``image_class_labels.txt``, ``classes.txt``,
``train_test_split.txt``, ``images/NNN.Class_Name/Class_Name_KKKK.jpg``), so the CUB reader
loads it unchanged, plus ``synthetic.json``, a manifest of the generation parameters that
detects a stale cache. Generation goes to a temporary sibling directory that is renamed into
place only when complete: an interrupted run leaves no dataset (a killed process may leave
a hidden ``.CUB_200_2011.tmp-*`` directory, never read, safe to delete), concurrent runs (DDP
ranks) agree on one winner, and a matching manifest makes later calls a no-op.

API
---
* :func:`default_synthetic_root` - ``$DML_BENCHMARK_DATA/synthetic`` (default
  ``~/.cache/dml-benchmark/synthetic``), the parent of all generated variants;
* :func:`synthetic_dirname` - a per-parameter folder name, ``synthetic-c200-n30-s64-seed0``;
* :func:`generate_synthetic` - write (or find cached) ``<root>/CUB_200_2011``, return it;
* :func:`class_factors`, :data:`VOCABULARY` - what each class is made of;
* :func:`render_class` - the images of one class as an array, without touching the disk.

Typical use::

    root = default_synthetic_root() / synthetic_dirname()  # .../synthetic/synthetic-c200-n30-s64-seed0
    cub_dir = generate_synthetic(root)                       # .../CUB_200_2011, generated once

Output is a pure function of the parameters: the same seed gives byte-identical files (for
one numpy / Pillow build), and image ``k`` of class ``c`` depends only on ``(seed, c, k,
image_size)``, so it is the same scene whatever ``num_classes`` or ``images_per_class`` is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmark.core.io import default_data_root
from benchmark.core.validation import require

__all__ = [
    "DATASET_DIRNAME",
    "FORMAT_VERSION",
    "HEAD_COLORS",
    "LAYOUTS",
    "MANIFEST_NAME",
    "MAX_CLASSES",
    "PALETTE",
    "SHAPES",
    "TEXTURES",
    "VOCABULARY",
    "class_factors",
    "default_synthetic_root",
    "generate_synthetic",
    "render_class",
    "synthetic_dirname",
]

FORMAT_VERSION = 2  # bump whenever the rendered pixels or the layout change (stale caches regenerate)
DATASET_DIRNAME = "CUB_200_2011"
MANIFEST_NAME = "synthetic.json"
JPEG_QUALITY = 95

# --- factor vocabulary ---------------------------------------------------------------------------

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.97, 0.88, 0.18),
    "green": (0.18, 0.66, 0.22),
    "teal": (0.05, 0.62, 0.62),
    "blue": (0.15, 0.30, 0.90),
    "purple": (0.56, 0.22, 0.75),
    "pink": (0.98, 0.55, 0.75),
    "brown": (0.50, 0.30, 0.12),
    "grey": (0.55, 0.55, 0.55),
}
SHAPES = ("ellipse", "egg", "diamond", "box", "star", "triangle")
TEXTURES = ("plain", "stripes", "dots", "checker", "rings")
# Parts drawn besides body and head; every class has a head with an eye.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "tail": ("tail",),
    "forktail": ("forktail",),
    "wing": ("wing",),
    "tail_wing": ("tail", "wing"),
    "crest_tail": ("crest", "tail"),
    "crest_wing": ("crest", "wing"),
}
HEAD_COLORS = ("primary", "secondary", "dark", "light")
VOCABULARY: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(PALETTE),
    "texture": TEXTURES,
    "layout": tuple(LAYOUTS),
    "head_color": HEAD_COLORS,
}
# shape x primary x secondary (!= primary) x texture x layout x head colour
_FACTOR_SIZES = (len(SHAPES), len(PALETTE), len(PALETTE) - 1, len(TEXTURES), len(LAYOUTS), len(HEAD_COLORS))
MAX_CLASSES = math.prod(_FACTOR_SIZES)

_DARK = (0.08, 0.07, 0.07)
_LIGHT = (0.95, 0.95, 0.92)

# Independent random streams, mixed into every seed sequence.
_ORDER_STREAM, _CLASS_STREAM, _IMAGE_STREAM = 0, 1, 2

# --- nuisance ranges (image coordinates span [-1, 1]) ---------------------------------------------
_OBJECT_SCALE = 0.42  # body half-length as a fraction of the image half-width
_SCALE_RANGE = (0.8, 1.25)
_MAX_ROTATION = math.radians(35.0)
_MAX_SHIFT = 0.25
_NUM_BLOBS = 3
_BLOB_PROB = 0.6
_PERCH_PROB = 0.5
_PERCH_BROWN = np.array([0.42, 0.3, 0.18])
_BG_FIELD_GRID = 4  # low-frequency background mottling, bilinearly upsampled from a 4x4 grid
_BG_FIELD_STD = 0.07
_BG_SATURATION = (0.0, 0.7)


# --- public API ----------------------------------------------------------------------------------


def default_synthetic_root() -> Path:
    """``$DML_BENCHMARK_DATA/synthetic`` (default ``~/.cache/dml-benchmark/synthetic``)."""
    return default_data_root() / "synthetic"


def synthetic_dirname(
    num_classes: int = 200, images_per_class: int = 30, image_size: int = 64, seed: int = 0
) -> str:
    """Folder name unique to the parameters, e.g. ``synthetic-c200-n30-s64-seed0``."""
    return f"synthetic-c{num_classes}-n{images_per_class}-s{image_size}-seed{seed}"


@functools.lru_cache(maxsize=8)
def _combination_order(seed: int) -> np.ndarray:
    """A seeded permutation of all discrete factor combinations; class ``c`` takes entry ``c - 1``."""
    return np.random.default_rng([seed, _ORDER_STREAM]).permutation(MAX_CLASSES)


def class_factors(class_id: int, seed: int = 0) -> dict[str, Any]:
    """The generative factors of class ``class_id`` (1-based), a JSON-serialisable dict.

    Discrete factors name entries of :data:`VOCABULARY`; the continuous ones are in object
    units (body half-length = 1) and degrees.
    """
    _check_nonnegative(seed=seed)
    if not 1 <= class_id <= MAX_CLASSES:
        raise ValueError(f"class_id must be in 1..{MAX_CLASSES}, got {class_id}")
    combination = int(_combination_order(seed)[class_id - 1])
    shape, primary, secondary, texture, layout, head = (
        int(i) for i in np.unravel_index(combination, _FACTOR_SIZES)
    )
    secondary += secondary >= primary  # skip the primary colour
    colors = tuple(PALETTE)
    rng = np.random.default_rng([seed, _CLASS_STREAM, class_id])
    factors: dict[str, Any] = {
        "class_id": class_id,
        "shape": SHAPES[shape],
        "primary": colors[primary],
        "secondary": colors[secondary],
        "texture": TEXTURES[texture],
        "layout": tuple(LAYOUTS)[layout],
        "head_color": HEAD_COLORS[head],
        "aspect": float(rng.uniform(0.5, 0.72)),
        "texture_frequency": float(rng.uniform(1.3, 2.1)),
        "texture_angle": float(rng.uniform(0.0, 180.0)),
        "head_size": float(rng.uniform(0.3, 0.42)),
        "tail_length": float(rng.uniform(0.45, 0.75)),
    }
    factors["name"] = _class_name(factors)
    return factors


def render_class(class_id: int, num_images: int, image_size: int = 64, seed: int = 0) -> np.ndarray:
    """Images ``0..num_images-1`` of one class as a ``(N, S, S, 3)`` uint8 array.

    The whole class is rendered at once with broadcasting over ``(N, S, S)`` coordinate grids.
    """
    _check_nonnegative(num_images=num_images)
    _check_positive(image_size=image_size)
    factors = class_factors(class_id, seed)
    if num_images == 0:
        return np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    nuisance = _draw_nuisances(seed, class_id, num_images, image_size)
    return _render(factors, nuisance, image_size)


def generate_synthetic(
    root: Path | str,
    num_classes: int = 200,
    images_per_class: int = 30,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the synthetic dataset to ``<root>/CUB_200_2011`` unless it is already there; return that path.

    Classes ``1..num_classes // 2`` are the DML training classes, the rest the test classes.
    A directory with a matching ``synthetic.json`` is returned as is; one with a different
    manifest is regenerated and swapped in; one without a manifest is not ours and raises
    :class:`FileExistsError` rather than being deleted.
    """
    _check_positive(num_classes=num_classes, images_per_class=images_per_class, image_size=image_size)
    _check_nonnegative(seed=seed)
    require(num_classes <= MAX_CLASSES, "data.num_classes", f"at most {MAX_CLASSES}", num_classes)
    root = Path(root).expanduser()
    target = root / DATASET_DIRNAME
    manifest = _manifest(num_classes, images_per_class, image_size, seed)
    if _read_manifest(target) == manifest:
        return target
    _refuse_foreign(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIRNAME}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _write_dataset(tmp, manifest)
        _install(tmp, target, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return target


# --- files and atomicity -------------------------------------------------------------------------


def _manifest(num_classes: int, images_per_class: int, image_size: int, seed: int) -> dict[str, Any]:
    return {
        "generator": "dml-benchmark synthetic birds",
        "format_version": FORMAT_VERSION,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
        "jpeg_quality": JPEG_QUALITY,
        "num_train_classes": num_classes // 2,
    }


def _read_manifest(dataset_dir: Path) -> dict[str, Any] | None:
    """The manifest in ``dataset_dir``, or None when it is missing or unreadable."""
    try:
        return json.loads((dataset_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _refuse_foreign(target: Path) -> None:
    if target.exists() and not (target / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{target} exists but has no {MANIFEST_NAME}, so it was not made by generate_synthetic; "
            "refusing to replace it. Pass another root or remove it."
        )


def _install(tmp: Path, target: Path, manifest: dict[str, Any], attempts: int = 10) -> None:
    """Rename the finished ``tmp`` to ``target``, replacing a stale one; a concurrent winner is kept.

    Renaming a directory onto an existing non-empty one fails atomically, so of several
    processes exactly one installs its copy; the others find a matching manifest and return.
    """
    error: OSError | None = None
    for _ in range(attempts):
        try:
            os.replace(tmp, target)
            return
        except OSError as err:  # target exists (or vanished meanwhile: just retry)
            error = err
        current = _read_manifest(target)
        if current == manifest:
            return
        if current is None:
            _refuse_foreign(target)
            continue
        stale = target.with_name(f".{DATASET_DIRNAME}.stale-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not install the synthetic dataset at {target}") from error


GENERATION_WORKERS: int | None = None  # processes that render classes; None: min(8, CPU count)


def _write_class(out: Path, class_id: int, per_class: int, size: int, seed: int, width: int) -> tuple[str, list[str]]:
    """Render and write one class's images; return its folder name and relative image paths."""
    name = class_factors(class_id, seed)["name"]
    folder = f"{class_id:0{width}d}.{name}"
    (out / "images" / folder).mkdir(parents=True)
    relatives = []
    for k, pixels in enumerate(render_class(class_id, per_class, size, seed)):
        relative = f"{folder}/{name}_{k + 1:04d}.jpg"
        _save_jpeg(pixels, out / "images" / relative)
        relatives.append(relative)
    return folder, relatives


def _write_dataset(out: Path, manifest: dict[str, Any]) -> None:
    """Render and write every class into ``out`` in the CUB-200-2011 layout; the manifest goes last.

    Classes are rendered in parallel processes (each class depends only on its id and the
    seed, so the bytes are the same as a serial run); the lists are written in class order.
    """
    num_classes, per_class = manifest["num_classes"], manifest["images_per_class"]
    size, seed = manifest["image_size"], manifest["seed"]
    width = max(3, len(str(num_classes)))
    ids = range(1, num_classes + 1)
    workers = GENERATION_WORKERS or min(8, os.cpu_count() or 1)
    args = [(out, c, per_class, size, seed, width) for c in ids]
    if workers > 1 and num_classes > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rendered = list(pool.map(_write_class, *zip(*args), chunksize=max(1, num_classes // (4 * workers))))
    else:
        rendered = [_write_class(*a) for a in args]
    classes, images, labels, split = [], [], [], []
    image_id = 0
    for class_id, (folder, relatives) in zip(ids, rendered):
        classes.append(f"{class_id} {folder}")
        for k, relative in enumerate(relatives):
            image_id += 1
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(k % 2 == 0)}")  # official classification split: unused here
    for filename, lines in (
        ("classes.txt", classes),
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
    ):
        (out / filename).write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8", newline="\n")


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    """Encode with every option explicit so that the bytes are reproducible."""
    Image.fromarray(pixels).save(
        path, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False, progressive=False
    )


def _class_name(factors: dict[str, Any]) -> str:
    """CUB-style name, e.g. ``Red_Teal_Stripes_Egg_CrestTail_DarkHead``."""
    words = [factors[k] for k in ("primary", "secondary", "texture", "shape", "layout")]
    words.append(f"{factors['head_color']}_head")
    return "_".join("".join(w.capitalize() for w in word.split("_")) for word in words)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        require(int(value) == value and value >= 1, f"data.{key}", "a positive integer", value)


def _check_nonnegative(**values: int) -> None:
    for key, value in values.items():
        require(int(value) == value and value >= 0, f"data.{key}", "a non-negative integer", value)


# --- nuisances -----------------------------------------------------------------------------------


def _draw_nuisances(seed: int, class_id: int, num_images: int, image_size: int) -> dict[str, np.ndarray]:
    """Per-image nuisance parameters, stacked along a leading image axis."""
    draws = [
        _draw_image(np.random.default_rng([seed, _IMAGE_STREAM, class_id, k]), image_size)
        for k in range(num_images)
    ]
    return {key: np.stack([d[key] for d in draws]) for key in draws[0]}


def _draw_image(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Nuisances of one image; the pixel noise is drawn last, so the scene does not depend on ``size``."""
    draw = {
        "flip": rng.choice((-1.0, 1.0)),
        "angle": rng.uniform(-_MAX_ROTATION, _MAX_ROTATION),
        "scale": _OBJECT_SCALE * math.exp(rng.uniform(*np.log(_SCALE_RANGE))),
        "shift": rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, 2),
        "bg_colors": _random_colors(rng, 2),
        "bg_angle": rng.uniform(0.0, 2.0 * math.pi),
        "bg_field": rng.normal(0.0, _BG_FIELD_STD, (3, _BG_FIELD_GRID, _BG_FIELD_GRID)),
        "blob_present": rng.random(_NUM_BLOBS) < _BLOB_PROB,
        "blob_centers": rng.uniform(-0.9, 0.9, (_NUM_BLOBS, 2)),
        "blob_radii": rng.uniform(0.07, 0.2, (_NUM_BLOBS, 2)),
        "blob_colors": _random_colors(rng, _NUM_BLOBS),
        "perch_present": rng.random() < _PERCH_PROB,
        "perch_angle": rng.uniform(-0.5, 0.5),
        "perch_offset": rng.choice((-1.0, 1.0)) * rng.uniform(0.25, 0.9),  # in bird scales
        "perch_width": rng.uniform(0.04, 0.08),
        "perch_color": np.clip(_PERCH_BROWN * rng.uniform(0.5, 1.4) + rng.uniform(-0.06, 0.06, 3), 0.0, 1.0),
        "gain": rng.uniform(0.7, 1.2) * rng.uniform(0.9, 1.1, 3),  # exposure x white balance
        "shading": rng.uniform(0.0, 0.3),
        "noise_std": rng.uniform(0.01, 0.05),
    }
    draw["noise"] = rng.standard_normal((3, size, size), dtype=np.float32) * np.float32(draw.pop("noise_std"))
    return {key: np.asarray(value, dtype=np.float32) for key, value in draw.items()}


def _random_colors(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` RGB colours of random hue, saturation and brightness (as backgrounds and clutter)."""
    rgb = rng.random((n, 3))
    grey = rgb.mean(axis=1, keepdims=True)
    saturation = rng.uniform(*_BG_SATURATION, (n, 1))
    return (grey + (rgb - grey) * saturation).astype(np.float32)


# --- rendering -----------------------------------------------------------------------------------


def _render(factors: dict[str, Any], nz: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Composite background, clutter, bird and perch for a batch of images; returns ``(N, S, S, 3)`` uint8.

    Works channels-first, ``(N, 3, S, S)``, so that per-pixel alphas broadcast over whole
    rows rather than over an innermost axis of length 3.
    """
    n = len(nz["flip"])
    pixel = 2.0 / size  # pixel width in image units
    grid = (np.arange(size, dtype=np.float32) + 0.5) * pixel - 1.0
    x, y = grid[None, None, :], grid[None, :, None]  # (1, 1, S), (1, S, 1)

    def per_image(a: np.ndarray) -> np.ndarray:
        return a.reshape(n, 1, 1)

    img = _background(nz, x, y, size)
    for k in range(_NUM_BLOBS):  # clutter: random ellipses behind the bird
        dx = x - per_image(nz["blob_centers"][:, k, 0])
        dy = y - per_image(nz["blob_centers"][:, k, 1])
        rx, ry = per_image(nz["blob_radii"][:, k, 0]), per_image(nz["blob_radii"][:, k, 1])
        alpha = _coverage(np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2), np.minimum(rx, ry), pixel)
        img = _over(img, _rgb(nz["blob_colors"][:, k]), alpha * per_image(nz["blob_present"][:, k]))

    # Object coordinates: body centred at 0, body half-length 1, head towards +u, "up" is -v.
    scale = per_image(nz["scale"])
    cx, cy = x - per_image(nz["shift"][:, 0]), y - per_image(nz["shift"][:, 1])
    cos, sin = per_image(np.cos(nz["angle"])), per_image(np.sin(nz["angle"]))
    fx = cx * per_image(nz["flip"])
    u, v = (cos * fx + sin * cy) / scale, (cos * cy - sin * fx) / scale
    img = _draw_bird(img, factors, u, v, pixel / scale, per_image(nz["shading"]))

    # Perch: a slightly tilted band passing above or below the bird's centre, drawn in front of it.
    angle, width = per_image(nz["perch_angle"]), per_image(nz["perch_width"])
    dist = np.abs(np.cos(angle) * cy - np.sin(angle) * cx - per_image(nz["perch_offset"]) * scale)
    alpha = _coverage(dist / width, width, pixel) * per_image(nz["perch_present"])
    img = _over(img, _rgb(nz["perch_color"]), alpha)

    img = img * _rgb(nz["gain"]) + nz["noise"]
    return np.ascontiguousarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1))


def _background(nz: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Two-colour linear gradient in a random direction plus low-frequency colour mottling."""
    angle = nz["bg_angle"][:, None, None]
    t = (np.cos(angle) * x + np.sin(angle) * y) * 0.5 + 0.5  # (N, S, S) in [0, 1]
    start, end = _rgb(nz["bg_colors"][:, 0]), _rgb(nz["bg_colors"][:, 1])
    up = _upsample_matrix(_BG_FIELD_GRID, size)
    return start + (end - start) * t[:, None] + up @ nz["bg_field"] @ up.T


def _upsample_matrix(grid: int, size: int) -> np.ndarray:
    """``(size, grid)`` bilinear interpolation weights from a coarse grid to ``size`` samples."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * (grid - 1)
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = pos - lo
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), lo] = 1.0 - frac
    weights[np.arange(size), lo + 1] = frac
    return weights


def _draw_bird(
    img: np.ndarray, f: dict[str, Any], u: np.ndarray, v: np.ndarray, pw: np.ndarray, shading: np.ndarray
) -> np.ndarray:
    """Tail, body, wing, head, crest and eye of class ``f`` over ``img``; ``pw`` is the pixel width in object units."""
    primary, secondary = _rgb(PALETTE[f["primary"]]), _rgb(PALETTE[f["secondary"]])
    parts = LAYOUTS[f["layout"]]
    b = f["aspect"]
    light = (1.0 - shading * np.clip(v / b, -1.0, 1.0))[:, None]  # lit from above

    if "tail" in parts or "forktail" in parts:
        length = f["tail_length"]
        half = 0.5 * (length + 0.3)  # the wedge runs from u = -0.7 (under the body) to u = -1 - length
        tu, tv = (u + 0.7) / half + 1.0, v / half  # apex at local (1, 0), base at local -1
        alpha = _coverage(_triangle(tu, tv, 0.55 + 0.25 * b / half), half, pw)
        if "forktail" in parts:
            notch = _triangle((u + 1.0 + length) / (0.5 * half) - 1.0, v / (0.5 * half), 0.55)
            alpha *= 1.0 - _coverage(notch, 0.5 * half, pw)
        img = _over(img, secondary * 0.8 * light, alpha)

    body = _coverage(_shape(f["shape"], u, v, b), b, pw)
    pattern = _texture(f["texture"], u, v, b, f["texture_frequency"], math.radians(f["texture_angle"]), pw)
    color = primary + (secondary - primary) * pattern[:, None]
    img = _over(img, color * light, body)

    if "wing" in parts:
        wing = _ellipse(u, v, (-0.2, 0.05 * b), (0.5, 0.45 * b), math.radians(-12.0))
        img = _over(img, secondary * 0.65 * light, _coverage(wing, 0.45 * b, pw) * body)

    radius = f["head_size"]
    center = (0.95, -0.45 * b)
    head_color = {"primary": primary, "secondary": secondary, "dark": _rgb(_DARK), "light": _rgb(_LIGHT)}[
        f["head_color"]
    ]
    if "crest" in parts:
        crest = _ellipse(
            u, v, (center[0] - 0.45 * radius, center[1] - 1.15 * radius), (0.25, 0.6 * radius), 0.6
        )
        crest_color = primary if f["head_color"] == "secondary" else secondary
        img = _over(img, crest_color * 0.8, _coverage(crest, 0.6 * radius, pw))
    img = _over(img, head_color * light, _coverage(_ellipse(u, v, center, (radius, radius)), radius, pw))
    eye = _ellipse(
        u, v, (center[0] + 0.4 * radius, center[1] - 0.15 * radius), (0.25 * radius, 0.25 * radius)
    )
    eye_color = _rgb(_LIGHT if f["head_color"] == "dark" else _DARK)
    return _over(img, eye_color, _coverage(eye, 0.25 * radius, pw))


def _shape(name: str, u: np.ndarray, v: np.ndarray, b: float) -> np.ndarray:
    """Body as a level set: < 1 inside, 1 on the boundary (half-length 1, half-height ``b``)."""
    vb = v / b
    if name == "ellipse":
        return np.sqrt(u**2 + vb**2)
    if name == "egg":  # fuller towards the head
        return np.sqrt(u**2 + (vb / np.clip(1.0 + 0.35 * u, 0.3, None)) ** 2)
    if name == "diamond":
        return np.abs(u) + np.abs(vb)
    if name == "box":  # rounded rectangle (superellipse)
        return np.sqrt(np.sqrt(u**4 + vb**4))
    if name == "star":  # five lobes
        return np.sqrt(u**2 + vb**2) / (1.0 + 0.22 * np.cos(5.0 * np.arctan2(vb, u)))
    if name == "triangle":  # apex at the head, base at the tail
        return _triangle(u, v, 1.3 * b)
    raise ValueError(f"unknown shape {name!r}; choose from {SHAPES}")


def _triangle(u: np.ndarray, v: np.ndarray, half_width: float) -> np.ndarray:
    """Isosceles triangle level set: apex at (1, 0), base at u = -1 spanning ``|v| <= half_width``."""
    return np.maximum(-u, 2.0 * np.abs(v) / half_width + u)


def _ellipse(
    u: np.ndarray, v: np.ndarray, center: tuple[float, float], radii: tuple[float, float], angle: float = 0.0
) -> np.ndarray:
    """Level set of a (rotated) ellipse."""
    du, dv = u - center[0], v - center[1]
    c, s = math.cos(angle), math.sin(angle)
    return np.sqrt(((c * du + s * dv) / radii[0]) ** 2 + ((-s * du + c * dv) / radii[1]) ** 2)


def _texture(
    name: str, u: np.ndarray, v: np.ndarray, b: float, freq: float, angle: float, pw: np.ndarray
) -> np.ndarray:
    """Secondary-colour weight in [0, 1] of the body pattern, anti-aliased to the pixel size."""
    if name == "plain":
        return np.zeros_like(u)
    p = math.cos(angle) * u + math.sin(angle) * v
    q = -math.sin(angle) * u + math.cos(angle) * v
    edge = 2.0 * math.pi * freq * pw  # phase change across one pixel
    if name == "stripes":
        return _smoothstep(np.sin(2.0 * math.pi * freq * p) / edge)
    if name == "checker":
        return _smoothstep(np.sin(2.0 * math.pi * freq * p) * np.sin(2.0 * math.pi * freq * q) / edge)
    if name == "rings":
        return _smoothstep(np.sin(2.0 * math.pi * freq * np.sqrt(u**2 + (v / b) ** 2)) / edge)
    if name == "dots":
        cell_u, cell_v = freq * p % 1.0 - 0.5, freq * q % 1.0 - 0.5
        return _smoothstep((0.3 - np.sqrt(cell_u**2 + cell_v**2)) / (freq * pw))
    raise ValueError(f"unknown texture {name!r}; choose from {TEXTURES}")


def _rgb(color: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """RGB along the last axis -> ``(..., 3, 1, 1)`` float32, to broadcast against ``(N, 3, S, S)``."""
    return np.asarray(color, dtype=np.float32)[..., None, None]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """Anti-aliased step: 0 below -0.5, 1 above 0.5 (``x`` in pixel units)."""
    return np.clip(x + 0.5, 0.0, 1.0)


def _coverage(level: np.ndarray, radius: float | np.ndarray, pw: float | np.ndarray) -> np.ndarray:
    """Anti-aliased inside-fraction of a level set (boundary at 1, ``radius`` units per level unit)."""
    return np.clip((1.0 - level) * radius / pw + 0.5, 0.0, 1.0)


def _over(img: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite ``color`` (broadcastable to ``img``) with per-pixel ``alpha`` over ``img``, in place."""
    delta = color - img
    delta *= alpha[:, None]
    img += delta
    return img
