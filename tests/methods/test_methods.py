"""Every registered method: a finite loss whose gradient reaches every trainable parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from benchmark.core import registry
from benchmark.nn.backbones import BackboneConfig, WeightsUnavailableError
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
    from benchmark.nn import backbones
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
    from benchmark.core.errors import ConfigError

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


def official_intra_batch_lr(epoch_1based: int, base: float) -> float:
    """The public Intra-Batch trainer (trainer.py): base lr, then lr = base / 10 set at epoch 31 and
    set again (to base / 10, not base / 100) at epoch 51."""
    return base if epoch_1based < 31 else base / 10


def test_reload_best_lr_matches_the_official_trainer_for_70_epochs() -> None:
    model = registry.get_method("ms")(
        backbone=BackboneConfig("resnet_tiny_test", pretrained=False), num_classes=4, image_size=32,
        lr=2e-4, scheduler="reload_best", lr_milestones=[30, 50], lr_gamma=0.1,
    )  # fmt: skip
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]
    assert sched["interval"] == "epoch"
    seen = []
    for _ in range(70):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    expected = [official_intra_batch_lr(e, 2e-4) for e in range(1, 71)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[51:] != pytest.approx([2e-6] * 19)  # the multistep reading (lr / 100 from epoch 52) is not it
    with pytest.raises(ValueError, match="lr_milestones"):
        registry.get_method("ms")(backbone=BackboneConfig("resnet_tiny_test", pretrained=False), scheduler="reload_best")


class ReloadProbe(L.Callback):
    """Records every validation's metric and weights, and the weights and lr each epoch trains from."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.validations: list[tuple[int, float, dict[str, torch.Tensor]]] = []
        self.starts: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    @staticmethod
    def _state(module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # runs before the module's own hook: the evaluated weights
            value = float(trainer.callback_metrics[self.metric])
            self.validations.append((trainer.current_epoch, value, self._state(pl_module)))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:  # after every on_train_epoch_start hook: the weights the epoch starts from
            self.starts[trainer.current_epoch] = (trainer.optimizers[0].param_groups[0]["lr"], self._state(pl_module))


def test_reload_best_continues_from_the_best_validation_through_a_trainer(cub_fixture: Path, tmp_path: Path) -> None:
    from benchmark.engine.evaluation import RetrievalEvaluator

    dm = CUB200(root=str(cub_fixture), image_size=16, classes_per_batch=4, samples_per_class=2, num_workers=0,
                batches_per_epoch=3, eval_batch_size=128)  # fmt: skip
    model = registry.get_method("ms")(
        backbone=BackboneConfig("resnet_tiny_test", pretrained=False), embedding_dim=8, image_size=16, lr=3e-2,
        scheduler="reload_best", lr_milestones=[2, 3], lr_gamma=0.1,
    )  # fmt: skip
    probe = ReloadProbe(model.selection_metric)
    trainer = L.Trainer(
        max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
        callbacks=[RetrievalEvaluator(), probe], default_root_dir=tmp_path, accelerator="cpu",
        use_distributed_sampler=False,
    )  # fmt: skip
    with pytest.warns(UserWarning):
        trainer.fit(model, datamodule=dm)
    assert [e for e, _, _ in probe.validations] == [0, 1, 2, 3]
    reloaded = 0
    for milestone in (2, 3):
        before = [v for v in probe.validations if v[0] < milestone]
        best = max(before, key=lambda v: v[1])  # the first of equal values, as the schedule keeps it
        lr, state = probe.starts[milestone]
        assert lr == pytest.approx(3e-3, rel=1e-12)
        for name, tensor in best[2].items():
            assert torch.equal(state[name], tensor), (milestone, name)
        last = probe.validations[milestone - 1]  # what training would have continued from without reloading
        reloaded += best is not last and any(not torch.equal(state[k], last[2][k]) for k in last[2])
    assert reloaded >= 1  # at least one milestone went back to earlier weights (the fixture's R@1 ties at 1.0)
    assert [probe.starts[e][0] for e in (0, 1)] == pytest.approx([3e-2, 3e-2])


def test_reload_best_survives_a_resume(cub_fixture: Path, tmp_path: Path) -> None:
    """Fit 2 epochs, stop, resume from last.ckpt: the milestone at epoch 2 reloads the best weights of
    the first run (they travel in the checkpoint), not the weights the resumed run started from."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from benchmark.engine.evaluation import RetrievalEvaluator

    def run(max_epochs: int, ckpt_path: str | None) -> ReloadProbe:
        dm = CUB200(root=str(cub_fixture), image_size=16, classes_per_batch=4, samples_per_class=2, num_workers=0,
                    batches_per_epoch=3, eval_batch_size=128)  # fmt: skip
        torch.manual_seed(0)
        model = registry.get_method("ms")(
            backbone=BackboneConfig("resnet_tiny_test", pretrained=False), embedding_dim=8, image_size=16, lr=3e-2,
            scheduler="reload_best", lr_milestones=[2], lr_gamma=0.1,
        )  # fmt: skip
        probe = ReloadProbe(model.selection_metric)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
        trainer = L.Trainer(
            max_epochs=max_epochs, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
            callbacks=[RetrievalEvaluator(), probe, checkpoints], default_root_dir=tmp_path, accelerator="cpu",
            use_distributed_sampler=False,
        )  # fmt: skip
        with pytest.warns(UserWarning):
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=False)  # hparams hold dataclasses
        return probe

    first = run(2, None)
    best = max(first.validations, key=lambda v: v[1])
    assert best is not first.validations[-1]  # the fixture's R@1 ties: the first epoch stays the best
    resumed = run(3, str(tmp_path / "ckpt" / "last.ckpt"))
    lr, state = resumed.starts[2]
    assert lr == pytest.approx(3e-3, rel=1e-12)
    for name, tensor in best[2].items():
        assert torch.equal(state[name], tensor), name
