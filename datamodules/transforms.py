"""Image transforms built from a backbone's timm data configuration.

Normalisation (mean, std) and interpolation come from the encoder (what its weights were
trained with); sizes and augmentation strength come from the datamodule. Methods that need
several augmented views per image (DMCAC) ask for them with a :class:`ViewRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2.functional import to_pil_image

from benchmark.core.contracts import Normalization, ViewRequest
from benchmark.core.validation import check_choice, require

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


CropMode = Literal["random_resized", "resize_random"]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: a random crop + horizontal flip (+ optional extras).

    Args:
        crop: ``random_resized`` (RandomResizedCrop: a random area ``crop_scale`` and aspect
            ``crop_ratio`` of the image, resized to the training size; most DML recipes) or
            ``resize_random`` (resize the short side to ``resize_size``, then a random
            ``image_size`` square crop, at full resolution: DMCAC's "resize to 256, random
            224 crop", the classic ImageNet recipe).
        crop_scale: area range of ``random_resized``.
        crop_ratio: aspect-ratio range of ``random_resized``.
        resize_size: short side before the ``resize_random`` crop; ``None`` = ``image_size /
            0.875`` (256 for 224).
        hflip: probability of a horizontal flip.
        color_jitter: brightness / contrast / saturation jitter strength (0: none).
        random_erasing: probability of RandomErasing on the normalised tensor (0: none).
        erasing_scale: area range of the erased rectangle (torchvision's default 2-33 %; the
            Intra-Batch code erases 2-40 %).
        erasing_ratio: aspect-ratio range of the erased rectangle.
        erasing_value: what the rectangle is filled with, on the normalised tensor: one value or one
            per channel (the Intra-Batch code writes the CIFAR means 0.4914, 0.4822, 0.4465).
    """

    crop: CropMode = "random_resized"
    crop_scale: tuple[float, float] = (0.16, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize_size: int | None = None
    hflip: float = 0.5
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)
    erasing_value: tuple[float, ...] = (0.0,)

    def __post_init__(self) -> None:
        require(len(self.erasing_value) in (1, 3), "data.augment.erasing_value", "one value or three (per channel)",
                self.erasing_value)
        require(0 < self.erasing_scale[0] <= self.erasing_scale[1] < 1, "data.augment.erasing_scale",
                "0 < low <= high < 1", self.erasing_scale)
        check_choice("data.augment.crop", self.crop, ("random_resized", "resize_random"))
        require(self.resize_size is None or self.resize_size >= 1, "data.augment.resize_size", ">= 1 or null",
                self.resize_size)


def training_crop(image_size: int, augment: AugmentConfig, interpolation: T.InterpolationMode) -> list:
    """The random crop of :class:`AugmentConfig` as transforms (before flip and colour)."""
    if augment.crop == "resize_random":
        resize = augment.resize_size or int(round(image_size / 0.875))
        require(resize >= image_size, "data.augment.resize_size", f">= the crop, {image_size}", resize)
        return [T.Resize(resize, interpolation=interpolation, antialias=True), T.RandomCrop(image_size)]
    return [
        T.RandomResizedCrop(
            image_size, scale=augment.crop_scale, ratio=augment.crop_ratio, interpolation=interpolation, antialias=True
        )
    ]


def _to_tensor(norm: Normalization) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(norm.mean, norm.std)]


EvalResize = Literal["shorter", "square"]


def eval_transform(image_size: int, norm: Normalization, crop_pct: float = 0.875, resize: EvalResize = "shorter") -> T.Compose:
    """Resize to ``s = image_size / crop_pct``, then center-crop ``image_size``.

    ``shorter`` (the usual DML protocol) resizes the short side to ``s`` and keeps the aspect ratio;
    ``square`` squashes the image to ``s x s`` (Context-Refine's stage-1 embeddings: "resized to
    256 x 256 and then a central crop of 224 x 224", supplement A).
    """
    interp = _INTERPOLATION[norm.interpolation]
    size = max(image_size, int(round(image_size / crop_pct)))
    resize_to = (size, size) if resize == "square" else size
    return T.Compose([T.Resize(resize_to, interpolation=interp, antialias=True), T.CenterCrop(image_size),
                      *_to_tensor(norm)])  # fmt: skip


class MultiView:
    """One shared training crop, then ``num_views`` (optionally RandAugment-ed) views.

    Accepts a PIL image or a (3, H, W) uint8 tensor. torchvision's affine ops on tensors
    (RandAugment's rotate / shear / translate) know only nearest and bilinear, so with any
    other interpolation a tensor crop is turned into a PIL image before RandAugment: both
    decoders then augment alike.
    """

    def __init__(self, crop: T.Transform, finish: T.Compose, request: ViewRequest, interpolation) -> None:
        self.crop, self.finish, self.request = crop, finish, request
        self.augment_on_pil = interpolation not in (T.InterpolationMode.NEAREST, T.InterpolationMode.BILINEAR)
        self.augment = (
            T.RandAugment(request.randaugment_ops, request.randaugment_magnitude, interpolation=interpolation)
            if request.augment == "randaugment"
            else None
        )
        if request.augment not in (None, "randaugment"):
            raise ValueError(f"Unknown view augmentation {request.augment!r}; choose None or 'randaugment'.")

    def __call__(self, image) -> torch.Tensor:
        crop = self.crop(image)
        if self.augment is not None and self.augment_on_pil and isinstance(crop, torch.Tensor):
            crop = to_pil_image(crop)  # (3, S, S) uint8 -> PIL
        views = []
        for v in range(self.request.num_views):
            view = crop
            if self.augment is not None and not (v == 0 and self.request.keep_original):
                view = self.augment(crop)
            views.append(self.finish(view))
        return torch.stack(views)  # (V, C, H, W)


def train_transform(
    image_size: int,
    norm: Normalization,
    augment: AugmentConfig = AugmentConfig(),
    views: ViewRequest = ViewRequest(),
):
    """Random crop (:class:`AugmentConfig`) + flip (+ jitter, erasing), optionally as several views."""
    interp = _INTERPOLATION[norm.interpolation]
    crop_ops: list = training_crop(image_size, augment, interp)
    if augment.hflip > 0:
        crop_ops.append(T.RandomHorizontalFlip(augment.hflip))
    if augment.color_jitter > 0:
        j = augment.color_jitter
        crop_ops.append(T.ColorJitter(j, j, j))
    finish_ops = _to_tensor(norm)
    if augment.random_erasing > 0:
        value = augment.erasing_value[0] if len(augment.erasing_value) == 1 else list(augment.erasing_value)
        finish_ops.append(T.RandomErasing(p=augment.random_erasing, scale=augment.erasing_scale,
                                          ratio=augment.erasing_ratio, value=value))  # fmt: skip
    if views.num_views == 1 and views.augment is None:
        return T.Compose(crop_ops + finish_ops)
    return MultiView(T.Compose(crop_ops), T.Compose(finish_ops), views, interp)
