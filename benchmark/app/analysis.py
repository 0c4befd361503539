"""``python -m benchmark analyze NAME``: any registered figure, from a run's checkpoint.

Every figure registered with ``@register_figure`` (:mod:`benchmark.engine.figures` for the generic
ones, ``companions/<method>_analysis.py`` for a method's own) is an ``analyze`` command of its
name (:mod:`benchmark.core.registry` adds them); ``analyze figures`` draws every figure that
applies to the checkpoint's method in one evaluation. The run is rebuilt as ``test
--ckpt_path`` rebuilds it: a checkpoint in ``runs/<run>/checkpoints/`` brings the run's own
``config.yaml`` (dataset, image size, evaluation settings, the run's ``figures`` settings),
and the other options of ``test`` still apply (``--data.root``, ``--evaluation.*``,
``--trainer.*``, ``--logger wandb`` to log the images to the run's W&B run). The split is
evaluated once (unless no chosen figure needs it) exactly as ``test`` evaluates it, without
writing the run's results; the figures go to ``runs/<run>/figures/`` by default::

    python -m benchmark analyze retrieval_grid --ckpt runs/<run>/checkpoints/last.ckpt
    python -m benchmark analyze figures --ckpt runs/<run>/checkpoints/last.ckpt --logger wandb
    python -m benchmark analyze embedding_map --method ms --out figs   # the untrained model of a recipe

Without ``--ckpt`` the model is the one ``fit`` would start from (recipe, ``--method``,
``--data``, ``--model.*``): the untrained or pretrained starting point.

The run is built by the same run builder as ``test`` (:func:`benchmark.app.builder.build_cli`
with ``run=False``), so the model, the data and the evaluation are exactly those of a ``test``;
only what ``test`` records is switched off (:func:`_prepare_callbacks`), so that drawing figures
never adds an evaluation to the run's ``metrics_test.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback

from benchmark.app.builder import build_cli
from benchmark.app.checkpoints import check_checkpoint_file, run_dir_of_checkpoint
from benchmark.core.contracts import FIGURES, register_analysis
from benchmark.core.errors import CLIError
from benchmark.engine.evaluation import RetrievalEvaluator
from benchmark.engine.figures import (
    FIGURES_DIR,
    FigureContext,
    FigureSettings,
    FigureWriter,
    applicable,
    draw_figures,
    log_images,
    selection_metric,
)
from benchmark.engine.wandb_logger import WandbResults

#: The :class:`~benchmark.engine.figures.FigureSettings` fields with a flag of their own (``--top-k``,
#: ``--max-points`` ...); a flag left out keeps the run's ``--figures.<field>``, else the default.
SETTINGS = ("top_k", "queries", "worst_queries", "max_classes", "max_points", "seed", "dpi")


def _parser(name: str, summary: str) -> argparse.ArgumentParser:
    """The options of ``analyze NAME`` itself; everything else is passed on to the run builder.

    Parsed with ``parse_known_args``: the unknown options are the ``test`` command's (``--data.root``,
    ``--evaluation.*``), so abbreviations are off: an option meant for ``test`` is never taken for
    a prefix of one of these.

    Args:
        name: the figure's name (or ``figures``), for the usage line.
        summary: the description ``--help`` shows.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmark analyze {name}", description=summary, allow_abbrev=False,
        epilog="Every other option goes to the test CLI: --data.root, --evaluation.*, --trainer.*, --logger wandb "
        "(log the images to the run's W&B run); without --ckpt, --method, --data and the fit options choose the model.",
    )
    parser.add_argument("--ckpt", type=Path, help="a checkpoint (runs/<run>/checkpoints/*.ckpt: the run's settings "
                        "apply); without it, the model fit would start from")
    parser.add_argument("--out", type=Path, help=f"output folder (default: runs/<run>/{FIGURES_DIR}/ of the checkpoint, "
                        f"else {FIGURES_DIR}/)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="the split evaluated (default test)")
    for option in SETTINGS:
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, dest=option,
                            help=f"figure setting {option} (default: the run's --figures.{option})")
    return parser


def figure_main(name: str, argv: list[str] | None = None) -> int:
    """``analyze NAME``: the registered figure ``NAME`` (called by the registry's figure command).

    The command line registers this function as the registry's figure runner
    (``registry.set_figure_runner``), so that the registry, a lower layer, can turn every figure
    into an ``analyze`` command without importing this module.

    Args:
        name: a registered figure (``benchmark.core.contracts.FIGURES``).
        argv: the arguments after the name (default ``sys.argv[1:]``).

    Returns:
        0 once the figure is drawn.
    """
    return run_figures([name], list(sys.argv[1:] if argv is None else argv))


