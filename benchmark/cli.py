"""``python -m benchmark``: fit | validate | test (LightningCLI) + list | leaderboard | perf.

LightningCLI gives YAML configs (``--config``, repeatable), ``--print_config``, every
constructor argument as a flag and the resolved config saved in the run directory. This
module adds what a benchmark needs on top:

* short flags users type: ``--method NAME``, ``--backbone NAME`` (and ``--backbone.X``),
  ``--data NAME``, ``--logger wandb|csv|tensorboard|none``, ``--plugin MODULE``;
* recipes: without ``--config``, ``configs/<method>/<data>.yaml`` is applied when it
  exists (``--recipe none`` turns that off, ``--recipe PATH`` picks one);
* one run directory per run (config, checkpoints, metrics JSON, logs), evaluation before
  and after training, and the test metrics printed as a table.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmark import registry

DEFAULT_METHOD = "dmcac"
DEFAULT_DATA = "synthetic"
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
LOGGERS = ("wandb", "csv", "tensorboard", "none")

USAGE = """usage: python -m benchmark <command> [options]

commands:
  fit          train a method (evaluates before and after), e.g.
               python -m benchmark fit --method dmcac --backbone vit_small
  validate     evaluate a checkpoint on the validation split (--ckpt_path)
  test         evaluate a checkpoint on the test split (--ckpt_path)
  list         registered methods, backbones and datasets
  leaderboard  results of local runs (runs/*/metrics_test.json) next to the papers' numbers
  perf NAME    performance benchmarks (python -m benchmark perf --help)
  analyze NAME figure-writing analyses, e.g. analyze cross_image_attention gradients

fit/validate/test options (plus every LightningCLI option, see `fit --help`):
  --method NAME        method to train (default: {method})
  --backbone NAME      encoder preset; --backbone.pretrained false, --backbone.weights PATH
  --data NAME          dataset (default: {data}, generated on first use)
  --data.root PATH     where the dataset lives
  --config FILE        YAML recipe (repeatable); without it configs/<method>/<data>.yaml is used
  --recipe none|PATH   switch the automatic recipe off, or name one
  --logger NAME        wandb (default; offline unless logged in), csv, tensorboard, none
  --run_dir PATH       where this run writes (default: runs/<method>-<data>-<time>)
  --plugin MODULE      import a module that registers more methods/datasets (repeatable)
"""


class CLIError(Exception):
    """A user error on the command line: printed without a traceback, exit code 2."""


# ---------------------------------------------------------------------------- argv handling
def _pop_option(argv: list[str], name: str, repeat: bool = False) -> list[str]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` occurrences from argv; return the values."""
    values, out, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv):
                raise CLIError(f"{name} needs a value.")
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
            i += 1
            continue
        out.append(arg)
        i += 1
    argv[:] = out
    if len(values) > 1 and not repeat:
        raise CLIError(f"{name} was given {len(values)} times; give it once.")
    return values


def _has_option(argv: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") or a.startswith(name + ".") for a in argv)


def resolve_recipe(method: str, data: str, recipe: str | None) -> Path | None:
    """The recipe for (method, data): explicit path, ``none``, or configs/<method>/<data>.yaml."""
    if recipe == "none":
        return None
    if recipe not in (None, "auto"):
        path = Path(recipe)
        if not path.is_file():
            raise CLIError(f"Recipe {recipe} does not exist.")
        return path
    path = CONFIG_DIR / method / f"{data}.yaml"
    return path if path.is_file() else None


def rewrite_args(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Turn the short flags into LightningCLI arguments; return (argv, run info)."""
    argv = list(argv)
    registry.discover(_pop_option(argv, "--plugin", repeat=True))
    methods = _pop_option(argv, "--method")
    datas = [a for a in _pop_option(argv, "--data")]
    recipe = (_pop_option(argv, "--recipe") or [None])[0]
    logger = (_pop_option(argv, "--logger") or ["wandb"])[0]
    run_dir = (_pop_option(argv, "--run_dir") or [None])[0]
    if logger not in LOGGERS:
        raise CLIError(f"Unknown logger {logger!r}. Choose one of: {', '.join(LOGGERS)}.")
    backbone = _pop_option(argv, "--backbone")
    argv = [a.replace("--backbone.", "--model.backbone.", 1) if a.startswith("--backbone.") else a for a in argv]
    user_config = _has_option(argv, "--config")

    prefix: list[str] = []
    method = methods[0] if methods else None
    if method is None and not _has_option(argv, "--model") and not user_config:
        method = DEFAULT_METHOD
    if method is not None:
        try:
            prefix += ["--model", registry.class_path(registry.get_method(method))]
        except registry.UnknownNameError as err:
            raise CLIError(str(err)) from None
    data = datas[0] if datas else None
    if data is not None and "." in data and data not in registry.DATASETS:  # a class path or a config
        prefix_data = ["--data", data]
        data = None
    else:
        if data is None and not user_config:
            data = DEFAULT_DATA
        prefix_data = []
        if data is not None:
            try:
                prefix_data = ["--data", registry.class_path(registry.get_dataset(data))]
            except registry.UnknownNameError as err:
                raise CLIError(str(err)) from None
    prefix += prefix_data
    recipe_path = None
    if not user_config and method is not None and data is not None:
        recipe_path = resolve_recipe(method, data, recipe)
    elif recipe not in (None, "auto", "none"):
        recipe_path = resolve_recipe(method or "", data or "", recipe)
    if recipe_path is not None:
        prefix += ["--config", str(recipe_path)]
    if backbone:
        prefix += ["--model.backbone.name", backbone[0]]
    info = {"method": method, "data": data, "recipe": recipe_path, "logger": logger, "run_dir": run_dir}
    return prefix + argv, info


# ---------------------------------------------------------------------------- LightningCLI
def _make_cli_class():
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from benchmark.evaluation import RetrievalEvaluator

    class BenchmarkCLI(LightningCLI):
        run_info: dict[str, Any] = {}

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.num_train_classes", "model.init_args.num_classes", apply_on="instantiate")
            parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")

        def _run_dir(self) -> Path:
            info = self.run_info
            if info.get("run_dir"):
                return Path(info["run_dir"])
            env = os.environ.get("DML_BENCHMARK_RUN_DIR")
            if env:  # set by rank 0 so that DDP workers write into the same folder
                return Path(env)
            model_name = getattr(self.model, "method_name", "") or type(self.model).__name__
            data_name = getattr(self.datamodule, "name", "") or type(self.datamodule).__name__
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path("runs") / f"{model_name}-{data_name}-{self.model.backbone_config.name}-{stamp}"
            os.environ["DML_BENCHMARK_RUN_DIR"] = str(path)
            return path

        def instantiate_trainer(self, **kwargs: Any):
            run_dir = self._run_dir()
            run_dir.mkdir(parents=True, exist_ok=True)
            meta = {**self.datamodule.describe(), **self.model.describe()}
            seed = self._get(self.config, "seed_everything")
            meta["seed"] = seed
            callbacks = [RetrievalEvaluator()]
            # The best checkpoint by val/R@1 first (trainer.checkpoint_callback, ckpt_path="best"),
            # then last.ckpt after every validation: Lightning's own save_last only rewrites it
            # when a new best was saved, which would make resuming lose epochs.
            callbacks.append(
                ModelCheckpoint(
                    dirpath=run_dir / "checkpoints",
                    filename="best-{epoch}-{step}",
                    monitor="val/R@1",
                    mode="max",
                    save_on_train_epoch_end=False,  # after validation has computed val/R@1
                )
            )
            callbacks.append(
                ModelCheckpoint(
                    dirpath=run_dir / "checkpoints",
                    filename="last",
                    monitor=None,
                    save_top_k=1,
                    enable_version_counter=False,
                )
            )
            logger = build_logger(self.run_info.get("logger", "wandb"), run_dir, meta)
            if logger is not None:
                callbacks.append(LearningRateMonitor(logging_interval="step"))
            kwargs.setdefault("default_root_dir", str(run_dir))
            kwargs["logger"] = logger if logger is not None else False
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            existing = trainer_cfg.get("callbacks") or []
            kwargs["callbacks"] = list(existing) + callbacks
            self.run_dir = run_dir
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)

        def after_fit(self) -> None:
            if self.trainer.interrupted:
                return
            ckpt = "best" if getattr(self.datamodule, "protocol", "paper") == "holdout" else None
            if ckpt == "best" and not self.trainer.checkpoint_callback.best_model_path:
                ckpt = None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)

    return BenchmarkCLI


def build_logger(name: str, run_dir: Path, meta: dict[str, Any]):
    """The run's logger: W&B (offline unless logged in), CSV, TensorBoard or none."""
    if name == "none":
        return None
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="", version="")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="", version="")
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
    group = f"{meta.get('dataset')}/{meta.get('method')}"
    return WandbLogger(
        save_dir=str(run_dir),
        name=run_dir.name,
        project=os.environ.get("WANDB_PROJECT", "dml-benchmark"),
        group=group,
        tags=[str(meta.get("dataset")), str(meta.get("method")), str(meta.get("backbone"))],
        config=meta,
        mode=mode,
    )


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_cli(subcommand: str | None, argv: list[str], run: bool = True):
    """Rewrite the short flags and run (or only instantiate, ``run=False``) the LightningCLI."""
    info: dict[str, Any] = {}
    if any(a in ("-h", "--help") for a in argv):
        registry.discover()
    else:
        argv, info = rewrite_args(argv)
        if info["recipe"] is not None and not any(a.startswith("--print_config") for a in argv):
            print(f"[benchmark] recipe: {info['recipe']}", file=sys.stderr)
    cli_cls = _make_cli_class()
    cli_cls.run_info = info
    from datamodules.base import RetrievalDataModule
    from methods.base import RetrievalMethod

    return cli_cls(
        RetrievalMethod,
        RetrievalDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False, "log_every_n_steps": 10},
        args=([subcommand] if subcommand else []) + argv,
        run=run,
    )


# ---------------------------------------------------------------------------- other commands
def cmd_list(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from benchmark.backbones import BACKBONES

    registry.discover(_pop_option(argv, "--plugin", repeat=True))
    console = Console()
    table = Table(title="methods (--method)")
    table.add_column("name")
    table.add_column("description")
    table.add_column("class")
    for name, cls in sorted(registry.METHODS.items()):
        doc = cls.description or (cls.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, doc, registry.class_path(cls))
    console.print(table)
    table = Table(title="backbones (--backbone)")
    for col in ("name", "timm model", "pool", "description"):
        table.add_column(col)
    for name, preset in sorted(BACKBONES.items()):
        table.add_row(name, preset.timm_name, preset.pool, preset.description)
    console.print(table)
    table = Table(title="datasets (--data)")
    for col in ("name", "Recall@K", "description"):
        table.add_column(col)
    for name, cls in sorted(registry.DATASETS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table.add_row(name, ", ".join(map(str, cls.recall_ks)), doc)
    console.print(table)
    return 0


def _dispatch(package: str, command: str, argv: list[str]) -> int:
    """Run ``<package>.<argv[0]>.main(argv[1:])``: perf benchmarks and analyses are plain modules."""
    pkg = importlib.import_module(package)
    if not argv or argv[0] in ("-h", "--help"):
        import pkgutil

        names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
        print(f"usage: python -m benchmark {command} NAME [options]\n\navailable: " + ", ".join(sorted(names)))
        return 0
    try:
        module = importlib.import_module(f"{package}.{argv[0]}")
    except ModuleNotFoundError as err:
        if err.name != f"{package}.{argv[0]}":
            raise
        raise CLIError(f"Unknown {command} {argv[0]!r}; see `python -m benchmark {command} --help`.") from err
    return int(module.main(argv[1:]) or 0)


def cmd_perf(argv: list[str]) -> int:
    return _dispatch("benchmark.perf", "perf", argv)


def cmd_analyze(argv: list[str]) -> int:
    return _dispatch("benchmark.analysis", "analyze", argv)


def cmd_leaderboard(argv: list[str]) -> int:
    from benchmark.leaderboard import main as leaderboard_main

    return leaderboard_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(method=DEFAULT_METHOD, data=DEFAULT_DATA))
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"list": cmd_list, "perf": cmd_perf, "analyze": cmd_analyze, "leaderboard": cmd_leaderboard}
    try:
        if command in ("fit", "validate", "test"):
            build_cli(command, rest)
            return 0
        if command in commands:
            return commands[command](rest)
        raise CLIError(
            f"Unknown command {command!r}. Choose one of: fit, validate, test, list, leaderboard, perf, analyze."
        )
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # known user-facing errors: print the message, not a traceback
        from benchmark.backbones import WeightsUnavailableError
        from datamodules.records import DatasetError

        if isinstance(err, (WeightsUnavailableError, DatasetError, registry.UnknownNameError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
