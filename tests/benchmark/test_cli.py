"""The command line: names, recipes, a full fit through main(), resuming, every recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmark.app.cli import build_cli, main
from benchmark.core.defaults import CONFIG_DIR
from tests.datamodules import fixtures

# float32: tiny fits give the same numbers on every CPU (``auto`` is bf16 on CPUs with native bf16).
TINY = ["--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--model.embedding_dim", "8",
        "--trainer.precision", "32-true"]  # fmt: skip


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


def _fit_args(cub_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", "--method", "ms", "--data", "cub", "--data.root", str(cub_root), "--recipe", "none", *TINY,
        "--data.image_size", "16", "--data.classes_per_batch", "4", "--data.samples_per_class", "2",
        "--data.batches_per_epoch", "3", "--data.num_workers", "0", "--data.eval_batch_size", "128",
        "--logger", "csv", "--run_dir", str(run_dir), "--trainer.enable_progress_bar", "false", *extra,
    ]


def test_list_shows_methods_backbones_and_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ms", "proxy_anchor", "margin", "vit_small", "resnet50", "cub", "cars", "sop", "inshop"):
        assert name in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "--method", "nope"], "Unknown method 'nope'. Registered methods: "),
        (["fit", "--data", "imagenet"], "Unknown dataset 'imagenet'. Registered datasets: "),
        (["fit", "--logger", "mlflow"], "Unknown logger 'mlflow'. Choose one of: wandb"),
        (["frobnicate"], "Unknown command 'frobnicate'"),
        (["perf", "nothing"], "Unknown perf command 'nothing'. Registered: "),
        (["analyze", "nothing"], "Unknown analyze command 'nothing'. Registered: "),
    ],
)
def test_unknown_names_fail_with_choices(args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_unknown_option_fails_without_traceback(cub_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--method", "ms", "--data", "cub", "--data.root", str(cub_root), "--model.no_such_option", "1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_option" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_evaluator_options_come_from_the_recipe_and_the_command_line(cub_root: Path, tmp_path: Path) -> None:
    """An `evaluation:` section of a recipe (here a --config file) and --evaluation.* both reach the callback."""
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("evaluation:\n  recall_ks: [1, 3]\n  map_at_k: 5\n")
    run = tmp_path / "run"
    args = _fit_args(cub_root, run, "--trainer.max_steps", "1", "--config", str(recipe), "--evaluation.nmi", "false")
    assert main(args) == 0
    metrics = json.loads((run / "metrics_test.json").read_text())["evaluations"][-1]["metrics"]
    assert {"R@1", "R@3", "mAP@5"} <= set(metrics) and "R@2" not in metrics and "R@4" not in metrics
    assert "NMI" not in metrics and "mAP@1000" not in metrics
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["evaluation"]["recall_ks"] == [1, 3] and saved["evaluation"]["nmi"] is False


@pytest.mark.slow  # ~20 s; resuming is also covered by test_run_lifecycle.py (6 s)
def test_fit_evaluates_before_and_after_and_resumes(cub_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(_fit_args(cub_root, run, "--trainer.max_epochs", "2")) == 0
    assert (run / "config.yaml").is_file()
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and list((run / "checkpoints").glob("best-*.ckpt"))
    import json

    val = json.loads((run / "metrics_val.json").read_text())
    test = json.loads((run / "metrics_test.json").read_text())
    assert len(val["evaluations"]) == 3  # before training + after each of the 2 epochs
    assert val["evaluations"][0]["global_step"] == 0
    assert "R@1" in test["evaluations"][-1]["metrics"]
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6
    steps_before = float(state["optimizer_states"][0]["state"][0]["step"])

    resumed = tmp_path / "resumed"
    assert main(_fit_args(cub_root, resumed, "--trainer.max_epochs", "3", "--ckpt_path", str(last))) == 0
    state = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 9 and state["epoch"] == 2
    assert float(state["optimizer_states"][0]["state"][0]["step"]) == steps_before + 3


def _roots(tmp: Path) -> dict[str, Path]:
    """Fixtures just large enough for every recipe's training batch: the CLI checks the
    batch settings against the training split before it starts (the largest are 64 classes
    per batch for Context-Refine, 256 shuffled images for DMCAC on CUB/Cars/In-Shop)."""
    return {
        "cub": fixtures.make_cub(tmp / "cub", classes=200, per_class=3).parent,  # train: 100 classes, 300 images
        "cars": fixtures.make_cars(tmp / "cars", per_class=3),  # train: 98 classes, 294 images
        "sop": fixtures.make_sop(tmp / "sop", train_classes=64),  # train: 64 classes, 128 images
        "inshop": fixtures.make_inshop(tmp / "inshop", train_items=64, train_per_item=4),  # 64 items, 256 images
    }


# suites: test_suites.py; perf: the perf gpu checks (test_perf_gpu.py)
RECIPES = sorted(p for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name not in ("suites", "perf"))


@pytest.fixture(scope="module")
def dataset_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _roots(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_every_recipe_parses_and_instantiates(recipe: Path, dataset_roots: dict[str, Path], tmp_path: Path) -> None:
    dataset = recipe.stem
    extra = ["--data.root", str(dataset_roots[dataset])] if dataset in dataset_roots else []
    backbone = "vit_tiny_test" if "vit" in recipe.read_text() or "deit" in recipe.read_text() else "resnet_tiny_test"
    with pytest.warns(UserWarning, match="differs from the published") if extra else _nullcontext():
        cli = build_cli(
            None,
            ["--config", str(recipe), "--model.backbone.name", backbone, "--model.backbone.pretrained", "false",
             "--data.num_workers", "0", *extra, "--logger", "none", "--run_dir", str(tmp_path)],
            run=False,
        )
    assert cli.model.num_classes == cli.datamodule.num_train_classes
    assert cli.trainer is not None


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_trainer_logger_and_default_root_dir_given_by_the_user_are_honoured(cub_root: Path, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    root = tmp_path / "mine"
    args = _fit_args(cub_root, tmp_path / "unused", "--trainer.max_steps", "1")
    args = args[: args.index("--run_dir")] + args[args.index("--run_dir") + 2 :]  # no --run_dir
    args = [a for a in args if a not in ("--logger", "csv")]
    cli = build_cli(None, [*args[1:], "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                           "--trainer.logger.save_dir", str(tmp_path / "csv"), "--trainer.default_root_dir", str(root)],
                    run=False)
    assert type(cli.trainer.logger) is CSVLogger and cli.trainer.logger.save_dir == str(tmp_path / "csv")
    assert Path(cli.trainer.default_root_dir) == root and cli.run_dir == root


def test_perf_commands_are_registered_by_their_owners_and_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["perf", "--help"]) == 0
    listing = capsys.readouterr().out
    for name, owner in (("eval", "benchmark.app.perf.eval"), ("reciprocal", "companions.intra_batch_perf"),
                        ("synthetic_baseline", "companions.synthetic_perf")):
        assert name in listing and f"[{owner}]" in listing
    assert main(["perf", "--plugin", "tests.benchmark.plugin_methods", "plugin_echo", "a", "b"]) == 0
    assert "echo a b" in capsys.readouterr().out
    assert main(["perf", "--help"]) == 0
    assert "[tests.benchmark.plugin_methods]" in capsys.readouterr().out
    assert main(["analyze", "--help"]) == 0
    assert "cross_image_attention" in capsys.readouterr().out


def test_fit_help_lists_the_short_flags_and_the_lightning_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--method NAME", "--data NAME", "--backbone NAME", "--recipe", "--run_dir", "--plugin", "--logger",
                 "--evaluation.*", "--print_config", "--trainer.max_epochs", "--evaluation.recall_ks"):
        assert flag in out, flag


@pytest.mark.filterwarnings("ignore:.*differs from the published.*")
def test_checkpoint_options_come_from_the_command_line(cub_root: Path, tmp_path: Path) -> None:
    none_kept = tmp_path / "none"
    assert main(_fit_args(cub_root, none_kept, "--trainer.max_epochs", "2", "--checkpoint.save_top_k", "0",
                          "--checkpoint.last_every_n_epochs", "2")) == 0
    assert sorted(p.name for p in (none_kept / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(none_kept / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 1
    two_best = tmp_path / "two"
    assert main(_fit_args(cub_root, two_best, "--trainer.max_epochs", "3", "--checkpoint.save_top_k", "2",
                          "--checkpoint.monitor", "val/R@2")) == 0
    assert len(list((two_best / "checkpoints").glob("best-*.ckpt"))) == 2
    assert yaml.safe_load((two_best / "config.yaml").read_text())["checkpoint"]["monitor"] == "val/R@2"
    assert main(_fit_args(cub_root, tmp_path / "bad", "--checkpoint.save_top_k", "-3")) == 2


@pytest.mark.parametrize("command", [
    ["--help"], ["status", "{tmp}"], ["leaderboard", "--runs", "{tmp}"], ["list"], ["suite", "list"],
    ["suite", "status", "smoke", "--output", "{tmp}/smoke"], ["suite", "paper-table", "dmcac_table", "--output", "{tmp}/d"],
])
def test_light_commands_start_without_the_deep_learning_stack(command: list[str], tmp_path: Path) -> None:
    """``--help``, ``list``, ``status``, ``leaderboard`` and the reading suite commands read text and results:
    they import neither torch, timm nor Lightning (about 6 s of imports on a 2-core CPU; #27). A real
    interpreter, as a user starts it."""
    import subprocess
    import sys

    argv = [a.format(tmp=tmp_path) for a in command]
    probe = ("import sys; import benchmark.__main__ as m; code = m.main(sys.argv[1:]); "
             "heavy = sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'lightning', 'timm', 'torchvision'}); "
             "print('HEAVY', heavy); sys.exit(code)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
