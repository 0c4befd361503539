"""Named encoder presets on timm: every encoder gives a global vector and a spatial map.

``Encoder(images)`` returns ``EncoderOutput(pooled (B, C), tokens (B, N, C), hw)``: the
pooled vector is what embedding heads project; the tokens (ViT patch tokens, or a CNN's
last feature map flattened) are what Cross-Image-Attention attends over. timm already
builds, loads and resamples the models; this module only adds names, pooling and the
offline-weights policy (never fall back to random weights silently).
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from benchmark.core.contracts import Normalization
from benchmark.core.errors import ConfigError, UserError
from benchmark.core.presets import BACKBONES, BackbonePreset, Pool, register_backbone
from benchmark.core.validation import require

__all__ = ["BACKBONES", "BackbonePreset", "Pool", "register_backbone", "BackboneConfig", "Encoder", "EncoderOutput",
           "WeightsUnavailableError"]

class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights were requested but cannot be loaded."""


@dataclass
class BackboneConfig:
    """Which encoder to build and how.

    Args:
        name: a registered preset (``python -m benchmark list`` shows them).
        pretrained: load the preset's pretrained weights (from the timm / Hugging Face cache,
            or ``weights``); ``False`` trains from random initialisation.
        weights: a local weights file (.safetensors, .pth, .bin) for the preset's
            architecture; implies ``pretrained``.
        pool: override the preset's global pooling (``token``, ``avg``, ``max``, ``avgmax`` = (avg + max) / 2,
            ``catavgmax`` = [avg, max], as timm names them).
        grad_checkpointing: recompute activations in backward to save memory.
        channels_last: NHWC memory format for CNNs (faster convolutions on GPU).
        drop_path_rate: stochastic depth rate (ViTs).
    """

    name: str = "resnet50"
    pretrained: bool = True
    weights: str | None = None
    pool: Pool | None = None
    grad_checkpointing: bool = False
    channels_last: bool = False
    drop_path_rate: float = 0.0


class EncoderOutput(NamedTuple):
    pooled: torch.Tensor  # (B, C) global feature
    tokens: torch.Tensor  # (B, N, C) spatial features, N = H * W (CNN) or patch count (ViT)
    hw: tuple[int, int]  # spatial grid of the tokens


def _weights_message(preset: BackbonePreset, name: str, err: BaseException) -> str:
    return (
        f"Cannot load pretrained weights '{preset.timm_name}' for backbone '{name}' ({type(err).__name__}: {err}).\n"
        f"  - Online: they download from https://huggingface.co/timm/{preset.timm_name.split('.')[0]}"
        f"{'.' + preset.timm_name.split('.')[1] if '.' in preset.timm_name else ''} into the Hugging Face cache.\n"
        "  - Offline: download that repository's model.safetensors elsewhere and pass "
        "--backbone.weights /path/to/model.safetensors, or pre-fill the cache (HF_HOME).\n"
        "  - To train from random initialisation on purpose, pass --backbone.pretrained false."
    )


def _describe_file(raw: Any) -> str:
    """What a loaded weights file holds, in words, for error messages."""
    if isinstance(raw, dict) and ("pytorch-lightning_version" in raw or "method_name" in raw):
        method = raw.get("method_name")
        return f"a Lightning checkpoint{f' of this benchmark (method {method!r})' if method else ''}"
    if isinstance(raw, dict):
        return f"a dict with {len(raw)} entries, e.g. {', '.join(map(str, list(raw)[:4]))}"
    return f"a {type(raw).__name__}, not a state dict"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights_strict(model: nn.Module, path: Path, backbone: str) -> str:
    """Load a local state dict into a timm ``model``; every key must match. Returns the file's SHA-256.

    timm's pretrained loader drops the classifier and then loads *non-strictly*, so a file
    for another architecture (or a Lightning checkpoint, whose keys carry a prefix) loads
    nothing and leaves the random initialisation, with only a log line. Here only the
    classifier head (absent from an encoder with ``num_classes=0``) may be missing from the
    model; any other unmatched key is an error that says what the file contains. The
    model family's own checkpoint filter (timm's ``checkpoint_filter_fn``, e.g. resampling
    ViT position embeddings to another image size) is applied first, as timm does.
    """
    flag = "--backbone.weights"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # safetensors, pickle and zip errors alike: the file is unreadable
        raise WeightsUnavailableError(
            f"Cannot read the weights file {path} ({flag}): {type(err).__name__}: {err}. It must be a state dict "
            "saved with torch.save or safetensors."
        ) from err
    what = _describe_file(raw)
    if "Lightning checkpoint" in what:
        raise WeightsUnavailableError(
            f"{path} ({flag}) is {what}, not encoder weights. To evaluate or continue that run, pass it as "
            "--ckpt_path. To start an encoder from it, save its encoder entries as a state dict first: "
            "python -c \"import torch; c = torch.load('IN.ckpt', weights_only=False)['state_dict']; "
            "torch.save({k[len('encoder.model.'):]: v for k, v in c.items() if k.startswith('encoder.model.')}, "
            "'encoder.pth')\"."
        )
    if isinstance(raw, dict):
        for key in ("state_dict", "model", "module"):  # common wrappers (timm, torchvision, DDP)
            if key in raw and isinstance(raw[key], dict) and all(isinstance(v, torch.Tensor) for v in raw[key].values()):
                raw = raw[key]
                break
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsUnavailableError(f"{path} ({flag}) is {what}; expected a state dict of tensors for '{backbone}'.")
    state = {str(k).removeprefix("module."): v for k, v in raw.items()}
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    head = model.pretrained_cfg.get("classifier")
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    state = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsUnavailableError(
            f"{path} ({flag}) does not fit backbone '{backbone}': {str(err).splitlines()[-1].strip()} "
            "The file is for another architecture or size."
        ) from err
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(model.state_dict())} entries are missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} entries of the file are unknown to the model (e.g. {', '.join(unexpected[:3])})")
        raise WeightsUnavailableError(
            f"{path} ({flag}) does not fit backbone '{backbone}': {'; '.join(parts)}. The file holds {what}. "
            "Pass weights saved from this architecture, or --backbone.pretrained false to train from random "
            "initialisation on purpose."
        )
    return file_sha256(path)


