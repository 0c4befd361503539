"""Training crops: the DMCAC paper's resize + random crop against the same operations done by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from benchmark.core.contracts import Normalization
from benchmark.core.errors import ConfigError
from datamodules.transforms import AugmentConfig, train_transform

NORM = Normalization(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bilinear")


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _windows(full: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """Every (top, left) at which ``full`` (C, H, W) holds a given size x size window."""
    return [(t, left) for t in range(full.shape[1] - size + 1) for left in range(full.shape[2] - size + 1)]


def test_resize_random_crop_is_a_random_window_of_the_resized_image() -> None:
    image = _image(45, 30)  # landscape: short side 30 -> 20, long side 45 -> 30
    augment = AugmentConfig(crop="resize_random", resize_size=20, hflip=0.0)
    transform = train_transform(16, NORM, augment)
    resized = T.Resize(20, interpolation=T.InterpolationMode.BILINEAR, antialias=True)(image)
    assert resized.size == (30, 20)
    full = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(NORM.mean, NORM.std)])(resized)
    offsets = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(image)
        assert out.shape == (3, 16, 16)
        found = [(t, left) for t, left in _windows(full, 16) if torch.equal(out, full[:, t : t + 16, left : left + 16])]
        assert len(found) == 1, seed  # exactly a window of the resized image: no rescaling of the crop
        offsets.add(found[0])
    assert len(offsets) >= 6  # the position is random, in both directions
    assert len({t for t, _ in offsets}) > 1 and len({left for _, left in offsets}) > 1


def test_resize_random_default_size_and_errors() -> None:
    transform = train_transform(224, NORM, AugmentConfig(crop="resize_random"))
    resize = next(t for t in transform.transforms if isinstance(t, T.Resize))
    assert resize.size == [256]  # 224 / 0.875, the paper's "resize to 256"
    with pytest.raises(ConfigError, match=r"--data.augment.resize_size must be >= the crop, 224; got 200"):
        train_transform(224, NORM, AugmentConfig(crop="resize_random", resize_size=200))
    with pytest.raises(ValueError, match="augment.crop"):
        AugmentConfig(crop="center")  # type: ignore[arg-type]


def test_random_resized_crop_stays_the_default() -> None:
    transform = train_transform(16, NORM, AugmentConfig())
    assert isinstance(transform.transforms[0], T.RandomResizedCrop)


def test_square_eval_resize_squashes_before_the_crop() -> None:
    """Context-Refine's stage 1 (supplement A): resize to 256 x 256, then a central 224 crop. On a wide
    image it keeps the whole width (squashed), where the usual short-side resize crops the sides away."""
    from datamodules.transforms import eval_transform

    image = torch.zeros(3, 100, 300, dtype=torch.uint8)
    image[:, :, :50] = 255  # a white band at the left edge
    norm = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    square = eval_transform(224, norm, 0.875, "square")(image)
    shorter = eval_transform(224, norm, 0.875, "shorter")(image)
    assert square.shape == shorter.shape == (3, 224, 224)
    # 256 x 256 squash: the band is 256 * 50 / 300 = 42.7 px wide, the crop removes 16: ~27 px remain.
    white = (square[0, 112] > 0.5).sum().item()
    assert 25 <= white <= 29
    assert (shorter[0, 112] > 0.5).sum().item() == 0  # 768 x 256 then the central 224: the band is cut away


def test_random_erasing_takes_the_public_intra_batch_settings() -> None:
    """The Intra-Batch code erases 2-40 % of the area and fills it with the constants (0.4914, 0.4822,
    0.4465) on the normalised tensor: every erased pixel holds them, and no rectangle exceeds 40 %."""
    from datamodules.transforms import train_transform

    torch.manual_seed(0)
    fill = (0.4914, 0.4822, 0.4465)
    augment = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, random_erasing=1.0,
                            erasing_scale=(0.02, 0.4), erasing_ratio=(0.3, 3.33), erasing_value=fill)  # fmt: skip
    transform = train_transform(32, Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), augment)
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)  # 1.0 after normalisation: never a fill value
    areas = []
    for _ in range(50):
        out = transform(image)
        erased = (out != 1.0).all(dim=0)  # (32, 32)
        assert erased.any()
        for c, value in enumerate(fill):
            assert torch.allclose(out[c][erased], torch.tensor(value))
        areas.append(erased.float().mean().item())
    assert 0.02 * 0.9 <= min(areas) and max(areas) <= 0.4 + 1e-6 and max(areas) > 0.33  # beyond torchvision's 1/3
    with pytest.raises(ValueError, match="erasing_value"):
        AugmentConfig(erasing_value=(0.1, 0.2))
