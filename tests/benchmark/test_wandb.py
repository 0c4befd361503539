"""What a W&B user sees of a run (offline mode, through the real CLI): flat config keys, group and
job type, the best value in the summary, the results as an artifact, and W&B's own credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import wandb
from wandb.sdk.wandb_run import Run

from benchmark.cli import main
from benchmark.wandb_logger import flatten, wandb_logged_in
from tests.benchmark.test_run_lifecycle import _args
from tests.datamodules import fixtures


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_an_offline_run_has_flat_config_group_summary_and_artifacts(
    cub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    seen: dict[str, Any] = {"artifacts": []}
    finish, log_artifact = Run.finish, Run.log_artifact

    def recording_finish(self: Run, *args: Any, **kwargs: Any) -> Any:
        seen.update(config=dict(self.config), summary=dict(self.summary), group=self.group, job_type=self.job_type)
        return finish(self, *args, **kwargs)

    def recording_log_artifact(self: Run, artifact: Any, *args: Any, **kwargs: Any) -> Any:
        seen["artifacts"].append((artifact.type, sorted(artifact.manifest.entries)))
        return log_artifact(self, artifact, *args, **kwargs)

    monkeypatch.setattr(Run, "finish", recording_finish)
    monkeypatch.setattr(Run, "log_artifact", recording_log_artifact)
    run = tmp_path / "run"
    assert main(["fit", *_args(cub_root), "--data.batches_per_epoch", "2", "--trainer.max_epochs", "2",
                 "--logger", "wandb", "--run_dir", str(run)]) == 0  # fmt: skip
    if "config" not in seen:  # the CLI leaves finishing to the process exit: finish here
        wandb.finish()
    config, summary = seen["config"], seen["summary"]
    # The run's own keys stay flat and typed; Lightning's init arguments live under hparams/.
    assert config["method"] == "ms" and config["dataset"] == "cub" and config["backbone"] == "resnet_tiny_test"
    assert config["embedding_dim"] == 8 and config["seed"] == 0 and config["protocol"] == "paper"
    assert config["classes_per_batch"] == 4 and config["samples_per_class"] == 2 and config["max_epochs"] == 2
    assert config["hparams/backbone.name"] == "resnet_tiny_test" and config["hparams/embedding_dim"] == 8
    assert config["version.torch"] and config["augment.crop"] == "random_resized"
    assert not any(k.startswith("_") or "/_" in k for k in config)
    assert seen["group"] == "cub/ms/resnet_tiny_test" and seen["job_type"] == "fit"
    assert "best/val/R@1" in summary and 0.0 <= summary["best/val/R@1"] <= 1.0
    assert "test/R@1" in summary
    results = [files for kind, files in seen["artifacts"] if kind == "results"]
    assert results and {"metrics_test.json", "metrics_val.json"} <= set(results[0])


def test_flatten_keeps_scalars_and_names_nested_fields() -> None:
    from benchmark.backbones import BackboneConfig

    flat = flatten({"backbone": BackboneConfig("x", pretrained=False), "ks": (1, 2), "_instantiator": "y", "n": None})
    assert flat["backbone.name"] == "x" and flat["backbone.pretrained"] is False
    assert flat["ks"] == [1, 2] and flat["n"] is None and "_instantiator" not in flat


def test_credentials_for_a_self_hosted_server_count_as_logged_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine wandb.example.com\n  login user\n  password " + "a" * 40 + "\n")
    netrc.chmod(0o600)
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wandb_logged_in()  # the old check looked for api.wandb.ai in ~/.netrc and went offline
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    assert not wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert wandb_logged_in()
