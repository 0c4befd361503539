"""A checkpoint and the run that wrote it: its file checked, its contents read, its settings enforced.

``test`` / ``validate`` / ``fit --ckpt_path`` go through these before anything is built: a checkpoint
whose bytes changed is refused (CRC-32 of every tensor), and a checkpoint is evaluated with the
settings it was trained with (its run's config.yaml, else the configuration stored inside it),
so that a later evaluation never mixes one run's weights with another's data or model settings.

Every check raises :class:`~benchmark.core.errors.CLIError` naming the file and the fix: the
command line reports it in one paragraph with exit code 2, before a model is built or data read.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import yaml

from benchmark.core import registry
from benchmark.core.errors import CLIError
from benchmark.core.results import BOOKKEEPING, RUN_RECORDS, comparison_config, flatten_config
from benchmark.engine.training import CONFIG_KEY


def run_dir_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """The run directory a checkpoint belongs to: ``<run>/checkpoints/x.ckpt`` where ``<run>`` holds a
    run's records (its config.yaml, status.json or metrics files).

    A ``.ckpt`` copied anywhere else belongs to no run: it is evaluated with the configuration
    stored inside it, and its results are not appended to anyone's records.

    Args:
        ckpt_path: ``--ckpt_path`` as given (``~`` expanded here), or None. Lightning's symbolic
            values (``best``, ``last``, ``hpc``, ``registry``) name no file and belong to no run.
    """
    if not ckpt_path or ckpt_path in ("best", "last", "hpc", "registry"):
        return None
    path = Path(ckpt_path).expanduser()
    run = path.parent.parent
    return run if path.parent.name == "checkpoints" and any((run / name).is_file() for name in RUN_RECORDS) else None


def checkpoint_contents(path: Path) -> dict[str, Any]:
    """What a checkpoint says about itself without loading its weights into memory (torch memory-maps
    the tensors): ``global_step``, ``epoch``, the model's ``hyper_parameters`` and the run's stored
    configuration (``benchmark_config``, absent in checkpoints written before it was recorded).

    Returns:
        ``{"global_step", "epoch", "hyper_parameters", "benchmark_config"}``, each None when the
        checkpoint lacks it.

    Raises:
        CLIError: torch cannot load the file, or it holds something other than a dict.
    """
    # torch is imported on first use: run_dir_of_checkpoint and the file checks stay light.
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a file check_checkpoint_file let through but torch cannot read
        raise CLIError(f"Checkpoint {path} cannot be read by torch ({type(err).__name__}: {err}).") from None
    if not isinstance(checkpoint, dict):
        raise CLIError(f"Checkpoint {path} is not a Lightning checkpoint (a {type(checkpoint).__name__}).")
    return {k: checkpoint.get(k) for k in ("global_step", "epoch", "hyper_parameters", CONFIG_KEY)}


def check_checkpoint_file(path: Path) -> None:
    """Fail fast, naming the file, if a checkpoint is missing, truncated or corrupted.

    torch checkpoints are zip archives whose directory sits at the end of the file (a truncated copy
    does not open) and which record a CRC-32 of every member (a corrupted byte is found by checking
    them), all without unpickling anything.

    Raises:
        CLIError: the file does not exist, is not a zip archive nor a legacy pickle, cannot be
            read, or a member's bytes do not match their CRC-32.
    """
    import zipfile

    if not path.is_file():
        raise CLIError(f"Checkpoint {path} (--ckpt_path) does not exist. Pass a .ckpt from a run's checkpoints/ folder.")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                # Every member's CRC-32 against its bytes (torch.save records them): a flipped byte inside
                # a tensor loads without complaint and evaluates as different weights. It reads the file
                # once (about 1 s per GB from a local disk).
                bad = archive.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"the bytes of {bad} do not match their CRC-32: the file is corrupted")
        else:
            with open(path, "rb") as f:
                if f.read(1) != b"\x80":  # not a zip archive, not a legacy pickle either
                    raise zipfile.BadZipFile("neither a zip archive nor a pickle")
    except (zipfile.BadZipFile, OSError) as err:
        raise CLIError(
            f"Checkpoint {path} (--ckpt_path) is damaged or truncated ({err}). Use another checkpoint of the run "
            "(checkpoints/best-*.ckpt or last.ckpt) or copy it again."
        ) from None


def check_config_file(path: Path) -> None:
    """A ``--config`` file must be YAML whose top level maps sections (``trainer:``, ``model:`` ...): say
    which file and line is wrong before the parser reports "<unicode string>" or a bare "Unexpected config".

    Only the shape is checked here; option names and values are the parser's business.

    Raises:
        CLIError: the file does not exist, is not valid YAML (with the line, the column and a hint
            when the line holds a tab), or its top level is not a mapping.
    """
    if not path.is_file():
        raise CLIError(f"--config {path} does not exist.")
    text = path.read_text(errors="replace")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        hint = " YAML indents with spaces; this line holds a tab." if "\t" in line else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CLIError(f"--config {path}{where}: not valid YAML ({problem}).{hint}") from None
    if config is not None and not isinstance(config, dict):
        raise CLIError(
            f"--config {path}: the top level is a {type(config).__name__}; a config maps sections to options "
            "(trainer:, model:, data:, ...), as `fit --print_config` prints it."
        )


def stored_config_file(text: str) -> Path:
    """The configuration stored in a checkpoint, as a YAML file LightningCLI can read (removed at exit).

    LightningCLI takes configurations as files (``--config PATH``), so the YAML text stored in the
    checkpoint is written to a temporary file. It must outlive this call: the parser reads it
    later, while the run is built, hence the removal at interpreter exit instead of a ``with``.
    """
    import atexit
    import tempfile

    handle, name = tempfile.mkstemp(prefix="dml-benchmark-ckpt-config-", suffix=".yaml")
    with os.fdopen(handle, "w") as f:
        f.write(text)
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    return Path(name)


#: Model options whose value a checkpoint's weights replace or the data fills in: they may differ.
_NOT_COMPARED = {"model.num_classes", "model.image_size", "model.backbone.weights", "model.backbone.pretrained"}


def _same(a: Any, b: Any) -> bool:
    """Whether two option values are equal as configuration: same JSON (tuples and lists alike,
    mappings in any key order, other objects by their ``str``), or equal in Python."""
    import json

    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) or a == b


def check_checkpoint_settings(config: dict[str, Any], stored: dict[str, Any], ckpt_path: str, own_run_dir: bool) -> None:
    """Refuse to evaluate a checkpoint under settings it was not trained with (exit 2).

    The model's options must be the checkpoint's own (its ``hyper_parameters``): other options build
    another model, into which the weights load partly or not at all. With the run's configuration
    stored in the checkpoint, the data settings that change a result must match as well, unless the
    evaluation is recorded in a run folder of its own (``--run_dir``): it would otherwise be appended to
    the checkpoint's run as if that run had produced it.

    Options that the weights replace or the data fills in (:data:`_NOT_COMPARED`) may differ, and
    so may data options that never change a result (``data.root``, workers: ``results.BOOKKEEPING``).

    Args:
        config: this command's resolved configuration (``BenchmarkCLI.resolved_config``).
        stored: what the checkpoint says about itself (:func:`checkpoint_contents`).
        ckpt_path: the checkpoint as given, for the message.
        own_run_dir: the evaluation is recorded in the checkpoint's own run folder (no ``--run_dir``
            elsewhere): the data settings are compared too.

    Raises:
        CLIError: a compared option differs; the message lists up to six of them, trained value
            against given value.
    """
    given = flatten_config(config)
    hparams = dict(stored.get("hyper_parameters") or {})
    # Keys with a leading underscore are LightningCLI's bookkeeping (`_class_path`, `_instantiator`), not
    # constructor arguments; the class path is compared under the name the configuration gives it.
    trained = flatten_config({"model": {"init_args": {k: v for k, v in hparams.items() if not str(k).startswith("_")}}})
    if hparams.get("_class_path"):
        trained["model.class_path"] = hparams["_class_path"]
    differences = [(k, v, given[k]) for k, v in sorted(trained.items())
                   if k in given and k not in _NOT_COMPARED and not _same(v, given[k])]  # fmt: skip
    # The data settings are only known when the run's configuration travels in the checkpoint; older
    # checkpoints are checked on the model options alone.
    if stored.get(CONFIG_KEY) and own_run_dir:
        with contextlib.suppress(yaml.YAMLError, AttributeError):
            run = comparison_config(yaml.safe_load(str(stored[CONFIG_KEY])) or {})
            mine = comparison_config(config)
            differences += [(k, run[k], mine.get(k)) for k in sorted(run) if k.startswith("data.")
                            and not _same(run[k], mine.get(k)) and k not in BOOKKEEPING]  # fmt: skip
    if differences:
        shown = "; ".join(f"{k}: trained with {v!r}, given {g!r}" for k, v, g in differences[:6])
        more = f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""
        raise CLIError(
            f"{ckpt_path} was trained with other settings than this command gives: {shown}{more}. A checkpoint "
            "is evaluated with the settings it was trained with: leave --config and the options out to use its "
            "run's config.yaml (or the configuration stored in the checkpoint), or, for a deliberate evaluation "
            "under other data settings, record it in a folder of its own with --run_dir NEW."
        )


def _config_class(config_path: Path, section: str) -> str | None:
    """The ``class_path`` of a section (``model``, ``data``) of a YAML configuration, or None."""
    with open(config_path) as f:
        config = yaml.safe_load(f) or {}
    value = (config.get(section) or {}).get("class_path") if isinstance(config.get(section), dict) else None
    return str(value) if value else None


def check_against_run(run_config: Path, ckpt_path: str, methods: list[str], datas: list[str]) -> None:
    """``--method`` / ``--data`` given with a run's checkpoint must name what the run trained.

    The run's own ``config.yaml`` replaces the short flags, so a flag that names something else
    would be silently ignored; it is refused instead.

    Args:
        run_config: the run's ``config.yaml`` (or the configuration stored in the checkpoint).
        methods: the ``--method`` values given (a registered name or a class path), maybe none.
        datas: the ``--data`` values given, likewise.

    Raises:
        CLIError: a flag names another class than the run's configuration.
        UnknownNameError: a flag names nothing registered.
    """
    for flag, given, section, lookup in (
        ("--method", methods, "model", registry.get_method),
        ("--data", datas, "data", registry.get_dataset),
    ):
        if not given:
            continue
        # A dotted value is a class path already (as a config names it); a plain one a registered name.
        wanted = given[0] if "." in given[0] else registry.class_path(lookup(given[0]))
        trained = _config_class(run_config, section)
        if trained and wanted != trained:
            raise CLIError(
                f"{flag} {given[0]} differs from the run that wrote {ckpt_path} ({trained}). "
                f"Leave {flag} out to evaluate the run as trained, or pass --config FILE to use other settings."
            )
