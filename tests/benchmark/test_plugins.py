"""A separately installed package adds a method through the entry-point group."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from benchmark.app.cli import main
from benchmark.core import registry
from tests.datamodules import fixtures

PLUGIN = '''
"""A third-party method: MS loss on embeddings scaled by a learnable temperature."""
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

from benchmark.core.contracts import register_method
from methods.base import RetrievalMethod


@register_method("toy_plugin")
class ToyPlugin(RetrievalMethod):
    description = "toy plugin method used by the test suite"

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.loss_fn = losses.MultiSimilarityLoss()

    def training_loss(self, batch):
        emb = F.normalize(self.project(self.encode(batch["image"]).pooled), dim=-1) * self.scale
        return {"loss": self.loss_fn(emb, batch["label"])}
'''


@pytest.fixture()
def installed_plugin(tmp_path: Path):
    site = tmp_path / "site"
    (site / "toy_dml_plugin").mkdir(parents=True)
    (site / "toy_dml_plugin" / "__init__.py").write_text(PLUGIN)
    dist = site / "toy_dml_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-dml-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [benchmark.methods]
        toy_plugin = toy_dml_plugin
    """))
    sys.path.insert(0, str(site))
    yield
    sys.path.remove(str(site))
    registry.METHODS.pop("toy_plugin", None)
    sys.modules.pop("toy_dml_plugin", None)


def test_entry_point_plugin_trains_through_the_cli(installed_plugin, tmp_path: Path, capsys) -> None:
    assert main(["list"]) == 0
    assert "toy_plugin" in capsys.readouterr().out
    root = fixtures.make_cub(tmp_path / "cub", classes=200, per_class=2).parent
    run = tmp_path / "run"
    with pytest.warns(UserWarning):
        code = main([
            "fit", "--method", "toy_plugin", "--data", "cub", "--data.root", str(root),
            "--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--model.scale", "2.0",
            "--data.image_size", "16", "--data.classes_per_batch", "4", "--data.samples_per_class", "2",
            "--data.batches_per_epoch", "2", "--data.num_workers", "0", "--trainer.max_epochs", "1",
            "--logger", "none", "--run_dir", str(run), "--trainer.enable_progress_bar", "false",
            "--trainer.precision", "32-true",
        ])
    assert code == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = (run / "config.yaml").read_text()
    assert "class_path: toy_dml_plugin.ToyPlugin" in config and "scale: 2.0" in config
