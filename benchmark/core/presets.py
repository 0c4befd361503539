"""The named backbones (``--backbone NAME``): which timm model, weights and pooling each name means.

Plain data, kept apart from :mod:`benchmark.nn.backbones` (which builds the models with timm and
torch) so that the commands that only list or check names (``list``, ``suite status``) read them
without importing the deep-learning stack. Plugins add theirs with :func:`register_backbone`
(also importable from ``benchmark.nn.backbones``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# timm's pooling vocabulary (timm.layers.SelectAdaptivePool2d): avgmax averages the two,
# catavgmax concatenates them (2C features); token is the ViT's CLS token.
Pool = Literal["token", "avg", "max", "avgmax", "catavgmax"]


@dataclass(frozen=True)
class BackbonePreset:
    """A named timm model: architecture + weights tag + default pooling."""

    timm_name: str
    pool: Pool
    description: str
    kind: Literal["vit", "cnn"]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_available: bool = True


BACKBONES: dict[str, BackbonePreset] = {}


def register_backbone(name: str, preset: BackbonePreset) -> None:
    """Add a named backbone (plugins may call this)."""
    BACKBONES[name] = preset


register_backbone("vit_small", BackbonePreset(
    "vit_small_patch16_224.augreg_in21k", "token", "ViT-S/16, ImageNet-21k (augreg), CLS token, 384-d", "vit"))
register_backbone("deit_small", BackbonePreset(
    "deit_small_patch16_224.fb_in1k", "token", "DeiT-S/16, ImageNet-1k, CLS token, 384-d", "vit"))
# The distilled DeiT-S (Touvron et al. 2021: a distillation token after the CLS token, trained against a
# RegNetY teacher); the embedding is its CLS token, feats[:, 0], as for every ViT here (timm's own pre-logits
# average the CLS and distillation tokens); num_prefix_tokens = 2 keeps both out of the patch tokens.
register_backbone("deit_small_distilled", BackbonePreset(
    "deit_small_distilled_patch16_224.fb_in1k", "token",
    "DeiT-S/16 distilled (distillation token), ImageNet-1k, CLS token, 384-d", "vit"))
register_backbone("dino_vits16", BackbonePreset(
    "vit_small_patch16_224.dino", "token", "ViT-S/16 self-supervised with DINO, CLS token, 384-d", "vit"))
register_backbone("resnet50", BackbonePreset(
    "resnet50.tv_in1k", "avg", "ResNet-50, ImageNet-1k (torchvision weights), 2048-d", "cnn"))
register_backbone("vit_tiny_test", BackbonePreset(
    "vit_tiny_patch16_224", "token", "tiny random ViT for tests (2 blocks, 32-d, patch 8)", "vit",
    {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}, pretrained_available=False))
register_backbone("resnet_tiny_test", BackbonePreset(
    "resnet18", "avg", "tiny random ResNet for tests (one block per stage, 8..64 channels)", "cnn",
    {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8}, pretrained_available=False))
