"""The embedded synthetic dataset: layout, determinism, caching and atomic installation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import synthetic
from datamodules.synthetic import (
    DATASET_DIRNAME,
    MANIFEST_NAME,
    VOCABULARY,
    class_factors,
    default_synthetic_root,
    generate_synthetic,
    render_class,
    synthetic_dirname,
)

PARAMS = {"num_classes": 10, "images_per_class": 4, "image_size": 32, "seed": 0}
NUM_IMAGES = PARAMS["num_classes"] * PARAMS["images_per_class"]
DISCRETE = ("shape", "primary", "secondary", "texture", "layout", "head_color")


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), **PARAMS)


def read_table(path: Path) -> list[tuple[int, str]]:
    """``<int id> <rest>`` lines of a CUB text file."""
    rows = [line.split(" ", 1) for line in path.read_text(encoding="utf-8").splitlines()]
    return [(int(key), value) for key, value in rows]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_official_cub(cub: Path) -> None:
    assert cub.name == DATASET_DIRNAME
    classes = read_table(cub / "classes.txt")
    images = read_table(cub / "images.txt")
    labels = read_table(cub / "image_class_labels.txt")
    split = read_table(cub / "train_test_split.txt")

    assert [i for i, _ in classes] == list(range(1, PARAMS["num_classes"] + 1))
    for table in (images, labels, split):
        assert [i for i, _ in table] == list(range(1, NUM_IMAGES + 1))
    folders = dict(classes)
    for class_id, folder in classes:
        assert folder.startswith(f"{class_id:03d}.")
    assert {v for _, v in split} == {"0", "1"}
    counts = np.bincount([int(c) for _, c in labels], minlength=PARAMS["num_classes"] + 1)[1:]
    assert (counts == PARAMS["images_per_class"]).all()

    for (_, relative), (_, class_id) in zip(images, labels):
        assert relative.split("/")[0] == folders[int(class_id)]
        with Image.open(cub / "images" / relative) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (PARAMS["image_size"],) * 2
    manifest = json.loads((cub / MANIFEST_NAME).read_text())
    assert {k: manifest[k] for k in PARAMS} == PARAMS
    assert manifest["format_version"] == synthetic.FORMAT_VERSION


def test_same_seed_gives_identical_bytes(cub: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", **PARAMS)
    assert files(again) == files(cub)


def test_different_seed_gives_different_images(cub: Path, tmp_path: Path) -> None:
    other = generate_synthetic(tmp_path / "other", **{**PARAMS, "seed": 1})
    first = [cub / "images" / p for _, p in read_table(cub / "images.txt")[:8]]
    second = [other / "images" / p for _, p in read_table(other / "images.txt")[:8]]
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(first, second))


def test_image_does_not_depend_on_set_size() -> None:
    np.testing.assert_array_equal(render_class(3, 2, 32), render_class(3, 5, 32)[:2])
    assert render_class(3, 0, 32).shape == (0, 32, 32, 3)


def test_cache_hit_rewrites_nothing(cub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in cub.rglob("*")}

    def fail(*args: object) -> None:
        raise AssertionError("a cache hit must not render")

    monkeypatch.setattr(synthetic, "_write_dataset", fail)
    assert generate_synthetic(cub.parent, **PARAMS) == cub
    assert {p: p.stat().st_mtime_ns for p in cub.rglob("*")} == before


def test_stale_manifest_triggers_regeneration(tmp_path: Path) -> None:
    cub = generate_synthetic(tmp_path, **PARAMS)
    expected = files(cub)
    manifest = json.loads((cub / MANIFEST_NAME).read_text())
    (cub / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": -1}))
    (cub / "leftover.txt").write_text("from the stale copy")

    assert generate_synthetic(tmp_path, **PARAMS) == cub
    assert files(cub) == expected
    assert [p.name for p in tmp_path.iterdir()] == [DATASET_DIRNAME]  # no temp or stale dirs left


def test_interrupted_generation_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save = synthetic._save_jpeg
    calls = []

    def interrupted(pixels: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) > 5:
            raise KeyboardInterrupt
        save(pixels, path)

    monkeypatch.setattr(synthetic, "_save_jpeg", interrupted)
    monkeypatch.setattr(synthetic, "GENERATION_WORKERS", 1)  # the patch reaches only this process
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path, **PARAMS)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(synthetic, "_save_jpeg", save)
    assert (generate_synthetic(tmp_path, **PARAMS) / MANIFEST_NAME).is_file()


def test_parallel_generation_writes_the_same_bytes_as_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "GENERATION_WORKERS", 1)
    serial = generate_synthetic(tmp_path / "serial", **PARAMS)
    monkeypatch.setattr(synthetic, "GENERATION_WORKERS", 2)
    parallel = generate_synthetic(tmp_path / "parallel", **PARAMS)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    assert all((serial / f).read_bytes() == (parallel / f).read_bytes() for f in files)


def test_losing_a_concurrent_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = synthetic._write_dataset
    target = tmp_path / DATASET_DIRNAME

    def write_then_lose(out: Path, manifest: dict) -> None:
        write(out, manifest)
        winner = tmp_path / "winner"
        write(winner, manifest)
        (winner / "winner.txt").touch()
        winner.rename(target)  # another rank finishes first

    monkeypatch.setattr(synthetic, "_write_dataset", write_then_lose)
    assert generate_synthetic(tmp_path, **PARAMS) == target
    assert (target / "winner.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [DATASET_DIRNAME]


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / DATASET_DIRNAME).mkdir()
    (tmp_path / DATASET_DIRNAME / "images.txt").write_text("1 real/data.jpg\n")
    with pytest.raises(FileExistsError):
        generate_synthetic(tmp_path, **PARAMS)
    assert (tmp_path / DATASET_DIRNAME / "images.txt").is_file()


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DML_BENCHMARK_DATA", str(tmp_path))
    assert default_synthetic_root() == tmp_path / "synthetic"
    monkeypatch.delenv("DML_BENCHMARK_DATA")
    assert default_synthetic_root() == Path.home() / ".cache" / "dml-benchmark" / "synthetic"
    assert synthetic_dirname() == "synthetic-c200-n30-s64-seed0"
    assert synthetic_dirname(10, 4, 32, 1) == "synthetic-c10-n4-s32-seed1"


def test_class_factors_recombine_a_shared_vocabulary() -> None:
    factors = [class_factors(c) for c in range(1, 201)]
    assert class_factors(7) == factors[6]
    assert len({tuple(f[k] for k in DISCRETE) for f in factors}) == 200  # no class repeats a combination
    assert all(f["primary"] != f["secondary"] for f in factors)
    vocab = {**VOCABULARY, "primary": VOCABULARY["color"], "secondary": VOCABULARY["color"]}
    for key in DISCRETE:
        train_values = {f[key] for f in factors[:100]}
        assert {f[key] for f in factors} <= set(vocab[key])
        assert {f[key] for f in factors[100:]} <= train_values  # test classes reuse training factors
    assert json.loads(json.dumps(factors[0])) == factors[0]


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"images_per_class": -1}, {"image_size": 0}, {"seed": -1}]
)
def test_rejects_bad_parameters(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path, **{**PARAMS, **kwargs})
