"""The short flags of ``fit`` / ``validate`` / ``test`` and the recipes: what runs before LightningCLI parses.

Users type ``--method NAME``, ``--data NAME``, ``--backbone NAME`` (and ``--backbone.X``), ``--recipe``,
``--logger``, ``--run_dir``, ``--figures`` and ``--plugin``; :func:`rewrite_args` turns them into
LightningCLI arguments (class paths, the recipe ``configs/<method>/<data>.yaml`` as a ``--config``)
and checks the files they name (a config, a checkpoint and the run that wrote it) before anything
heavy happens. Nothing else is pre-parsed: every other option is LightningCLI's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from benchmark.app.checkpoints import (
    check_against_run,
    check_checkpoint_file,
    check_config_file,
    checkpoint_contents,
    run_dir_of_checkpoint,
    stored_config_file,
)
from benchmark.core import registry
from benchmark.core.defaults import CONFIG_DIR, DEFAULT_DATA, DEFAULT_METHOD
from benchmark.core.errors import CLIError
from benchmark.engine.training import (
    CONFIG_KEY,
)

#: The ``--logger`` choices; ``wandb`` (online when logged in, else offline) is the logger of record.
LOGGERS = ("wandb", "csv", "tensorboard", "none")
ENV_FIGURES = "DML_BENCHMARK_FIGURES"  # "false": no figures after a test unless --figures[.*] is given



# ---------------------------------------------------------------------------- argv handling
def pop_option(argv: list[str], name: str, repeat: bool = False) -> list[str]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` occurrences from argv; return the values.

    The short flags are consumed here so that LightningCLI's parser never sees them (it would
    reject them as unknown options). ``--name.X`` (e.g. ``--backbone.pool``) is a different option
    and stays in ``argv``.

    Args:
        argv: the command line, changed in place.
        name: the option, with its dashes (``--method``).
        repeat: whether the option may be given more than once (``--plugin``).

    Returns:
        The values in the order given (empty when the option is absent).

    Raises:
        CLIError: the option is last with no value, or given twice when ``repeat`` is False.
    """
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
    """Whether ``argv`` gives ``name`` in any form: ``--name``, ``--name=V`` or a nested ``--name.X``."""
    return any(a == name or a.startswith(name + "=") or a.startswith(name + ".") for a in argv)


