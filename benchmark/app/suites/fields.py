"""The checks of a suite file's fields: mappings, lists, options, durations and resources, all problems at once.

:func:`benchmark.app.suites.spec.load_suite` reads the file through these, collecting every problem
in a :class:`_Problems` (the file, then one line per problem) so that a user fixes them in one go,
each naming where in the file it is (``grid.methods``, ``cells.method=ms.resources``) and the fix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.core.errors import UserError

RESOURCE_KEYS = ("devices", "num_nodes", "accelerator", "precision", "time", "cpus_per_task", "mem_gb")
# Set by the grid, the cell's folder or the launcher: not options a suite may give. Each value
# says where the setting comes from instead; the message quotes it.
RESERVED = {
    "method": "grid.methods", "data": "grid.datasets", "backbone": "grid.backbones",
    "seed_everything": "grid.seeds", "run_dir": "the suite (<output>/<cell id>)",
    "ckpt_path": "the suite (it resumes interrupted cells itself)", "plugin": "plugins: at the top of the file",
    "print_config": "suite run --dry-run", "help": "python -m benchmark fit --help",
}
# A fit option as the command line writes it without the dashes: dotted Python identifiers.
_OPTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SuiteError(UserError):
    """A problem with a suite file or the suite command line: printed without a traceback, exit 2."""


@dataclass(frozen=True)
class Resources:
    """What one run needs. ``devices`` / ``num_nodes`` / ``accelerator`` / ``precision`` become
    trainer options of the cell; ``time`` (minutes) stops a serial run with SIGTERM (resumable)
    and is the SLURM time limit; ``cpus_per_task`` / ``mem_gb`` are for the launchers.

    Frozen, hence hashable: the submitit launcher groups the cells of a stage by their
    resources, one job array per distinct value. ``None`` means "not given": the trainer's or
    the launcher's default applies.

    Attributes:
        devices: devices per node (``--trainer.devices``; GPUs per SLURM node), an integer
            >= 1 or ``"auto"``.
        num_nodes: nodes of one run (``--trainer.num_nodes``; SLURM ``--nodes``).
        accelerator: ``--trainer.accelerator`` (``cpu`` also means: no GPUs for the job).
        precision: ``--trainer.precision``.
        time: the time limit in minutes.
        cpus_per_task: CPUs per task for submitit.
        mem_gb: memory per node in GB for submitit.
    """

    devices: int | str | None = None
    num_nodes: int | None = None
    accelerator: str | None = None
    precision: str | None = None
    time: float | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None


class _Problems:
    """Every problem found in a suite file, reported together before anything runs.

    The loading and validation functions record into one instance instead of raising, so a
    file with five mistakes gets one message listing five, each naming its key or cell.
    ``items`` is public: a caller may look at the first problem itself (``run-cell``'s
    ``--wait-needs``) instead of raising them all.
    """

    def __init__(self, path: Path) -> None:
        """Collect the problems of the suite file at ``path`` (named in the message)."""
        self.path, self.items = path, []

    def add(self, message: str) -> None:
        """Record one problem; a message already recorded (the same mistake in many cells) is kept once."""
        if message not in self.items:
            self.items.append(message)

    def raise_if_any(self) -> None:
        """Raise the problems found so far as one SuiteError, if any.

        Called between the loading steps whose later checks would only repeat an earlier
        problem (e.g. a selector over cells a broken grid could not produce).

        Raises:
            SuiteError: one problem on one line, several as a list ("no cell was started").
        """
        if not self.items:
            return
        if len(self.items) == 1:
            raise SuiteError(f"{self.path}: {self.items[0]}")
        lines = "\n".join(f"  - {item}" for item in self.items)
        raise SuiteError(f"{self.path}: {len(self.items)} problems, no cell was started:\n{lines}")


def _unknown_keys(where: str, given: Iterable[str], allowed: Iterable[str], problems: _Problems) -> None:
    """Report every key of ``given`` that is not in ``allowed``, with the closest valid key.

    ``where`` names the section (``the suite file``, ``grid[1]``, ``slurm``) in the message.
    """
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            problems.add(f"unknown key {key!r} in {where}. {hint}Valid keys: {', '.join(allowed)}.")


def _mapping(value: Any, where: str, problems: _Problems) -> dict[str, Any]:
    """``value`` as a mapping: ``None`` (an empty YAML section) is ``{}``; anything else is a problem."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(f"{where} must be a mapping (key: value), not {type(value).__name__} {value!r}.")
        return {}
    return value