def patch_size(preset: BackbonePreset) -> int | None:
    """A ViT preset's patch size: its ``patch_size`` option, else the ``patchN`` of its timm name."""
    if "patch_size" in preset.model_kwargs:
        return int(preset.model_kwargs["patch_size"])
    match = re.search(r"patch(\d+)", preset.timm_name)
    return int(match.group(1)) if match else None


def check_patch_grid(name: str, preset: BackbonePreset, image_size: int) -> None:
    """Refuse an image size that is not a multiple of a ViT's patch size.

    The patch embedding is a convolution with stride = patch size: on a 230-px image ViT-S/16 sees
    14 x 14 patches and silently drops the last 6 rows and columns. A benchmark must not change what
    the model sees without saying so, so the user picks the size.
    """
    patch = patch_size(preset)
    if patch and image_size % patch:
        lower, upper = image_size - image_size % patch, image_size - image_size % patch + patch
        raise ConfigError(
            f"Image size {image_size} is not a multiple of the patch size {patch} of backbone '{name}': the patch "
            f"grid would drop the last {image_size % patch} pixel rows and columns of every image. Pass "
            f"--data.image_size {upper}" + (f" or {lower}" if lower else "") + "."
        )


class Encoder(nn.Module):
    """A timm model wrapped to return pooled and spatial features."""

    def __init__(self, config: BackboneConfig, image_size: int = 224) -> None:
        super().__init__()
        if config.name not in BACKBONES:
            raise ConfigError(
                f"Unknown backbone {config.name!r}. Choose one of: {', '.join(sorted(BACKBONES))} "
                "(python -m benchmark list describes them)."
            )
        preset = BACKBONES[config.name]
        self.config, self.preset = config, preset
        kwargs = dict(preset.model_kwargs)
        if preset.kind == "vit":
            check_patch_grid(config.name, preset, image_size)
            kwargs["img_size"] = image_size
        if config.drop_path_rate:
            kwargs["drop_path_rate"] = config.drop_path_rate
        pretrained = config.pretrained or config.weights is not None
        if pretrained and not preset.pretrained_available:
            raise WeightsUnavailableError(
                f"Backbone '{config.name}' has no pretrained weights; pass --backbone.pretrained false."
            )
        self.weights_sha256: str | None = None
        if config.weights is not None:
            path = Path(config.weights).expanduser()
            if not path.is_file():
                raise WeightsUnavailableError(
                    f"Weights file {path} (--backbone.weights) does not exist. Pass the path of a state dict "
                    f"(.safetensors, .pth, .bin) for {preset.timm_name}."
                )
            self.model = timm.create_model(preset.timm_name, pretrained=False, num_classes=0, **kwargs)
            self.weights_sha256 = load_weights_strict(self.model, path, config.name)
        else:
            try:
                self.model = timm.create_model(preset.timm_name, pretrained=pretrained, num_classes=0, **kwargs)
            except (OSError, RuntimeError, ValueError, ConnectionError) as err:
                if not pretrained:
                    raise
                raise WeightsUnavailableError(_weights_message(preset, config.name, err)) from err
        cfg = self.model.pretrained_cfg
        self.normalization = Normalization(
            tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            cfg.get("interpolation", "bicubic"),
        )
        self.pool: Pool = config.pool or preset.pool
        require(not (preset.kind == "cnn" and self.pool == "token"), "model.backbone.pool",
                f"avg, max, avgmax or catavgmax for the CNN {config.name!r}", self.pool)
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        self.feature_dim: int = self.model.num_features * (2 if self.pool == "catavgmax" else 1)
        self.token_dim: int = self.model.num_features
        # The feature map E(I) passes through this no-op module so that analyses can observe it and
        # its gradient with a forward hook (encoder.features.register_forward_hook), untouched model code.
        self.features = nn.Identity()
        if config.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.features(self.model.forward_features(images))  # (B, C, H, W) CNN, (B, P + N, C) ViT
        if feats.ndim == 4:  # CNN: (B, C, H, W)
            h, w = feats.shape[-2:]
            tokens = feats.flatten(2).transpose(1, 2)  # (B, H*W, C)
        else:  # ViT: (B, P + N, C) with P prefix (CLS / register) tokens
            tokens = feats[:, self.num_prefix_tokens :]  # (B, N, C)
            grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
            h, w = grid if grid is not None else (tokens.shape[1], 1)
        if self.pool == "token":
            pooled = feats[:, 0]  # CLS token (after the final norm)
        elif self.pool == "avg":
            pooled = tokens.mean(1)
        elif self.pool == "max":
            pooled = tokens.amax(1)
        elif self.pool == "avgmax":
            pooled = 0.5 * (tokens.mean(1) + tokens.amax(1))  # (B, C)
        else:  # catavgmax
            pooled = torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)  # (B, 2C)
        return EncoderOutput(pooled, tokens, (int(h), int(w)))