def _option_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in argv (the last one), without removing it."""
    values = _option_values(argv, name)
    return values[-1] if values else None




def _option_values(argv: list[str], name: str) -> list[str]:
    """Every value of ``--name VALUE`` / ``--name=VALUE`` in argv, in order.

    A trailing ``--name`` without a value is skipped: the parser reports it later, in its words.
    """
    values = []
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
    return values


def resolve_recipe(method: str, data: str, recipe: str | None) -> Path | None:
    """The recipe for (method, data): explicit path, ``none``, or configs/<method>/<data>.yaml.

    A missing recipe for a pair is not an error (a new method or dataset has none yet): the
    constructors' defaults apply, and a line on stderr says so.

    Args:
        method: the registered method name.
        data: the registered dataset name.
        recipe: ``--recipe`` as given: None or ``auto`` (the pair's recipe), ``none`` (no recipe)
            or a path.

    Returns:
        The recipe file to apply, or None.

    Raises:
        CLIError: ``--recipe PATH`` does not exist, or no recipe is installed at all.
    """
    if recipe == "none":
        return None
    if recipe not in (None, "auto"):
        path = Path(recipe)
        if not path.is_file():
            raise CLIError(f"Recipe {recipe} does not exist.")
        return path
    # No recipe for any pair means a broken installation (the wheel ships them as package data), not
    # a pair without one: silently training with the constructors' defaults would mislead.
    if not any(CONFIG_DIR.glob("*/*.yaml")):
        raise CLIError(
            f"No recipes are installed ({CONFIG_DIR} holds no <method>/<data>.yaml): the installation is "
            "incomplete. Reinstall the package (pip install --force-reinstall dml-benchmark), or pass --recipe none."
        )
    path = CONFIG_DIR / method / f"{data}.yaml"
    if not path.is_file():
        print(f"[benchmark] no recipe for {method} on {data}: the constructors' defaults apply", file=sys.stderr)
        return None
    return path


def rewrite_args(argv: list[str], subcommand: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """Turn the short flags into LightningCLI arguments; return (argv, run info).

    ``test`` / ``validate`` with ``--ckpt_path`` of a run's checkpoint evaluate what was
    trained: the run's own saved ``config.yaml`` (data, protocol, image size, evaluation
    settings) replaces the recipe, and explicit options still override it.

    The arguments LightningCLI receives are, in order (a later one wins): ``--model CLASS`` and
    ``--data CLASS`` of the registered names, the recipe, the run's configuration, the backbone
    name, then the user's own arguments. The files named (configs, checkpoints) are checked here,
    before anything is built.

    Args:
        argv: the arguments after the subcommand, short flags included.
        subcommand: ``fit``, ``validate``, ``test``, or None for a run built without one.

    Returns:
        The LightningCLI arguments and the run info: ``method`` / ``data`` (registered names, or
        None when a class path or a configuration gives them), ``recipe`` (the applied recipe or
        None), ``logger``, ``logger_default`` (``--logger`` was not given), ``run_dir``
        (``--run_dir`` or None), ``run_config`` (the configuration of a checkpoint's run, or None),
        ``ckpt_path``, ``command`` and ``checkpoint`` (:func:`~benchmark.app.checkpoints.checkpoint_contents`
        for ``test`` / ``validate`` of a checkpoint file, else None).

    Raises:
        CLIError: an unknown method, dataset or logger, a bad ``--figures`` value, a missing or
            damaged file, or flags that contradict the checkpoint's run.
        PluginError: a ``--plugin`` module cannot be imported.
    """
    argv = list(argv)
    # Plugins first: the names --method and --data look up may be theirs.
    registry.discover(pop_option(argv, "--plugin", repeat=True))
    methods = pop_option(argv, "--method")
    datas = pop_option(argv, "--data")
    recipe = (pop_option(argv, "--recipe") or [None])[0]
    loggers = pop_option(argv, "--logger")
    logger = (loggers or ["wandb"])[0]
    run_dir = (pop_option(argv, "--run_dir") or [None])[0]
    figures = pop_option(argv, "--figures")  # the short form of --figures.enabled
    if not figures and not _has_option(argv, "--figures") and os.environ.get(ENV_FIGURES, "").lower() == "false":
        figures = ["false"]  # $DML_BENCHMARK_FIGURES=false: off unless the command line asks for them
    if figures:
        if figures[0].lower() not in ("true", "false"):
            raise CLIError(f"--figures takes true or false (got {figures[0]!r}); --figures.<option> sets the figures.")
        argv.append(f"--figures.enabled={figures[0].lower()}")
    if logger not in LOGGERS:
        raise CLIError(f"Unknown logger {logger!r}. Choose one of: {', '.join(LOGGERS)}.")
    backbone = pop_option(argv, "--backbone")
    # --backbone.X is shorthand for the model's backbone options (the parser only knows --model.backbone.X).
    argv = [a.replace("--backbone.", "--model.backbone.", 1) if a.startswith("--backbone.") else a for a in argv]
    user_config = _has_option(argv, "--config")
    for value in _option_values(argv, "--config"):
        check_config_file(Path(value).expanduser())
    # Lightning's symbolic --ckpt_path values name no file: there is nothing to check or read.
    ckpt_path = _option_value(argv, "--ckpt_path")
    if ckpt_path not in (None, "best", "last", "hpc", "registry"):
        check_checkpoint_file(Path(ckpt_path).expanduser())
    run_config = None
    stored = None  # what the checkpoint says about itself: its step, model hyper-parameters, configuration
    if subcommand in ("test", "validate") and ckpt_path not in (None, "best", "last", "hpc", "registry"):
        stored = checkpoint_contents(Path(ckpt_path).expanduser())
    if stored is not None and not user_config:
        # The settings the checkpoint was trained with: its run's config.yaml, else the configuration
        # stored inside the checkpoint (a run folder that lost its config.yaml, a copied checkpoint).
        source = run_dir_of_checkpoint(ckpt_path)
        if source is not None and (source / "config.yaml").is_file():
            run_config = source / "config.yaml"
        elif stored.get(CONFIG_KEY):
            run_config = stored_config_file(str(stored[CONFIG_KEY]))
        elif not datas:
            raise CLIError(
                f"{ckpt_path} does not carry its run's configuration (a checkpoint written before it was stored) "
                "and no config.yaml lies in its run folder, so the data and evaluation settings it was trained with "
                "are unknown. Pass its run's config.yaml with --config, or name the data with --data NAME and its options."
            )
        if run_config is not None:
            check_against_run(run_config, ckpt_path, methods, datas)
            methods, datas, user_config = [], [], True
            if recipe not in (None, "auto", "none"):
                raise CLIError("--recipe cannot be combined with a run's checkpoint: the run's own config.yaml is used.")

    # The defaults fill in only what nothing else names: a --model class path or a user's --config
    # may choose the method and the data themselves.
    prefix: list[str] = []
    method = methods[0] if methods else None
    model_given = any(a in ("--model", "--model.class_path") or a.startswith(("--model=", "--model.class_path=")) for a in argv)
    if method is None and not model_given and not user_config:
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
    # The automatic recipe needs both names and no --config of the user's (which replaces it); an
    # explicit --recipe PATH applies in any case, before the user's --config.
    recipe_path = None
    if not user_config and method is not None and data is not None:
        recipe_path = resolve_recipe(method, data, recipe)
    elif recipe not in (None, "auto", "none"):
        recipe_path = resolve_recipe(method or "", data or "", recipe)
    if recipe_path is not None:
        prefix += ["--config", str(recipe_path)]
    if run_config is not None:
        prefix += ["--config", str(run_config)]
    if backbone:
        prefix += ["--model.backbone.name", backbone[0]]
    info = {
        "method": method, "data": data, "recipe": recipe_path, "logger": logger, "run_dir": run_dir,
        "run_config": run_config, "ckpt_path": ckpt_path, "command": subcommand, "logger_default": not loggers,
        "checkpoint": stored,
    }
    return prefix + argv, info


