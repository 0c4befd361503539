"""The two image decoders (PIL, torchvision) give the same images; errors; the perf command."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.base as base
from benchmark.app.cli import main
from benchmark.core.contracts import Normalization, ViewRequest
from datamodules.base import DEFAULT_DECODER, ImageDataset, RetrievalDataModule
from datamodules.cub import CUB200
from datamodules.records import DatasetError, SplitRecords
from datamodules.transforms import eval_transform, train_transform
from tests.datamodules.fixtures import make_cub

# JPEG decoders may differ in IDCT and chroma upsampling by a level or two; libjpeg-turbo in
# both PIL and torchvision (today's wheels) gives identical pixels.
PIXEL_MAX, PIXEL_MEAN = 3, 0.5
# The normalised tensors: a few levels / (255 * std ~ 0.225) after resizing (PIL and torch
# resample alike but round differently).
TENSOR_MAX, TENSOR_MEAN = 0.08, 0.005


def _photo(width: int = 96, height: int = 72) -> np.ndarray:
    """(H, W, 3) uint8: gradients, a disc and mild noise, so that JPEG has work to do."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / width, y * 255 / height, (x + y) * 128 / (width + height) + 60], -1)
    image[(x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 4) ** 2] = (200, 40, 90)
    return np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same picture as RGB, grayscale, CMYK and progressive JPEG, and as an RGBA PNG."""
    folder = tmp_path_factory.mktemp("pipeline")
    rgb = Image.fromarray(_photo())
    files = {
        "rgb.jpg": (rgb, {"quality": 90}),
        "gray.jpg": (rgb.convert("L"), {"quality": 90}),
        "cmyk.jpg": (rgb.convert("CMYK"), {"quality": 90}),
        "progressive.jpg": (rgb, {"quality": 90, "progressive": True}),
        "rgba.png": (rgb.convert("RGBA"), {}),
    }
    out = {}
    for name, (image, options) in files.items():
        out[name] = folder / name
        image.save(out[name], **options)
    return out


def _records(paths: list[Path]) -> SplitRecords:
    n = len(paths)
    return SplitRecords([str(p) for p in paths], np.zeros(n), np.ones(n, bool), np.ones(n, bool))


def test_decoders_give_the_same_pixels(images: dict[str, Path]) -> None:
    for name, path in images.items():
        with Image.open(path) as im:
            reference = np.asarray(im.convert("RGB"), dtype=np.int16)  # (H, W, 3)
        tensor = ImageDataset(_records([path]), None, decoder="torchvision")._load(0)
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8 and tensor.shape == (3, 72, 96), name
        diff = np.abs(tensor.permute(1, 2, 0).numpy().astype(np.int16) - reference)
        assert diff.max() <= PIXEL_MAX and diff.mean() <= PIXEL_MEAN, (name, diff.max(), diff.mean())
        assert isinstance(ImageDataset(_records([path]), None, decoder="pil")._load(0), Image.Image)


def test_transforms_agree_on_pil_images_and_tensors(images: dict[str, Path]) -> None:
    paths = list(images.values())
    pil = ImageDataset(_records(paths), None, decoder="pil")
    tv = ImageDataset(_records(paths), None, decoder="torchvision")
    evaluate, train = eval_transform(32, Normalization()), train_transform(32, Normalization())
    for i in range(len(paths)):
        a, b = evaluate(pil._load(i)), evaluate(tv._load(i))  # (3, 32, 32)
        assert a.shape == b.shape == (3, 32, 32)
        assert (a - b).abs().max() <= TENSOR_MAX and (a - b).abs().mean() <= TENSOR_MEAN
        torch.manual_seed(i)  # the same random crop and flip for both
        a = train(pil._load(i))
        torch.manual_seed(i)
        b = train(tv._load(i))
        assert (a - b).abs().max() <= TENSOR_MAX and (a - b).abs().mean() <= TENSOR_MEAN


def test_randaugment_views_take_tensors_with_bicubic_interpolation(images: dict[str, Path]) -> None:
    """Tensor affine ops have no bicubic: the views are augmented on a PIL copy of the crop."""
    views = train_transform(32, Normalization(), views=ViewRequest(num_views=3, augment="randaugment"))
    tensor = ImageDataset(_records([images["rgb.jpg"]]), None, decoder="torchvision")._load(0)
    assert views(tensor).shape == (3, 3, 32, 32)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_damaged_files_raise_the_same_error_with_both_decoders(tmp_path: Path, images: dict[str, Path], decoder: str) -> None:
    data = images["rgb.jpg"].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    paths = [tmp_path / "truncated.jpg", tmp_path / "garbage.jpg", tmp_path / "missing.jpg"]
    dataset = ImageDataset(_records(paths), lambda x: x, decoder=decoder)
    for i, path in enumerate(paths):
        with pytest.raises(DatasetError, match=f"Cannot decode image {path}: .*corrupt or truncated"):
            dataset[i]


def test_unknown_decoder_names_the_option_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--data\.decoder must be one of 'pil', 'torchvision'; got 'bogus'"):
        RetrievalDataModule(root=str(tmp_path), decoder="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"--data\.decoder"):
        ImageDataset(_records([]), None, decoder="bogus")  # type: ignore[arg-type]


def test_unknown_decoder_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--method", "ms", "--data", "cub", "--data.root", str(tmp_path), "--recipe", "none",
            "--data.decoder", "bogus", "--logger", "none", "--run_dir", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "decoder" in err and "'pil', 'torchvision'" in err and "bogus" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_the_datamodule_decodes_with_its_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_cub(tmp_path, classes=200, per_class=2).parent
    calls: Counter[str] = Counter()

    def counting(name: str, decode: Callable[[str], object]) -> Callable[[str], object]:
        def wrapped(path: str) -> object:
            calls[name] += 1
            return decode(path)

        return wrapped

    monkeypatch.setattr(base, "decode_pil", counting("pil", base.decode_pil))
    monkeypatch.setattr(base, "decode_tensor", counting("torchvision", base.decode_tensor))
    batches = {}
    for decoder in ("pil", "torchvision"):
        calls.clear()
        dm = CUB200(root=str(root), image_size=16, classes_per_batch=2, samples_per_class=2, num_workers=0,
                    eval_batch_size=8, verify_images="none", decoder=decoder)
        dm.setup("fit")
        batches[decoder] = next(iter(dm.val_dataloader()))["image"]  # (8, 3, 16, 16)
        assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 16, 16)
        assert calls == {decoder: 8 + 4}, calls
    assert (batches["pil"] - batches["torchvision"]).abs().max() <= TENSOR_MAX
    assert CUB200(root=str(root)).decoder == DEFAULT_DECODER


def test_perf_data_tiny_writes_its_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.json"
    assert main(["perf", "data", "--tiny", "--out", str(out)]) == 0
    assert "workers needed" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {"cpu", "load_average", "versions", "cuda", "transforms", "targets", "sizes"} <= result.keys()
    assert result["cpu"]["model"] and isinstance(result["cpu"]["avx512"], list)
    (size,) = result["sizes"]
    paths = {"pil", "torchvision", "cached+pil", "cached+torchvision"} | ({"nvjpeg"} if torch.cuda.is_available() else set())
    assert set(size["rate"]) == paths and set(size["ratio"]) == paths
    assert all(size["rate"][p][t] > 0 for p in paths for t in result["transforms"])
    assert all(size["ratio"]["pil"][t] == 1.0 for t in result["transforms"])
    assert size["agreement"]["torchvision"]["pixels_max"] <= PIXEL_MAX
    assert size["cache"]["seconds_per_image"] > 0
    assert set(size["workers"]) == {"ViT-S/16 224 px at 3,000 img/s", "ResNet-50 227 px at 2,500 img/s"}
    assert all(n >= 1 for by_path in size["workers"].values() for n in by_path.values())

