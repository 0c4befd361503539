"""Encoder presets: shapes, pooling, image-size resampling, and options that must not change results."""

from __future__ import annotations

import pytest
import timm
import torch

from benchmark.nn.backbones import BACKBONES, BackboneConfig, Encoder


def test_presets_resolve_to_timm_models() -> None:
    for name in ("vit_small", "deit_small", "dino_vits16", "resnet50"):
        assert name in BACKBONES
    assert BACKBONES["vit_small"].timm_name == "vit_small_patch16_224.augreg_in21k"
    with pytest.raises(ValueError, match="Unknown backbone 'nope'.*resnet50"):
        Encoder(BackboneConfig("nope", pretrained=False))


@pytest.mark.parametrize(("name", "size", "tokens", "dim"), [("vit_tiny_test", 32, 16, 32), ("resnet_tiny_test", 64, 4, 64)])
def test_pooled_and_spatial_outputs(name: str, size: int, tokens: int, dim: int) -> None:
    enc = Encoder(BackboneConfig(name, pretrained=False), image_size=size).eval()
    out = enc(torch.randn(2, 3, size, size))
    assert out.pooled.shape == (2, dim) and out.tokens.shape == (2, tokens, dim)
    assert out.hw[0] * out.hw[1] == tokens


def test_pooling_options_match_their_definition() -> None:
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    avg = Encoder(BackboneConfig("resnet_tiny_test", pretrained=False, pool="avg"), 64).eval()
    for pool, reference in (
        ("avg", lambda t: t.mean(1)),
        ("max", lambda t: t.amax(1)),
        ("avgmax", lambda t: 0.5 * (t.mean(1) + t.amax(1))),
        ("catavgmax", lambda t: torch.cat([t.mean(1), t.amax(1)], -1)),
    ):
        enc = Encoder(BackboneConfig("resnet_tiny_test", pretrained=False, pool=pool), 64).eval()
        enc.load_state_dict(avg.state_dict())
        out = enc(x)
        torch.testing.assert_close(out.pooled, reference(out.tokens))
        # the same names mean the same pooling as timm's (a peer, on the CNN's feature map)
        timm_pool = timm.layers.SelectAdaptivePool2d(pool_type=pool, flatten=True)
        torch.testing.assert_close(out.pooled, timm_pool(enc.model.forward_features(x)))
    vit = Encoder(BackboneConfig("vit_tiny_test", pretrained=False), 32).eval()
    feats = vit.model.forward_features(torch.randn(1, 3, 32, 32))
    assert vit.num_prefix_tokens == 1 and feats.shape[1] == 17
    with pytest.raises(ValueError, match="CNN"):
        Encoder(BackboneConfig("resnet_tiny_test", pretrained=False, pool="token"))


def _grads(enc: Encoder, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    enc.zero_grad()
    out = enc(x).pooled
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in enc.parameters()]