def _list(value: Any, where: str, problems: _Problems, hint: str) -> list[Any] | None:
    """``value`` as a list: a scalar is a list of one (``seeds: 0``), ``None`` stays None (absent).

    An empty list is a problem (``hint`` says what to write instead), never an empty axis: it
    would silently give a grid without cells.
    """
    if value is None:
        return None
    if not isinstance(value, list):
        value = [value]
    if not value:  # after the scalar case: an empty string is a list of one, not empty
        problems.add(f"{where} is an empty list: {hint}.")
        return None
    return value


def _options(value: Any, where: str, problems: _Problems, resources_allowed: bool = False) -> dict[str, Any]:
    """``{option: value}`` of fit options; keys may be written with or without ``--``.

    Refused, as problems: a key that is no option name, an option the suite sets itself
    (:data:`RESERVED`), and a bare ``model`` / ``trainer`` (the class comes from the grid,
    only its sub-options may be given). ``resources_allowed``: a ``cells:`` entry, which may
    also hold a ``resources`` mapping, returned under that key for the caller to apply.
    """
    out: dict[str, Any] = {}
    for key, item in _mapping(value, where, problems).items():
        # Written as on the command line or without the dashes: both name the same option.
        name = str(key)[2:] if str(key).startswith("--") else str(key)
        if resources_allowed and name == "resources":
            out[name] = item
            continue
        if not _OPTION.match(name):
            problems.add(f"{where}: {key!r} is not an option name (write it as in `fit`, e.g. trainer.max_epochs).")
            continue
        if name in RESERVED:
            problems.add(f"{where}: --{name} is set by {RESERVED[name]}, not by an option.")
            continue
        if name == "data" or name == "model" or name == "trainer":
            problems.add(f"{where}: {name!r} needs a sub-option ({name}.X); the class is chosen by the grid.")
            continue
        out[name] = item
    return out


def _minutes(value: Any, where: str, problems: _Problems) -> float | None:
    """``90``, ``"90m"``, ``"4h"``, ``"1-12:00:00"``, ``"2:30:00"`` as minutes.

    The colon forms follow SLURM's ``--time``: ``MM:SS``, ``HH:MM:SS``, ``D-HH:MM:SS``; a
    number is minutes and must be positive; a unit may also be ``s`` or ``d``. Returns None
    when ``value`` is None, or after recording a problem when it is not a duration.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)  # a number and a unit: 90m, 1.5h
    if match:
        return float(match.group(1)) * {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}[match.group(2)]
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", text)
    if match:
        # Two fields are MM:SS, three HH:MM:SS (SLURM's reading), with an optional D- prefix.
        days, a, b, c = match.groups()
        hours, minutes, seconds = (int(a), int(b), int(c)) if c is not None else (0, int(a), int(b))
        return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60
    problems.add(f"{where} = {value!r} is not a duration: give minutes (90), '90m', '4h' or 'D-HH:MM:SS'.")
    return None


def _resources(value: Any, where: str, problems: _Problems, base: Resources | None = None) -> Resources:
    """The ``resources:`` mapping at ``where`` as :class:`Resources`, on top of ``base``.

    ``base`` is what the cell had so far: a ``cells:`` entry's resources change only the keys
    it names. Invalid values are recorded as problems (the suite does not load).
    """
    raw = _mapping(value, where, problems)
    _unknown_keys(where, raw, RESOURCE_KEYS, problems)
    # Start from base's fields and replace those given: Resources is frozen, so a new one.
    fields = dict(vars(base)) if base is not None else {}
    for key in ("num_nodes", "cpus_per_task"):
        if key in raw:
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                problems.add(f"{where}.{key} must be a positive integer, not {raw[key]!r}.")
            else:
                fields[key] = raw[key]
    if "devices" in raw:
        # "auto" is the trainer's own value; the launchers then request no GPUs for the job.
        devices = raw["devices"]
        if not ((isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1) or devices == "auto"):
            problems.add(f"{where}.devices must be a positive integer or 'auto', not {devices!r}.")
        else:
            fields["devices"] = devices
    for key in ("accelerator", "precision"):
        if key in raw:
            fields[key] = str(raw[key])
    if "mem_gb" in raw:
        if not isinstance(raw["mem_gb"], (int, float)) or isinstance(raw["mem_gb"], bool) or raw["mem_gb"] <= 0:
            problems.add(f"{where}.mem_gb must be a positive number, not {raw['mem_gb']!r}.")
        else:
            fields["mem_gb"] = float(raw["mem_gb"])
    if "time" in raw:
        fields["time"] = _minutes(raw["time"], f"{where}.time", problems)
    return Resources(**fields)


def _closest(name: str, known: Iterable[str]) -> str:
    """`` Did you mean X?`` for the closest of ``known`` to a misspelt ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(close)}?" if close else ""
