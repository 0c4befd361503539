"""What a W&B user sees of a run (offline mode, through the real CLI): flat config keys, group and
job type, the best value in the summary, the results as an artifact, and W&B's own credentials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import wandb
from wandb.sdk.wandb_run import Run

from benchmark.app.cli import main
from benchmark.core.results import best_validation
from benchmark.engine.wandb_logger import flatten, wandb_logged_in
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
    seen: dict[str, Any] = {"artifacts": [], "logged": []}
    finish, log_artifact, log = Run.finish, Run.log_artifact, Run.log
    run = tmp_path / "run"

    def recording_finish(self: Run, *args: Any, **kwargs: Any) -> Any:
        seen.update(config=dict(self.config), summary=dict(self.summary), group=self.group, job_type=self.job_type)
        return finish(self, *args, **kwargs)

    def recording_log_artifact(self: Run, artifact: Any, *args: Any, **kwargs: Any) -> Any:
        # What status.json says when the snapshot is taken.
        status = json.loads((run / "status.json").read_text())["status"]
        seen["artifacts"].append((artifact.type, sorted(artifact.manifest.entries), status))
        return log_artifact(self, artifact, *args, **kwargs)

    def recording_log(self: Run, data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen["logged"].append(dict(data))
        return log(self, data, *args, **kwargs)

    monkeypatch.setattr(Run, "finish", recording_finish)
    monkeypatch.setattr(Run, "log_artifact", recording_log_artifact)
    monkeypatch.setattr(Run, "log", recording_log)
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
    # Every field the leaderboard groups by, with the data as the method used it (#25).
    assert config["sampler"] == "balanced" and config["config.model.lr"] == 1e-4 and config["config.model.beta"] == 40.0
    assert config["comparison_key"] and config["steps_trained"] == 4 and config["short"] == ""
    assert config["comparison_group"] == f"{config['comparison_key']}-4steps"
    # "Best" is the best validation after training started (the figures' definition), labelled test-selected.
    val = json.loads((run / "metrics_val.json").read_text())
    best = best_validation(val["evaluations"], "R@1")
    assert summary["best/val/R@1"] == best["metrics"]["R@1"] and summary["best/global_step"] == best["global_step"] > 0
    assert summary["best/epochs_trained"] == best["epochs_trained"] and "optimistic" in summary["best/selected_on"]
    assert "test/R@1" in summary
    # The epochs' x-axis and the training loss, though an epoch (2 steps) is shorter than log_every_n_steps (10).
    assert [row["val/epochs_trained"] for row in seen["logged"] if "val/epochs_trained" in row] == [0.0, 1.0, 2.0]
    assert sum("train/loss" in row for row in seen["logged"]) == 2
    results = [(files, status) for kind, files, status in seen["artifacts"] if kind == "results"]
    assert len(results) == 1 and {"metrics_test.json", "metrics_val.json", "status.json"} <= set(results[0][0])
    assert results[0][1] == "completed"  # the snapshot is taken once the run has its final state


def test_flatten_keeps_scalars_and_names_nested_fields() -> None:
    from benchmark.nn.backbones import BackboneConfig

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


def test_the_wandb_config_describes_the_data_as_the_method_uses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DMCAC asks for shuffled batches of its query set: W&B's config said "balanced" (the datamodule's
    default, recorded before the method's request was applied) while the run used "shuffle" (#25)."""
    import warnings

    from benchmark.app.cli import build_cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = build_cli("fit", ["--method", "dmcac", "--backbone", "vit_tiny_test", "--backbone.pretrained", "false",
                                "--data.image_size", "16", "--data.num_workers", "0", "--logger", "wandb",
                                "--run_dir", str(tmp_path / "run")], run=False)  # fmt: skip
    config = cli.trainer.logger._wandb_init["config"]
    assert cli.model.sampler == "shuffle" and config["sampler"] == "shuffle"
    assert config["comparison_key"] and config["config.model.loss.beta_frob"] == cli.model.loss_config.beta_frob


def test_a_run_prints_no_library_advertisement_or_deprecation(cub_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Lightning's litlogger tip and W&B's "anonymous setting has no effect" warning (caused by Lightning
    passing anonymous=None) are silenced where they arise, not by hiding Lightning's or W&B's output (#27)."""
    import logging

    monkeypatch.setenv("WANDB_MODE", "offline")
    with caplog.at_level(logging.INFO):
        assert main(["fit", *_args(cub_root), "--data.batches_per_epoch", "2", "--trainer.max_epochs", "1",
                     "--logger", "wandb", "--run_dir", str(tmp_path / "run")]) == 0  # fmt: skip
    wandb.finish()
    out = capfd.readouterr()
    assert "anonymous" not in out.err + out.out and "litlogger" not in out.err + out.out + caplog.text
    assert "precision" in out.err  # the run's own messages still come through
