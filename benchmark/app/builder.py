"""The run builder: a ``fit`` / ``validate`` / ``test`` run from a command line, as LightningCLI builds it.

LightningCLI gives YAML configs (``--config``, repeatable), ``--print_config``, every constructor
argument as a flag and the resolved config saved in the run directory. This module adds what a
benchmark run needs on top, reusable by every command that builds a run (the command line, the
suites' validation, the perf and analysis commands):

* short flags users type: ``--method NAME``, ``--backbone NAME`` (and ``--backbone.X``),
  ``--data NAME``, ``--logger wandb|csv|tensorboard|none``, ``--plugin MODULE``;
* recipes: without ``--config``, ``configs/<method>/<data>.yaml`` is applied when it exists
  (``--recipe none`` turns that off, ``--recipe PATH`` picks one);
* one run directory per run (config, checkpoints, metrics JSON, logs), evaluation before and
  after training, the run's records (comparison key, steps, reference names), checkpoints
  evaluated with the settings they were trained with.

The command dispatcher (:mod:`benchmark.app.cli`) runs it and maps errors to exit codes.

A run is built in this order: :func:`benchmark.app.flags.rewrite_args` turns the short flags into LightningCLI
arguments and checks the files they name (before anything heavy happens); LightningCLI parses
(:meth:`BenchmarkCLI.init_parser`, :meth:`BenchmarkCLI.add_arguments_to_parser`), the checkpoint's
own settings are enforced (:meth:`BenchmarkCLI.before_instantiate_classes`), the model and the
datamodule are built, then the trainer with the run folder and records
(:meth:`BenchmarkCLI.instantiate_trainer`), and the subcommand runs. Every problem with what the
user gave is raised as a :class:`~benchmark.core.errors.UserError` (mostly ``CLIError``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, Timer
from lightning.pytorch.cli import LightningCLI

from benchmark.app.checkpoints import (
    check_checkpoint_settings,
    checkpoint_contents,
    run_dir_of_checkpoint,
)
from benchmark.app.flags import pop_option, rewrite_args
from benchmark.core import registry
from benchmark.core.errors import CLIError, UserError
from benchmark.core.io import make_writable_dir, remove_stale_temporaries
from benchmark.core.results import (
    ROLE_FINAL,
    comparison_config,
    comparison_group,
    comparison_key,
    identity,
)
from benchmark.engine.evaluation import RetrievalEvaluator
from benchmark.engine.figures import FigureWriter
from benchmark.engine.training import (
    AtomicCheckpointIO,
    BenchmarkTrainer,
    CheckpointSettings,
    ConfigInCheckpoint,
    RunStatus,
    resolve_precision,
    run_metadata,
    training_length,
    truncate_records,
)
from benchmark.engine.wandb_logger import (
    WandbResults,
    build_wandb_logger,
    update_wandb_config,
)
from datamodules.base import RetrievalDataModule
from methods.base import RetrievalMethod


# ---------------------------------------------------------------------------- LightningCLI
def _init_parameters(class_path: str) -> list[str]:
    """Constructor parameter names of a class and its bases (what ``--model.X`` accepts).

    Used only to suggest the closest valid option in an error message; a class that cannot be
    imported, or a signature that cannot be read, gives fewer (or no) suggestions, never an error.
    """
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    # Every class of the MRO: a method's __init__ takes **kwargs on to RetrievalMethod's, whose
    # parameters (lr, backbone, ...) are options too.
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        with contextlib.suppress(TypeError, ValueError):
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                    names.append(p.name)
    return names


def explain_parse_error(message: str, options: list[str]) -> str:
    """A short message for an option the parser rejected, with the closest valid names.

    ``options``: the option strings the parser knows; a rejected ``--model.X`` / ``--data.X``
    is matched against the constructor parameters of the class named in ``message``.

    Args:
        message: jsonargparse's error message.
        options: the option strings the parser knows.

    Returns:
        One short paragraph: the unknown option with up to three close names, or, for any other
        error, jsonargparse's message without its noise lines.
    """
    import difflib
    import re

    # The two shapes jsonargparse reports an unknown option in: a top-level one (argparse's wording),
    # and an option of a class given by class path (nested under the section's "Parser key").
    unknown = re.search(r"unrecognized arguments: (\S+)", message)
    nested = re.search(r'Parser key "(\w+)":.*?class_path \'([\w.]+)\':\s*Option \'(\w+)\' is not accepted', message, re.S)
    if nested:
        section, class_path, option = nested.groups()
        valid = [f"--{section}.{n}" for n in _init_parameters(class_path)]
        bad = f"--{section}.{option}"
        where = f" for {class_path}"
    elif unknown:
        bad, valid, where = unknown.group(1), options, ""
    else:
        # Other errors keep jsonargparse's text, minus the lines about each Union alternative it tried
        # (an Optional option's "NoneType" branch, "Given value type"), which bury the cause.
        lines = [line for line in message.splitlines() if line.strip() and "NoneType" not in line and "Given value" not in line]
        return "\n".join(lines)
    close = difflib.get_close_matches(bad, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"unknown option {bad}{where}.{hint} `--help` lists the options, `--print_config` shows their values."


class BenchmarkCLI(LightningCLI):
    """LightningCLI with the benchmark's run: short flags already rewritten (``run_info``), the evaluator,
    checkpoint and figure options in the parser, one run folder, records and loggers in the trainer.

    Everything happens in LightningCLI's hooks: :meth:`init_parser` (no abbreviations, short errors),
    :meth:`add_arguments_to_parser`, :meth:`before_instantiate_classes` (a checkpoint's own settings),
    :meth:`instantiate_trainer` (run folder, callbacks, loggers, records), :meth:`before_fit` /
    :meth:`after_fit` (the evaluation before training and the final test).
    """

    def __init__(self, *args: Any, run_info: dict[str, Any] | None = None, status: RunStatus | None = None,
                 **kwargs: Any) -> None:
        """LightningCLI's arguments, plus what the short flags said and the run's status.

        Args:
            run_info: the run info of :func:`rewrite_args` (method, recipe, logger, run_dir,
                checkpoint, ...).
            status: the run's status (``status.json``, signal handling); None for a run built
                without one (the analysis and perf commands).
        """
        # Set first: LightningCLI.__init__ parses, instantiates and runs the subcommand from inside itself.
        self.run_info: dict[str, Any] = dict(run_info or {})
        self.status = status
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any):
        """LightningCLI's parser, without abbreviations and with one-paragraph errors
        (:func:`_short_parse_error`)."""
        # No prefix matching: --trainer.max_epoch must not silently mean --trainer.max_epochs.
        kwargs.setdefault("allow_abbrev", False)
        parser = super().init_parser(**kwargs)
        parser.error_handler = _short_parse_error
        return parser

    def resolved_config(self) -> dict[str, Any]:
        """This command's resolved configuration as a plain dict (what config.yaml holds)."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        return config.as_dict() if hasattr(config, "as_dict") else dict(config)

    def before_instantiate_classes(self) -> None:
        """Refuse to build a checkpoint's model under settings it was not trained with.

        Runs after parsing and before any class is built, so a contradiction costs no model
        construction, no download and no data pass
        (:func:`~benchmark.app.checkpoints.check_checkpoint_settings`).
        """
        stored = self.run_info.get("checkpoint")
        if stored is not None:  # test/validate of a checkpoint: with the settings it was trained with
            # "own": recorded into a folder of its own (--run_dir elsewhere), where other data settings are
            # a deliberate choice; into the checkpoint's run, they must be the run's.
            own = self.run_info.get("run_dir") is not None and run_dir_of_checkpoint(self.run_info.get("ckpt_path")) != \
                Path(self.run_info["run_dir"]).expanduser()  # fmt: skip
            check_checkpoint_settings(self.resolved_config(), stored, str(self.run_info.get("ckpt_path")), not own)

    def add_arguments_to_parser(self, parser) -> None:
        """The benchmark's own sections (``evaluation``, ``checkpoint``, ``figures``) and the data ->
        model links.

        Each section is a class whose constructor arguments become options, so a recipe can set
        them and ``--print_config`` shows them like every other option.
        """
        # The evaluator's options, from a recipe's `evaluation:` section or --evaluation.*
        # (e.g. --evaluation.recall_ks [1,2,4,8] --evaluation.backend cpu).
        parser.add_class_arguments(RetrievalEvaluator, "evaluation", instantiate=True)
        parser.add_class_arguments(CheckpointSettings, "checkpoint", instantiate=True)
        # The figures drawn after a test into runs/<run>/figures/ (--figures.* or a recipe's figures:).
        parser.add_class_arguments(FigureWriter, "figures", instantiate=True)
        # Derived values are never typed twice: they flow from the built datamodule into the model.
        # apply_on="instantiate": the number of training classes is only known once the data is read.
        parser.link_arguments("data.num_train_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")

    def _run_dir(self) -> Path:
        """Where this run writes: --run_dir, the run a checkpoint belongs to, or a new folder.

        A new folder is created exclusively (a suffix is added if the name is taken), so two
        runs started in the same second never share one. ``fit --ckpt_path`` of a run's
        checkpoint continues that run's folder; ``test``/``validate`` record into it.

        Returns:
            The run folder, created and checked writable; it is also exported as
            ``DML_BENCHMARK_RUN_DIR`` for the other DDP ranks.

        Raises:
            CLIError: ``--run_dir`` names a file or an unwritable folder, or ``fit`` would start a new
                run in a folder that already holds one.
        """
        info = self.run_info
        env = os.environ.get("DML_BENCHMARK_RUN_DIR")
        # Each DDP worker re-runs the command line: it must join rank 0's folder, not create its own
        # (the time stamp of a new name could differ by a second).
        if env and os.environ.get("LOCAL_RANK", "0") != "0":  # a DDP worker: rank 0 chose the folder
            return Path(env)
        root = info.get("run_dir") or self._get(self.config, "trainer", default={}).get("default_root_dir")
        path = Path(root).expanduser() if root else run_dir_of_checkpoint(info.get("ckpt_path"))
        if path is None:
            path = self._new_run_dir()
            created = True
        else:
            if path.exists() and not path.is_dir():
                raise CLIError(f"--run_dir {path} is a file; name a folder (it is created if missing).")
            resuming = run_dir_of_checkpoint(info.get("ckpt_path")) == path
            if info.get("command") == "fit" and not resuming and (path / "config.yaml").exists():
                raise CLIError(
                    f"--run_dir {path} already holds a run. Choose a new folder, or continue that run with "
                    f"--ckpt_path {path / 'checkpoints' / 'last.ckpt'}."
                )
            created = not path.exists()
        # Writable now, before the model is built and the data read, rather than at the first checkpoint.
        try:
            make_writable_dir(path)
        except OSError as err:
            raise CLIError(f"Cannot write into the run directory {path}: {err}. Pass --run_dir to a writable folder.") from err
        os.environ["DML_BENCHMARK_RUN_DIR"] = str(path)
        if self.status is not None:  # a folder this process created may be removed after a start-up error
            self.status.created_run_dir = created
        return path

    def _new_run_dir(self) -> Path:
        """runs/<method>-<data>-<backbone>-<time>[-n], created exclusively.

        ``mkdir`` without ``exist_ok`` is the claim: two processes started in the same second
        cannot both create one name, and the second takes the next suffix.

        Raises:
            CLIError: ``runs/`` cannot be created, or 10,000 names of this stem are taken.
        """
        model_name = getattr(self.model, "method_name", "") or type(self.model).__name__
        data_name = getattr(self.datamodule, "name", "") or type(self.datamodule).__name__
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path("runs") / f"{model_name}-{data_name}-{self.model.backbone_config.name}-{stamp}"
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CLIError(f"Cannot create {base.parent}: {err}. Pass --run_dir to a writable folder.") from err
        for n in range(1, 10_000):
            path = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise CLIError(f"Too many runs named {base}*; pass --run_dir.")

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer of a benchmark run: its folder, callbacks, logger, precision and records.

        LightningCLI calls this once the model and the datamodule exist, which is the first moment
        the run can be described (the method's data request, the data found). It adds, in order:
        the evaluator (the ``evaluation`` section), the best-checkpoint and ``last.ckpt``
        callbacks (the ``checkpoint`` section), the run's status, the learning-rate monitor (a
        ``fit`` with a logger), the W&B results (acting only under a W&B logger) and the figure
        writer (``fit`` / ``test``), after the user's own ``--trainer.callbacks``; and
        :class:`~benchmark.engine.training.AtomicCheckpointIO` unless a plugin already writes checkpoints.

        It records what makes the run's numbers comparable: the comparison config and key, the
        papers' names for the setting (``reference_names``), the suite's cell (from the
        ``DML_BENCHMARK_*`` variables a suite sets), the library versions; they go to the logger's
        config and, all but the versions, through ``trainer.run_metadata`` into every ``metrics_*.json``.

        Returns:
            The trainer; ``self.run_dir`` is the run folder.

        Raises:
            CLIError: the run folder cannot be used (:meth:`_run_dir`).
            ConfigError: the batch settings do not fit the data (``training_batches``).
        """
        if (self.run_info.get("command") or "fit") == "fit" and hasattr(self.datamodule, "training_batches"):
            # The batch settings against the data, before any folder or data pass.
            batches = len(self.datamodule.training_batches(self.model.data_request()))
            every = self._get(self.config_init, "trainer", default={}).get("log_every_n_steps")
            every = 50 if every is None else every  # Lightning's default; 0 (no step logging) is kept
            if 0 < batches < every:
                # Lightning writes step metrics every log_every_n_steps steps: an epoch shorter than
                # that would leave train/loss out of every logger. Write once an epoch then.
                kwargs["log_every_n_steps"] = batches
        run_dir = self._run_dir()
        command = self.run_info.get("command") or "fit"
        if hasattr(self.datamodule, "apply_request"):  # a RetrievalDataModule (a plain DataModule has none)
            # What the method asks of the data (sampler, views, normalisation) before anything
            # records the run: the results and the W&B config describe the data as it is used.
            self.datamodule.apply_request(self.model.data_request())
        meta = {**self.datamodule.describe(), **self.model.describe()}
        seed = self._get(self.config, "seed_everything")
        meta["seed"] = seed
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        evaluator = self._get(self.config_init, "evaluation", default=None)
        # The parser instantiates the section; a configuration without it (built by hand) gets the defaults.
        callbacks = [evaluator if isinstance(evaluator, RetrievalEvaluator) else RetrievalEvaluator()]
        # The best checkpoint by the metric the method is judged by (trainer.checkpoint_callback,
        # ckpt_path="best"), after each validation; then last.ckpt at the end of every training
        # epoch (after its validation, if any), so that a run validated every few epochs can
        # still be resumed from its latest epoch.
        settings = self._get(self.config_init, "checkpoint", default=None)
        settings = settings if isinstance(settings, CheckpointSettings) else CheckpointSettings()
        selection = settings.monitor or getattr(self.model, "selection_metric", "val/R@1")
        meta["selection_metric"] = selection
        if settings.save_top_k != 0:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=run_dir / "checkpoints",
                    filename="best-{epoch}-{step}",
                    monitor=selection,
                    mode=settings.mode or getattr(self.model, "selection_mode", "max"),
                    save_top_k=settings.save_top_k,
                    auto_insert_metric_name=False,
                    save_on_train_epoch_end=False,  # after validation has computed the metric
                )
            )
        if settings.last_every_n_epochs:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=run_dir / "checkpoints",
                    filename="last",
                    monitor=None,
                    save_top_k=1,
                    every_n_epochs=settings.last_every_n_epochs,
                    save_on_train_epoch_end=True,
                    enable_version_counter=False,
                )
            )
        if self.status is not None:  # as a callback: it stamps the first step and saves last.ckpt on a stop
            self.status.command = command
            callbacks.append(self.status)
        precision, reason = resolve_precision(trainer_cfg.get("precision", "auto"), trainer_cfg.get("accelerator", "auto"))
        meta["precision"] = str(precision)
        extra = run_metadata(self.run_info, trainer_cfg, self.datamodule)
        # What makes runs comparable: the whole resolved configuration minus seeds and bookkeeping,
        # plus what the configuration cannot carry (resolved precision, weights' hash, data found).
        config = self.resolved_config()
        settings = comparison_config(config, getattr(type(self.model), "per_run_options", ()))
        extra["config"] = settings
        extra["comparison_key"] = comparison_key({**settings, **identity({**meta, **extra})})
        # The papers' names for this setting (RetrievalMethod.reference_names), recorded so that the
        # leaderboard and the paper tables match runs to paper numbers without importing the methods.
        described = {**meta, **extra}
        extra["reference_names"] = list(type(self.model).reference_names(described, False))
        extra["reference_names_refined"] = list(type(self.model).reference_names(described, True))
        for key, variable in (("suite", "DML_BENCHMARK_SUITE"), ("cell", "DML_BENCHMARK_CELL"),
                              ("variant", "DML_BENCHMARK_VARIANT")):  # fmt: skip
            if os.environ.get(variable):
                extra[key] = os.environ[variable]
        meta.update(extra)
        # The resolved configuration travels inside every checkpoint, so that `test --ckpt_path` can
        # evaluate it with its own settings even when config.yaml is gone (ConfigInCheckpoint).
        if command == "fit":
            with contextlib.suppress(Exception):  # a config jsonargparse cannot dump: config.yaml says why
                text = self._parser(self.subcommand).dump(self.config.get(str(self.subcommand), self.config),
                                                          skip_none=False)  # fmt: skip
                callbacks.append(ConfigInCheckpoint(text))
        logger_name = self.run_info.get("logger") or "wandb"
        if command != "fit" and self.run_info.get("run_config") and self.run_info.get("logger_default", True):
            logger_name = "none"  # evaluating a run's checkpoint: its results go into its folder
        # --trainer.logger, when given, wins (LightningCLI's convention) and --logger's is not made.
        user_logger = trainer_cfg.get("logger")
        user_set = user_logger is not None and user_logger is not True
        logger = None if user_set else build_logger(logger_name, run_dir, meta, command)
        if command == "fit" and (logger is not None or (user_set and user_logger is not False)):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(WandbResults(run_dir, selection))  # acts only when a W&B logger is attached
        figures = self._get(self.config_init, "figures", default=None)
        if isinstance(figures, FigureWriter) and figures.enabled and command in ("fit", "test"):
            figures.run_dir = run_dir  # draws after the test, records the training history
            callbacks.append(figures)
        kwargs["default_root_dir"] = str(run_dir)  # --trainer.default_root_dir, if given, chose run_dir
        if not user_set:
            kwargs["logger"] = logger if logger is not None else False
        existing = trainer_cfg.get("callbacks") or []
        kwargs["callbacks"] = list(existing) + callbacks
        # Atomic checkpoint writes (temporary file, then rename): a killed run never leaves a truncated
        # checkpoint. A user's own checkpoint I/O plugin is left in charge.
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        self.run_dir = run_dir
        trainer = super().instantiate_trainer(**kwargs)
        # Recorded with every evaluation too (metrics_*.json), so local results and W&B agree.
        trainer.run_metadata = {k: v for k, v in extra.items() if not k.startswith("version.")}
        if trainer.is_global_zero:  # printed once, not once per DDP rank
            print(f"[benchmark] precision: {trainer.precision} ({reason})", file=sys.stderr)
            print(f"[benchmark] run directory: {run_dir}", file=sys.stderr)
        # Only a fit is a run with a state of its own; test/validate add evaluations to an existing one.
        if command == "fit" and self.status is not None:
            self.status.start(run_dir)
        return trainer

    def before_fit(self) -> None:
        """Evaluate the starting point before training (the pre-fit baseline of ``metrics_val.json``).

        The epoch-0 evaluation is what every curve starts from (0 epochs trained) and is never
        "best". A resumed fit skips it: the run recorded it when it started.
        """
        ckpt = self.run_info.get("ckpt_path")
        if ckpt and ckpt not in ("best", "last", "hpc", "registry"):
            self._prepare_resume(Path(ckpt).expanduser())
            return  # resuming: the run's pre-training evaluation is already recorded
        if ckpt:  # a symbolic ckpt_path (best, last, ...): Lightning resumes from it, no baseline either
            return
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)

    def _prepare_resume(self, ckpt: Path) -> None:
        """Before continuing from ``ckpt``: drop what the run recorded after the checkpoint's step (a
        kill between a validation and its checkpoint leaves the lost weights' evaluation behind) and
        the temporaries of checkpoints whose writer was killed."""
        if not self.trainer.is_global_zero:
            return
        run_dir = Path(self.trainer.default_root_dir)
        step = int(checkpoint_contents(ckpt).get("global_step") or 0)
        notes = truncate_records(run_dir, step)
        for folder in (run_dir, run_dir / "checkpoints"):
            notes += [f"removed {p.name}: a temporary of a write that was killed"
                      for p in remove_stale_temporaries(folder)] if folder.is_dir() else []  # fmt: skip
        for note in notes:
            print(f"[benchmark] resuming at step {step}: {note}", file=sys.stderr)

    def after_fit(self) -> None:
        """Record how long the run trained, then run the final test (``role: final``).

        The test uses the best checkpoint under the ``holdout`` protocol (selected on held-out
        classes) and the weights in memory at the end of training under ``paper``, where selecting
        on validation would mean selecting on the test split.
        """
        if self.trainer.interrupted:  # a stopped run has no final test; resuming it will
            return
        stopped_by = self._note_time_budget()
        length = training_length(self.trainer, self.datamodule, self.run_info.get("recipe"), stopped_by)
        # The leaderboard pools runs by comparison key *and* steps trained: a run cut short is never
        # averaged with complete ones.
        key = self.trainer.run_metadata.get("comparison_key")
        length["comparison_group"] = comparison_group(key, length["steps_trained"]) if key else None
        self.trainer.run_metadata.update(length)
        if length["short"] and self.trainer.is_global_zero:
            print(f"[benchmark] shorter than asked: {length['short']}; the leaderboard shows this run apart "
                  "from complete ones", file=sys.stderr)  # fmt: skip
        update_wandb_config(self.trainer, length)
        ckpt = "best" if getattr(self.datamodule, "protocol", "paper") == "holdout" else None
        if ckpt == "best" and not self.trainer.checkpoint_callback.best_model_path:
            ckpt = None  # no best checkpoint was kept (save_top_k 0, no validation): the final weights
        evaluators = [c for c in self.trainer.callbacks if isinstance(c, RetrievalEvaluator)]
        for evaluator in evaluators:
            evaluator.test_role = ROLE_FINAL  # the end-of-training result, whatever checkpoint it loads
        try:
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
        finally:  # a later test in the same process (not this run's end) must not be labelled final
            for evaluator in evaluators:
                evaluator.test_role = None

    def _note_time_budget(self) -> str:
        """Say so when ``trainer.max_time`` ended training before its epochs or steps; returns
        ``"max_time"`` then, else ``""``.

        The note goes to stderr, to ``status.json`` (the final status's reason) and, through
        :func:`~benchmark.engine.training.training_length`, to the run's ``short`` record.
        """
        trainer = self.trainer
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or timer.time_remaining("train") > 0:
            return ""
        planned = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.max_epochs * trainer.num_training_batches
        if trainer.global_step >= planned:
            return ""
        note = (
            f"training stopped by the time budget (trainer.max_time) after {trainer.global_step} of {planned} "
            "steps: this machine is slower than the recipe assumes, and the results are those of the shorter run"
        )
        if trainer.is_global_zero:
            print(f"[benchmark] {note}", file=sys.stderr)
        if self.status is not None:
            self.status.note = note
        return "max_time"


def _short_parse_error(parser: Any, message: str) -> None:
    """jsonargparse's error handler: the cause and the closest valid names, not 50 lines of usage.

    Exits with code 2, as argparse does: the dispatcher records a start-up exit with that code as
    a user error.
    """
    # argparse keeps its actions in a private list; it is the only complete list of option strings.
    options = [o for action in parser._actions for o in action.option_strings]
    print(f"error: {explain_parse_error(message, options)}", file=sys.stderr)
    raise SystemExit(2)


def build_logger(name: str, run_dir: Path, meta: dict[str, Any], job_type: str = "fit"):
    """The run's logger: W&B (offline unless logged in), CSV, TensorBoard or none.

    Args:
        name: one of :data:`LOGGERS`.
        run_dir: the run folder; every logger writes inside it.
        meta: the run's flat description, the W&B run's config.
        job_type: the command (``fit``, ``test``, ``validate``), W&B's job type.

    Returns:
        A Lightning logger, or None for ``none``.
    """
    if name == "none":
        return None
    if name == "csv":
        return _csv_logger(run_dir)
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # name="" and version="": the event files go into the run folder itself, not a version_N below it.
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="")
    return build_wandb_logger(run_dir, meta, job_type)


def _csv_logger(run_dir: Path):
    """Lightning's CSVLogger writing ``<run_dir>/metrics.csv``, continuing an existing file.

    Lightning deletes an existing metrics.csv when its writer is created, which would erase
    the first part of a resumed run's log; the file is set aside while the logger is built
    and its header given to the writer, which then appends (widening the header if needed).
    """
    import csv
    import warnings

    from lightning.pytorch.loggers import CSVLogger

    existing = run_dir / "metrics.csv"
    kept = existing.with_name(f".metrics.csv.{os.getpid()}.resume") if existing.is_file() else None
    if kept is not None:
        os.replace(existing, kept)
    logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        writer = logger.experiment
    if kept is not None:
        os.replace(kept, existing)
        with open(existing, newline="") as f:
            header = next(csv.reader(f), [])
        writer.metrics_keys = sorted(header)  # Lightning's writer rewrites the file when new keys appear
    return logger


def build_cli(subcommand: str | None, argv: list[str], run: bool = True, status: Any = None):
    """Rewrite the short flags and run (or only instantiate, ``run=False``) the LightningCLI.

    ``status`` (a :class:`benchmark.engine.training.RunStatus`) records the run's state in its folder.

    Args:
        subcommand: ``fit``, ``validate``, ``test``; with ``run=False`` the subcommand whose
            configuration file name and checkpoint handling apply (``analyze`` builds a ``test``).
        argv: the arguments after the subcommand, short flags included.
        run: run the subcommand (False: build the model, the data and the trainer, and return).
        status: the run's status, or None.

    Returns:
        The :class:`BenchmarkCLI`: ``.model``, ``.datamodule``, ``.trainer``, ``.run_dir``.

    Raises:
        UserError: what :func:`rewrite_args` and the run builder refuse (see :func:`user_error` for
            the errors jsonargparse wraps).
        SystemExit: a parse error (code 2, printed), ``--help`` or ``--print_config`` (0).
    """
    info: dict[str, Any] = {"command": subcommand}
    # --help only needs the registered classes for the class-path choices; nothing is rewritten or checked.
    if any(a in ("-h", "--help") for a in argv):
        registry.discover()
    else:
        argv, info = rewrite_args(argv, subcommand)
        if not run:  # built to be driven by hand (analyze): no subcommand, so no --ckpt_path
            pop_option(argv, "--ckpt_path")
        elif subcommand in ("test", "validate") and not any(a.split("=", 1)[0] == "--verbose" for a in argv):
            # The evaluator prints the one table (percent, counts as integers); Lightning's would
            # repeat it as fractions. --verbose true brings it back.
            argv = [*argv, "--verbose", "false"]
        if info["run_config"] is not None:
            print(f"[benchmark] config: {info['run_config']} (the run that wrote the checkpoint)", file=sys.stderr)
        elif info["recipe"] is not None and not any(a.startswith("--print_config") for a in argv):
            print(f"[benchmark] recipe: {info['recipe']}", file=sys.stderr)

    # fit saves the resolved config as config.yaml; test/validate of a run save theirs beside it.
    config_name = "config.yaml" if subcommand in (None, "fit") else f"config_{subcommand}.yaml"
    with warnings.catch_warnings():
        # argv is passed on purpose (short flags rewritten); Lightning warns whenever sys.argv is also set.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return _instantiate_cli(subcommand, argv, run, config_name, info, status)


def _instantiate_cli(subcommand: str | None, argv: list[str], run: bool, config_name: str, info: dict[str, Any],
                     status: Any):
    """The :class:`BenchmarkCLI` with the benchmark's fixed LightningCLI settings.

    Any :class:`~methods.base.RetrievalMethod` / :class:`~datamodules.base.RetrievalDataModule`
    subclass can be named by class path (``subclass_mode``); the methods configure their own
    optimizers (``--model.optimizer``), so LightningCLI adds no optimizer options; the datamodule
    shards its own batches per rank, so Lightning must not wrap its samplers
    (``use_distributed_sampler=False``); the resolved configuration is saved as ``config_name``,
    replacing an earlier one of a resumed run.
    """
    return BenchmarkCLI(
        RetrievalMethod,
        RetrievalDataModule,
        trainer_class=BenchmarkTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True, "config_filename": config_name},
        trainer_defaults={"use_distributed_sampler": False, "log_every_n_steps": 10},
        args=([subcommand] if subcommand and run else []) + argv,
        run=run,
        run_info=info,
        status=status,
    )


# ---------------------------------------------------------------------------- other commands


# Shared with the dispatcher (benchmark.app.cli): one rule decides what is the user's fault.
def user_error(err: BaseException | None) -> BaseException | None:
    """The user error behind ``err``, if any: itself or one of its causes.

    jsonargparse wraps what a constructor raises (a weights file that does not fit, a
    dataset that is not there) in its own ``ValueError``; the cause is what the user must read.

    The chain is followed through ``__cause__`` and ``__context__`` (an exception raised while
    handling another), guarding against cycles.

    Returns:
        The first :class:`~benchmark.core.errors.UserError` in the chain, or None: the error is a
        bug and keeps its traceback.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