@register_analysis("figures", "every figure that applies to a checkpoint's method (generic and its own), one evaluation")
def figures_main(argv: list[str] | None = None) -> int:
    """Every registered figure that applies to the checkpoint's method, from one evaluation."""
    return run_figures(None, list(sys.argv[1:] if argv is None else argv))


def _given(argv: list[str], name: str) -> bool:
    """Whether ``argv`` holds the option ``name`` (``--name VALUE`` or ``--name=VALUE``)."""
    return any(a == name or a.startswith(name + "=") for a in argv)


def _method_of(ckpt: Path) -> str | None:
    """The registered method name a checkpoint records (``load_method``'s key).

    Only needed for a checkpoint outside a run folder, which brings no ``config.yaml`` naming its
    method; every :class:`~methods.base.RetrievalMethod` writes ``method_name`` into its checkpoints.
    Returns None for a checkpoint without it (not written by a benchmark method).
    """
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    return checkpoint.get("method_name") if isinstance(checkpoint, dict) else None


def run_figures(names: list[str] | None, argv: list[str]) -> int:
    """Parse this command's options, rebuild the run, evaluate once if needed, draw ``names`` (all: None).

    Args:
        names: the figures to draw, or None for every figure that applies to the model's method.
        argv: this command's options (:func:`_parser`) followed by any ``test`` option.

    Returns:
        0 once the figures are written (their paths are printed, one per line).

    Raises:
        CLIError: the checkpoint is damaged, ``--method`` / ``--data`` / ``--recipe`` contradict a
            run's checkpoint, or the named figure is not drawn for the model's method.
    """
    figure = FIGURES[names[0]] if names else None
    parser = _parser(names[0] if names else "figures", figure.summary if figure else figures_main.__doc__ or "")
    args, rest = parser.parse_known_args(argv)
    # The scratch folder holds the run's config.yaml as rewritten for building (see _run_config).
    with tempfile.TemporaryDirectory(prefix="dml-analyze-") as scratch:
        return _run(names, args, rest, Path(scratch))


