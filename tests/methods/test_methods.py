"""Every registered method: a finite loss whose gradient reaches every trainable parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from benchmark import registry
from benchmark.backbones import BackboneConfig, WeightsUnavailableError
from datamodules.cub import CUB200
from methods.base import RetrievalMethod
from tests.datamodules.fixtures import make_cub

registry.discover()
# Built-in methods only: plugins that other test modules load (tests.benchmark.plugin_methods)
# register into the same registry during collection and are not held to these contracts.
BUILTIN_METHODS = sorted(name for name, cls in registry.METHODS.items() if cls.__module__.startswith("methods."))

# Per-method settings that make a one-step run tiny; methods not listed use the defaults.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {}


class GradientProbe(L.Callback):
    """Records, after the first backward, which trainable parameters got no finite gradient."""

    def __init__(self) -> None:
        self.missing: list[str] | None = None
        self.loss: float | None = None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.missing is None:
            self.missing = [
                name
                for name, p in pl_module.named_parameters()
                if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
            ]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.loss is None:
            self.loss = float(outputs["loss"])


@pytest.fixture(scope="module")
def cub_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


def build(method_name: str, root: Path, backbone: str) -> tuple[RetrievalMethod, CUB200]:
    dm = CUB200(root=str(root), image_size=16, classes_per_batch=4, samples_per_class=2, num_workers=0, eval_batch_size=128)
    with pytest.warns(UserWarning):
        dm.setup("fit")
    kwargs = dict(
        backbone=BackboneConfig(backbone, pretrained=False),
        embedding_dim=8,
        num_classes=dm.num_train_classes,
        image_size=16,
    )
    kwargs.update(TINY_OVERRIDES.get(method_name, {}))
    return registry.get_method(method_name)(**kwargs), dm


@pytest.mark.parametrize("backbone", ["resnet_tiny_test", "vit_tiny_test"])
@pytest.mark.parametrize("method_name", BUILTIN_METHODS)
def test_every_parameter_gets_a_gradient(method_name: str, backbone: str, cub_fixture: Path, tmp_path: Path) -> None:
    model, dm = build(method_name, cub_fixture, backbone)
    probe = GradientProbe()
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[probe], default_root_dir=tmp_path, accelerator="cpu", use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=dm)
    assert probe.loss is not None and torch.isfinite(torch.tensor(probe.loss))
    assert probe.missing == [], f"{method_name}: no gradient for {probe.missing}"


def test_embeddings_are_normalised_and_shaped(cub_fixture: Path) -> None:
    model, _ = build("ms", cub_fixture, "resnet_tiny_test")
    emb = model.embed(torch.randn(5, 3, 16, 16))
    assert emb.shape == (5, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))


def test_offline_pretrained_weights_give_the_documented_message() -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        RetrievalMethod(backbone=BackboneConfig("resnet50", pretrained=True))
    message = str(info.value)
    assert "resnet50.tv_in1k" in message and "--backbone.weights" in message and "--backbone.pretrained false" in message


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    source = RetrievalMethod(backbone=BackboneConfig("resnet_tiny_test", pretrained=False), image_size=16)
    # A tiny preset has no published weights; a local file still works through timm's loader.
    path = tmp_path / "weights.pth"
    torch.save(source.encoder.model.state_dict(), path)
    from benchmark import backbones

    preset = backbones.BACKBONES["resnet_tiny_test"]
    backbones.register_backbone("resnet_tiny_local", backbones.BackbonePreset(
        preset.timm_name, "avg", "test", "cnn", preset.model_kwargs, pretrained_available=True))
    try:
        loaded = RetrievalMethod(backbone=BackboneConfig("resnet_tiny_local", weights=str(path)), image_size=16)
    finally:
        del backbones.BACKBONES["resnet_tiny_local"]
    for (name, a), b in zip(source.encoder.model.state_dict().items(), loaded.encoder.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        RetrievalMethod(backbone=BackboneConfig("resnet50", weights=str(tmp_path / "absent.pth")))


# ---------------------------------------------------------------------------- lr schedules
def test_warmup_and_cosine_factors_follow_the_formula() -> None:
    """Linear warm-up to 1 over W steps, times (1 + cos(pi t / T)) / 2, worked by hand for W = 2, T = 4."""
    from methods.base import _LrFactor

    warm_only = _LrFactor(warmup=4, total=0)
    assert [warm_only(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    both = _LrFactor(warmup=2, total=4)
    expected = [0.5 * 1.0, 1.0 * (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2, 0.0, 0.0]
    assert [both(t) for t in range(6)] == pytest.approx(expected, abs=1e-12)
    assert [_LrFactor(0, 0)(t) for t in range(3)] == [1.0, 1.0, 1.0]


def test_warmup_scales_every_parameter_group_per_step() -> None:
    model = registry.get_method("ms")(
        backbone=BackboneConfig("resnet_tiny_test", pretrained=False), num_classes=4, image_size=32,
        lr=1e-3, head_lr_mult=10.0, warmup_steps=3,
    )  # fmt: skip
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]
    assert sched["interval"] == "step"
    seen = []
    for _ in range(5):
        seen.append([group["lr"] for group in opt.param_groups])
        opt.step()
        sched["scheduler"].step()
    bases = [1e-3, 1e-2]
    for t, lrs in enumerate(seen):
        assert lrs == pytest.approx([b * min(1.0, (t + 1) / 3) for b in bases[: len(lrs)]], rel=1e-12)
    with pytest.raises(ValueError, match="warmup_steps"):
        registry.get_method("ms")(backbone=BackboneConfig("resnet_tiny_test", pretrained=False), scheduler="multistep", warmup_steps=5)


def test_optimizers_come_from_a_table_or_any_torch_optim_class() -> None:
    from benchmark.errors import ConfigError

    def build(**kw: Any):
        model = registry.get_method("ms")(backbone=BackboneConfig("resnet_tiny_test", pretrained=False), **kw)
        opt = model.configure_optimizers()
        return opt["optimizer"] if isinstance(opt, dict) else opt

    sgd = build(optimizer="sgd", lr=0.1)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9  # the table's default
    nadam = build(optimizer="NAdam", optimizer_args={"betas": [0.8, 0.9]}, weight_decay=0.0)
    assert type(nadam) is torch.optim.NAdam and tuple(nadam.defaults["betas"]) == (0.8, 0.9)
    assert build(optimizer="sgd", optimizer_args={"momentum": 0.5, "nesterov": True}).defaults["momentum"] == 0.5
    with pytest.raises(ConfigError, match="Unknown optimizer 'adamx'.*NAdam"):
        build(optimizer="adamx")
    with pytest.raises(ConfigError, match="do not fit AdamW"):
        build(optimizer_args={"momentum": 0.9})