def test_gradient_checkpointing_and_channels_last_do_not_change_results() -> None:
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(0)
    plain = Encoder(BackboneConfig("vit_tiny_test", pretrained=False), 32).train()
    ckpt = Encoder(BackboneConfig("vit_tiny_test", pretrained=False, grad_checkpointing=True), 32).train()
    ckpt.load_state_dict(plain.state_dict())
    (a, ga), (b, gb) = _grads(plain, x), _grads(ckpt, x)
    torch.testing.assert_close(a, b)
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)

    x = torch.randn(3, 3, 64, 64)
    cnn = Encoder(BackboneConfig("resnet_tiny_test", pretrained=False), 64).eval()
    cl = Encoder(BackboneConfig("resnet_tiny_test", pretrained=False, channels_last=True), 64).eval()
    cl.load_state_dict(cnn.state_dict())
    torch.testing.assert_close(cnn(x).pooled, cl(x).pooled, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_stays_within_tolerance() -> None:
    enc = Encoder(BackboneConfig("vit_tiny_test", pretrained=False), 32).eval()
    x = torch.randn(4, 3, 32, 32)
    ref = torch.nn.functional.normalize(enc(x).pooled, dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.nn.functional.normalize(enc(x).pooled.float(), dim=-1)
    assert (ref * low).sum(-1).min() > 0.99  # cosine similarity of the embeddings


def test_vit_position_embeddings_follow_image_size() -> None:
    small = Encoder(BackboneConfig("vit_tiny_test", pretrained=False), 16)
    large = Encoder(BackboneConfig("vit_tiny_test", pretrained=False), 48)
    assert small.model.pos_embed.shape[1] == 1 + 4 and large.model.pos_embed.shape[1] == 1 + 36


# ---------------------------------------------------------------------------- local weights files
@pytest.fixture()
def local_presets():
    """Copies of the tiny presets that accept weights (the test presets have none published)."""
    from benchmark.nn import backbones
    for name in ("resnet_tiny_test", "vit_tiny_test"):
        p = BACKBONES[name]
        backbones.register_backbone(f"{name}_local", backbones.BackbonePreset(
            p.timm_name, p.pool, "test", p.kind, p.model_kwargs, pretrained_available=True))
    yield
    for name in ("resnet_tiny_test_local", "vit_tiny_test_local"):
        del BACKBONES[name]


def test_a_fitting_state_dict_loads_exactly_and_is_hashed(local_presets, tmp_path) -> None:
    import hashlib

    source = Encoder(BackboneConfig("vit_tiny_test", pretrained=False), image_size=32)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.model.state_dict().items()}}, path)  # wrapped, DDP keys
    same = Encoder(BackboneConfig("vit_tiny_test_local", weights=str(path)), image_size=32)
    for (name, a), b in zip(source.model.state_dict().items(), same.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert same.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # At another image size timm's filter resamples the position embeddings (4x4 -> 6x6 patches).
    larger = Encoder(BackboneConfig("vit_tiny_test_local", weights=str(path)), image_size=48)
    assert larger.model.pos_embed.shape[1] == 1 + 36
    torch.testing.assert_close(larger.model.blocks[0].attn.qkv.weight, source.model.blocks[0].attn.qkv.weight)


def _bad_weights(tmp_path, kind: str):
    path = tmp_path / f"{kind}.pth"
    resnet = Encoder(BackboneConfig("resnet_tiny_test", pretrained=False), image_size=32).model.state_dict()
    if kind == "other_keys":
        torch.save({f"backbone.{k}": v for k, v in resnet.items()}, path)
    elif kind == "lightning":
        torch.save({"pytorch-lightning_version": "2.6", "method_name": "ms",
                    "state_dict": {f"encoder.model.{k}": v for k, v in resnet.items()}}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "other_architecture":
        vit = Encoder(BackboneConfig("vit_tiny_test", pretrained=False), image_size=32).model.state_dict()
        torch.save(vit, path)
    elif kind == "other_shapes":
        torch.save({k: torch.zeros(*(2 * s for s in v.shape)) if v.ndim else v for k, v in resnet.items()}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("other_keys", r"entries are missing.*entries of the file are unknown.*backbone\.conv1"),
        ("lightning", r"Lightning checkpoint of this benchmark \(method 'ms'\).*--ckpt_path.*encoder\.model\."),
        ("list", r"is a list, not a state dict"),
        ("text", r"Cannot read the weights file"),
        ("other_architecture", r"does not fit backbone 'resnet_tiny_test_local'"),
        ("other_shapes", r"does not fit backbone 'resnet_tiny_test_local'.*size"),
    ],
)
def test_weights_that_do_not_fit_fail_instead_of_training_from_random(local_presets, tmp_path, kind, message) -> None:
    from benchmark.nn.backbones import WeightsUnavailableError

    path = _bad_weights(tmp_path, kind)
    with pytest.raises(WeightsUnavailableError, match=message) as info:
        Encoder(BackboneConfig("resnet_tiny_test_local", weights=str(path)), image_size=32)
    assert str(path) in str(info.value)