def _run(names: list[str] | None, args: argparse.Namespace, rest: list[str], scratch: Path) -> int:
    """:func:`run_figures` once its options are parsed: the run is built, evaluated and drawn.

    Args:
        names: as for :func:`run_figures`.
        args: this command's own options.
        rest: the options passed on to the run builder.
        scratch: a temporary folder, removed when the command ends.
    """
    figure = FIGURES[names[0]] if names else None
    cli_args = list(rest)
    run_dir = None
    if args.ckpt is not None:
        check_checkpoint_file(args.ckpt)
        run_dir = run_dir_of_checkpoint(str(args.ckpt))
        # Passed on, so that the builder loads the checkpoint's contents and refuses settings it was
        # not trained with, as for `test`; it is popped again before the parser sees it (run=False).
        cli_args = ["--ckpt_path", str(args.ckpt), *cli_args]
        own_config = _given(rest, "--config")
        if run_dir is not None and not own_config:
            for flag in ("--method", "--data", "--recipe"):
                if _given(rest, flag):
                    raise CLIError(f"{flag} cannot be combined with a run's checkpoint: the run's own config.yaml is "
                                   "used (pass --config FILE to use other settings).")
            cli_args = ["--config", str(_run_config(run_dir / "config.yaml", scratch)), *cli_args]
            print(f"[benchmark] config: {run_dir / 'config.yaml'} (the run that wrote the checkpoint)", file=sys.stderr)
        elif run_dir is None and not any(_given(rest, f) for f in ("--method", "--model", "--config")):
            method = _method_of(args.ckpt)  # a checkpoint outside a run: its method, the recipe of the data
            if method:
                cli_args += ["--method", method]
    # Beside the run's own after-test figures by default: a later analysis replaces them, as a test would.
    out = args.out or (run_dir / FIGURES_DIR if run_dir is not None else Path(FIGURES_DIR))
    # No logger unless asked: an analysis must not open a W&B run of its own by default.
    if not _given(rest, "--logger"):
        cli_args += ["--logger", "none"]
    # Without a run, the output folder is the builder's run folder: no runs/<new> folder is created.
    if run_dir is None and not _given(rest, "--run_dir"):
        cli_args += ["--run_dir", str(out)]
    cli = build_cli("test", cli_args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    method = str(getattr(model, "method_name", "") or type(model).__name__)
    figures = applicable(method, names)
    if names and not figures:
        raise CLIError(f"The figure {names[0]!r} is drawn for {', '.join(figure.methods)} runs; "
                       f"{args.ckpt or 'this model'} is {method}. `python -m benchmark analyze --help` lists the figures.")
    # The run's --figures settings (from its config.yaml), overridden by this command's flags.
    writer = cli._get(cli.config_init, "figures", default=None)
    base = writer.settings if isinstance(writer, FigureWriter) else FigureSettings()
    settings = dataclasses.replace(base, **{k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    evaluator = _prepare_callbacks(trainer, args.split)
    # Copied before the checkpoint's weights are loaded (by the evaluation below or _load_weights):
    # the model as initialised, for figures that compare the start and the end of training.
    initial = copy.deepcopy(model) if any(f.initial_model for f in figures) else None
    evaluation = None
    if any(f.evaluation for f in figures):
        evaluate = trainer.test if args.split == "test" else trainer.validate
        evaluate(model, datamodule=datamodule, ckpt_path=str(args.ckpt) if args.ckpt else None, verbose=False)
        evaluation = evaluator.last_evaluation
    elif args.ckpt is not None:  # no evaluation to load the weights: load them by hand
        _load_weights(model, args.ckpt)
    context = FigureContext(
        out_dir=out, evaluation=evaluation, model=model, datamodule=datamodule,
        run_dir=run_dir or (Path(cli.run_dir) if getattr(cli, "run_dir", None) else None), settings=settings,
        selection_metric=selection_metric(trainer, model), initial_model=initial, trainer=trainer,
    )
    # strict: a figure that fails is this command's error, unlike after a fit, where it only warns.
    results = draw_figures(figures, context, strict=True)
    paths = [p for r in results.values() for p in r.paths]
    log_images(trainer, paths)
    _finish_loggers(trainer)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _run_config(path: Path, scratch: Path) -> Path:
    """A copy of a run's config.yaml without the options of the command that wrote it
    (``ckpt_path``, ``weights_only``, ``verbose``): the run is rebuilt without running a command.

    Those keys belong to a subcommand's parser; the parser of a CLI built with ``run=False`` has
    no subcommand and would reject them as unknown options.

    Args:
        path: the run's ``config.yaml``.
        scratch: where the copy is written.

    Returns:
        The copy's path.
    """
    config = yaml.safe_load(path.read_text()) or {}
    for key in ("ckpt_path", "weights_only", "verbose"):
        config.pop(key, None)
    copy_path = scratch / "config.yaml"
    copy_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy_path


def _prepare_callbacks(trainer: Any, split: str) -> RetrievalEvaluator:
    """Evaluate as ``test`` does, but record nothing in the run: no results file, no config file,
    no results artifact, no figure writer (the figures are drawn here).

    Args:
        trainer: the trainer the run builder made (callbacks as for ``test``).
        split: ``"test"`` or ``"val"``: the stage whose evaluation the evaluator keeps in memory.

    Returns:
        The evaluator, whose ``last_evaluation`` holds the embeddings and metrics after the pass.
    """
    evaluator = next((c for c in trainer.callbacks if isinstance(c, RetrievalEvaluator)), None)
    if evaluator is None:
        evaluator = RetrievalEvaluator()
        trainer.callbacks.append(evaluator)
    evaluator.write_results, evaluator.print_table, evaluator.keep_stages = False, False, (split,)
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, (FigureWriter, WandbResults))]
    # LightningCLI's SaveConfigCallback would write config_test.yaml into the run folder at setup;
    # marking it saved is its own way of skipping that.
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            callback.already_saved = True
    return evaluator


def _load_weights(model: Any, ckpt: Path) -> None:
    """A checkpoint's weights into the model, as Lightning restores them (its hook, then the state).

    The hook comes first, as in Lightning: a method restores or resets what is not in its
    ``state_dict`` there (``reload_best``'s weights; Context-Refine drops its cached embeddings,
    which other weights would make stale). The load is strict, as Lightning's is by default.
    """
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])


def _finish_loggers(trainer: Any) -> None:
    """Finish a W&B run the analysis opened, so that its images are in the run's files now.

    ``logger._experiment`` is checked instead of ``logger.experiment``, which would start a W&B
    run only to finish it.
    """
    from lightning.pytorch.loggers import WandbLogger

    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
