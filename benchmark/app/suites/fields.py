"""The suite file's schema: typed dataclasses for its sections, parsed by jsonargparse, all problems at once.

A suite file (docs/leaderboard.md, "The file format") is described by :class:`SuiteFile` and the
classes of its sections (:class:`GridSpec`, :class:`Resources`, :class:`SlurmSpec`,
:class:`Reproduces`): each field's type carries its constraint (``PositiveInt``, ``Literal["auto"]``,
``int | list[int]`` for "a scalar is a list of one", :class:`Minutes` for durations), and
jsonargparse adapts every value to its type (:func:`_parse_fields`). The keys a section accepts
are its class's fields (``SUITE_KEYS`` ... are derived from them), so a key is declared once.

:func:`benchmark.app.suites.spec.load_suite` parses the file section by section (each grid,
each ``resources:`` mapping, ``slurm:``, each ``reproduces:`` entry) and field by field,
collecting every problem in a :class:`_Problems` (the file, then one line per problem) so that
a user fixes them in one go; each names where in the file it is (``grid.seeds[1]``,
``cells['method=ms'].resources.time``) and what to write instead, from the field's own
description. What is not a type (registered names, reserved options, selectors, duplicates)
is checked by the loader on the typed values.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt, register_type

from benchmark.core.errors import UserError

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
# The smallest useful grid, quoted by the messages about a missing or empty grid.
GRID_EXAMPLE = "grid: {methods: [ms], datasets: [cub], seeds: [0, 1, 2]}"
# What a duration may be, quoted by every message about one (resources.time, --wait-needs).
DURATION = "a duration: give minutes (90), '90m', '4h' or 'D-HH:MM:SS'"
_Section = TypeVar("_Section")


class SuiteError(UserError):
    """A problem with a suite file or the suite command line: printed without a traceback, exit 2."""


# ---------------------------------------------------------------------------- value types
# Three types of the file's own, registered with jsonargparse so that it adapts a value to them
# as it adapts one to int: the deserializer gets the YAML value and returns the Python one
# (plain float, str and dict, so that nothing of jsonargparse is pickled into a submitit job).
# Registering concerns only these classes, which only this module's fields use.
class Minutes(float):
    """A duration in minutes, read from ``90``, ``"90m"``, ``"4h"``, ``"1-12:00:00"`` (:func:`_to_minutes`)."""


class Text(str):
    """A text value; a YAML number is taken as its text (``precision: 32``, ``row: 6``), a boolean is refused.

    ``str`` alone would refuse ``precision: 32``, which YAML reads as a number."""


class YamlMapping(dict):  # type: ignore[type-arg]
    """A mapping kept exactly as YAML read it: fit options, selectors, a section parsed by its own class.

    Its values are not adapted (``dict[str, Any]`` would read the string ``"{output}"`` as a
    mapping and ``"yes"`` as true): the fit's own parser checks options (validation.py), and the
    sections are parsed field by field by their classes (:func:`_parse_fields`)."""


def _to_minutes(value: Any) -> float:
    """``90``, ``"90"``, ``"90m"``, ``"4h"``, ``"1-12:00:00"``, ``"2:30:00"`` as minutes.

    The colon forms follow SLURM's ``--time``: ``MM:SS``, ``HH:MM:SS``, ``D-HH:MM:SS``; a
    number is minutes and must be positive; a unit may also be ``s`` or ``d``.

    Raises:
        ValueError: ``value`` is no duration (a boolean, a number <= 0, other text).
    """
    if isinstance(value, bool):  # YAML's yes / true: an int to Python, never a duration
        raise ValueError(f"{value!r} is not a duration")
    text = str(value).strip()
    if isinstance(value, (int, float)) or re.fullmatch(r"\d+(?:\.\d+)?", text):
        if float(text) > 0:
            return float(text)
        raise ValueError(f"{value!r} is not a positive number of minutes")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)  # a number and a unit: 90m, 1.5h
    if match:
        return float(match.group(1)) * {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}[match.group(2)]
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", text)
    if match:
        # Two fields are MM:SS, three HH:MM:SS (SLURM's reading), with an optional D- prefix.
        days, a, b, c = match.groups()
        hours, minutes, seconds = (int(a), int(b), int(c)) if c is not None else (0, int(a), int(b))
        return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60
    raise ValueError(f"{value!r} is not a duration")


def _to_text(value: Any) -> str:
    """A YAML scalar as text (:class:`Text`); raises ValueError for a boolean, a list or a mapping."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{value!r} is not text")
    return str(value)


def _to_mapping(value: Any) -> dict[str, Any]:
    """The YAML mapping itself (:class:`YamlMapping`); raises ValueError for anything else."""
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is not a mapping")
    return value


register_type(Minutes, serializer=float, deserializer=_to_minutes)
register_type(Text, serializer=str, deserializer=_to_text)
register_type(YamlMapping, serializer=dict, deserializer=_to_mapping)


def _field(expect: str, *, item: str | None = None, empty: str | None = None, required: bool = False) -> Any:
    """A schema field (default None unless ``required``) and what its messages say.

    Args:
        expect: what the value must be, as "<where> = <value> is not <expect>." completes it.
        item: the same for one entry of a list or mapping value, named ``<where>[i]``.
        empty: for a field that takes a list, the fix for an empty one (an empty list is then a
            problem: it would silently give no cell); None accepts it.
        required: no default: a section without the key is reported (the class's ``REQUIRED``).
    """
    meta = {"expect": expect, "item": item or expect, "empty": empty}
    return field(metadata=meta) if required else field(default=None, metadata=meta)


# ---------------------------------------------------------------------------- the schema
# A field typed `X | list[X]` holds a list once parsed: a scalar is a list of one (seeds: 0).
@dataclass(frozen=True)
class Resources:
    """``resources:`` (of the file, or of a ``cells:`` entry): what one run needs.

    ``devices`` / ``num_nodes`` / ``accelerator`` / ``precision`` become trainer options of the
    cell; ``time`` (minutes) stops a run on this machine with SIGTERM (resumable) and is the SLURM time
    limit; ``cpus_per_task`` / ``mem_gb`` are for the launchers.

    Frozen, hence hashable: the submitit launcher groups the cells of a stage by their
    resources, one job array per distinct value (and pickles them into the jobs). ``None``
    means "not given": the trainer's or the launcher's default applies.

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

    devices: PositiveInt | Literal["auto"] | None = _field("a positive integer or 'auto'")
    num_nodes: PositiveInt | None = _field("a positive integer")
    accelerator: Text | None = _field("text, e.g. gpu or cpu")
    precision: Text | None = _field("text, e.g. 32-true or bf16-mixed")
    time: Minutes | None = _field(DURATION)
    cpus_per_task: PositiveInt | None = _field("a positive integer")
    mem_gb: PositiveFloat | None = _field("a positive number (GB)")


@dataclass(frozen=True)
class GridSpec:
    """One ``grid:`` (or one entry of a list of grids): the axes whose product is the cells.

    Attributes:
        methods: registered method names (``python -m benchmark list``); required.
        datasets: registered dataset names; required: never ``fit``'s default.
        backbones: registered backbone names; None: each recipe's.
        seeds: ``--seed_everything`` values; None: ``[0]``.
        variants: named option sets, one axis (``{base: {}, wide: {model.embedding_dim: 2048}}``).
        options: ``{option: [values]}``, whose product is a further axis of variants.
        args: options of this grid's cells (after the file's ``args:``).
    """

    REQUIRED: ClassVar[str] = (f"every grid lists its methods: and datasets: (registered names: python -m benchmark "
                               f"list), e.g. {GRID_EXAMPLE}; the embedded default is datasets: [synthetic]")
    methods: Text | list[Text] = _field("a method name or a list of them", item="a method name", required=True)
    datasets: Text | list[Text] = _field("a dataset name or a list of them", item="a dataset name", required=True)
    backbones: Text | list[Text] | None = _field(
        "a backbone name or a list of them", item="a backbone name",
        empty="list at least one backbone, or leave the key out for each recipe's")
    seeds: NonNegativeInt | list[NonNegativeInt] | None = _field(
        "a non-negative integer or a list of them", item="a non-negative integer", empty="list at least one seed")
    variants: dict[str, YamlMapping | None] | None = _field(
        "a mapping of variant names to options, e.g. {base: {}, small: {model.embedding_dim: 128}}",
        item="a mapping of options (key: value)")
    options: YamlMapping | None = _field("a mapping of options to lists of values, e.g. {model.mpn.layers: [1, 2]}")
    args: YamlMapping | None = _field("a mapping of fit options (key: value)")


@dataclass(frozen=True)
class SlurmSpec:
    """``slurm:``: the submitit parameters of ``--launcher slurm`` (each ``slurm_<key>``).

    Attributes:
        partition, account, qos, constraint: sbatch's options of the same names.
        array_parallelism: at most this many cells of a job array at once.
        signal_delay_s: seconds between submitit's warning signal and the time limit (default 120).
        setup: shell lines run before each job (``source .venv/bin/activate``).
        additional: any further sbatch option (``{exclusive: true}``).
    """

    partition: Text | None = _field("text (a partition name)")
    account: Text | None = _field("text (an account name)")
    qos: Text | None = _field("text (a QOS name)")
    constraint: Text | None = _field("text (a node feature, e.g. a100)")
    array_parallelism: PositiveInt | None = _field("a positive integer (cells of an array at once)")
    signal_delay_s: NonNegativeInt | None = _field("a non-negative integer (seconds)")
    setup: Text | list[Text] | None = _field("a shell line or a list of them", item="a shell line",
                                              empty="remove the key")
    additional: YamlMapping | None = _field("a mapping of sbatch options, e.g. {exclusive: true}")


@dataclass(frozen=True)
class Reproduces:
    """One ``reproduces:`` entry: the cells (a selector) that give a number for one row of the paper.

    Attributes:
        cells: a selector, ``axis=value[,...]`` or a mapping (``{variant: base}``).
        table, row: a row of ``benchmark/core/reference/<paper>.csv``.
    """

    REQUIRED: ClassVar[str] = "every entry names cells, table and row, e.g. {cells: variant=base, table: Table 1, row: Ours}"
    cells: Text | YamlMapping = _field("a selector, e.g. variant=base,dataset=cub", required=True)
    table: Text = _field("the name of a table of the paper, e.g. Table 1", required=True)
    row: Text = _field("the name of a row of that table, e.g. Ours", required=True)


@dataclass(frozen=True)
class SuiteFile:
    """A suite file's top level (docs/leaderboard.md, "The file format").

    The sections that have a class of their own (``grid`` -> :class:`GridSpec`, ``resources``
    -> :class:`Resources`, ``slurm`` -> :class:`SlurmSpec`, ``reproduces`` ->
    :class:`Reproduces`) are typed here as mappings and parsed one by one by the loader, which
    knows where each is (``grid[1]``, ``cells['method=ms'].resources``): a mistake in one
    section is then reported with the others' instead of hiding them.

    Attributes:
        name: names the output folder and the W&B groups (default: the file name).
        description: one line for ``suite list`` and the W&B sweep.
        output: the output folder (default ``runs/suites/<name>``).
        plugins: ``--plugin`` modules of every cell.
        args: fit options of every cell.
        grid: one grid or a list of grids (:class:`GridSpec`).
        cells: ``{selector: options}``, per-cell overrides (``resources:`` allowed).
        exclude: selectors of cells to leave out.
        resources: :class:`Resources` of every cell.
        slurm: :class:`SlurmSpec`.
        paper: the paper whose tables the suite reproduces.
        reproduces: :class:`Reproduces` entries.
    """

    name: Text | None = _field("text (letters, digits and _ . + = -)")
    description: Text | None = _field("one line of text")
    output: Text | None = _field("a folder")
    plugins: Text | list[Text] | None = _field("a module or a list of modules", item="a module name",
                                                empty="remove the key")
    args: YamlMapping | None = _field("a mapping of fit options (key: value), e.g. {trainer.max_epochs: 3}")
    grid: YamlMapping | list[YamlMapping | None] | None = _field(
        f"a grid or a list of grids, e.g. {GRID_EXAMPLE}", item="a grid mapping (methods: ..., datasets: ...)")
    cells: dict[str, YamlMapping | None] | None = _field(
        "a mapping of selectors to options, e.g. {method=ms: {model.lr: 0.1}}", item="a mapping of options (key: value)")
    exclude: Text | YamlMapping | list[Text | YamlMapping] | None = _field(
        "a selector or a list of them", item="a selector, e.g. method=ms,seed=0 or {method: ms, seed: 0}",
        empty="remove the key")
    resources: YamlMapping | None = _field("a mapping, e.g. {devices: 1, time: 4h}")
    slurm: YamlMapping | None = _field("a mapping, e.g. {partition: gpu}")
    paper: Text | None = _field("the name of a paper (benchmark/core/reference/<paper>.csv)")
    reproduces: YamlMapping | list[YamlMapping] | None = _field(
        "an entry {cells: ..., table: ..., row: ...} or a list of them", item="an entry {cells: ..., table: ..., row: ...}", empty="remove the key")


def field_names(cls: type) -> tuple[str, ...]:
    """The keys a section accepts: its class's fields, in the order the file format lists them."""
    return tuple(f.name for f in fields(cls))


# The keys of each section, from its class; any other key is reported with the closest of these
# (_unknown_keys), since a misspelt key that is silently ignored would run the wrong grid.
SUITE_KEYS = field_names(SuiteFile)
GRID_KEYS = field_names(GridSpec)
RESOURCE_KEYS = field_names(Resources)
SLURM_KEYS = field_names(SlurmSpec)
REPRODUCES_KEYS = field_names(Reproduces)


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


def _options(value: dict[str, Any] | None, where: str, problems: _Problems,
             resources_allowed: bool = False) -> dict[str, Any]:
    """``{option: value}`` of fit options; keys may be written with or without ``--``.

    ``value`` is a mapping the schema parsed (a :class:`YamlMapping` field), or None (not
    given). Refused, as problems: a key that is no option name, an option the suite sets itself
    (:data:`RESERVED`), and a bare ``model`` / ``trainer`` (the class comes from the grid,
    only its sub-options may be given). ``resources_allowed``: a ``cells:`` entry, which may
    also hold a ``resources`` mapping, returned under that key for the caller to apply.
    """
    out: dict[str, Any] = {}
    for key, item in (value or {}).items():
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
        if name in ("model", "trainer"):  # (data is reserved above: the grid's datasets choose it)
            problems.add(f"{where}: {name!r} needs a sub-option ({name}.X); the class is chosen by the grid.")
            continue
        out[name] = item
    return out


def _minutes(value: Any, where: str, problems: _Problems) -> float | None:
    """``value`` as minutes (:func:`_to_minutes`), or None after recording a problem naming ``where``.

    For a duration outside a section (``run-cell --wait-needs``); None stays None (not given).
    """
    if value is None:
        return None
    try:
        return _to_minutes(value)
    except ValueError:
        problems.add(f"{where} = {value!r} is not {DURATION}.")
        return None


# ---------------------------------------------------------------------------- parsing
def _parse_fields(cls: type, raw: Any, where: str, problems: _Problems,
                  prefix: str | None = None) -> dict[str, Any] | None:
    """The fields of section ``cls`` that ``raw`` gives, each adapted to its type by jsonargparse.

    Field by field, so that one pass reports every wrong value of the section, each at its
    own key, besides its unknown keys (with the closest valid one) and its missing required
    ones. A key written empty (``slurm:``, ``seeds: null``) is a key not given.

    Args:
        cls: the section's dataclass (:class:`GridSpec`, :class:`Resources`, ...).
        raw: the section as YAML read it; None (an empty section) is ``{}``.
        where: the section in messages (``grid[1]``, ``the suite file``).
        problems: where every problem is recorded.
        prefix: what goes before a field's name in messages; default ``<where>.``.

    Returns:
        The typed values of the keys given and valid (a wrong one is left out, recorded), or
        None when ``raw`` is not a mapping (recorded).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(f"{where} must be a mapping (key: value), not {type(raw).__name__} {_shown(raw)}.")
        return None
    prefix = f"{where}." if prefix is None else prefix
    _unknown_keys(where, raw, field_names(cls), problems)
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for item in fields(cls):
        if raw.get(item.name) is None:
            continue
        ok, value = _typed(hints[item.name], raw[item.name], prefix + item.name, item.metadata, problems)
        if ok:
            values[item.name] = value
    missing = [f.name for f in fields(cls) if f.default is MISSING and raw.get(f.name) is None]
    if missing:
        what = "is empty" if not raw else "names no " + " and no ".join(missing)
        problems.add(f"{where} {what}: {getattr(cls, 'REQUIRED', 'give ' + ', '.join(missing))}.")
    return values


def _section(cls: type[_Section], raw: Any, where: str, problems: _Problems) -> _Section | None:
    """Section ``raw`` as an instance of ``cls``; its problems are recorded (:func:`_parse_fields`).

    A wrong value keeps the field's default: the file does not load anyway, and the loader
    goes on checking the section's valid values (a misspelt method besides a wrong seed), so
    one pass reports both. None when ``raw`` is not a mapping or a required value is missing
    or wrong: nothing of the section can then be checked further."""
    values = _parse_fields(cls, raw, where, problems)
    if values is None or any(f.default is MISSING and f.name not in values for f in fields(cls)):
        return None
    return cls(**values)


def _resources(value: Any, where: str, problems: _Problems, base: Resources | None = None) -> Resources:
    """The ``resources:`` mapping at ``where`` as :class:`Resources`, on top of ``base``.

    ``base`` is what the cell had so far: a ``cells:`` entry's resources change only the keys
    it names. Invalid values are recorded as problems (the suite does not load); the valid
    ones still apply.
    """
    values = _parse_fields(Resources, value, where, problems) or {}
    # Resources is frozen: replace() gives a new one with the keys given.
    return replace(base or Resources(), **values)


def _typed(hint: Any, value: Any, where: str, meta: Any, problems: _Problems) -> tuple[bool, Any]:
    """``value`` adapted to type ``hint`` by jsonargparse: ``(True, value)``, or ``(False, None)``
    after recording what is wrong at ``where`` (:func:`_report`).

    A type that takes a list returns one: a scalar is a list of one, and an empty list is a
    problem where the field's ``empty`` says how to fix it (it would silently give no cell).
    """
    try:
        typed = _plain(_adapt(hint, value))
    except ArgumentError:
        _report(hint, value, where, meta, problems)
        return False, None
    if _entry_type(hint, list) is not None:
        typed = typed if isinstance(typed, list) else [typed]
        if not typed and meta["empty"]:
            problems.add(f"{where} is an empty list: {meta['empty']}.")
            return False, None
    return True, typed


def _report(hint: Any, value: Any, where: str, meta: Any, problems: _Problems) -> None:
    """Record why ``value`` is not of type ``hint``: the wrong entries of a list or mapping, each
    at ``<where>[i]`` / ``<where>['key']``, or else the value itself, with what it must be.

    The location and the fix are the field's (``meta``: :func:`_field`), not jsonargparse's
    message, which names its own types (``NonNegativeInt``) rather than the file's keys."""
    entry = _entry_type(hint, type(value)) if isinstance(value, (list, dict)) else None
    if entry is not None:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        bad = [(key, item) for key, item in items if not _fits(entry, item)]
        for key, item in bad:
            label = repr(key) if isinstance(value, dict) else key
            problems.add(f"{where}[{label}] = {_shown(item)} is not {meta['item']}.")
        if bad:
            return
    problems.add(f"{where} = {_shown(value)} is not {meta['expect']}.")


def _fits(hint: Any, value: Any) -> bool:
    """Whether jsonargparse accepts ``value`` as type ``hint``."""
    try:
        _adapt(hint, value)
    except ArgumentError:
        return False
    return True


def _adapt(hint: Any, value: Any) -> Any:
    """``value`` as type ``hint``, adapted by jsonargparse (``PositiveInt``: ``"3"`` -> 3; a
    registered type: its deserializer). Never from the environment: a suite file says it all.

    Raises:
        ArgumentError: ``value`` is not of type ``hint``.
    """
    return _parser(hint).parse_object({"value": value}, env=False).value


@functools.cache
def _parser(hint: Any) -> ArgumentParser:
    """A jsonargparse parser of one value of type ``hint`` (``parse_object({"value": ...})``), one per type.

    ``exit_on_error=False``: a wrong value raises ArgumentError, which the caller turns into a
    problem of the file instead of an exit."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=hint)
    return parser


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of ``cls`` (this module's annotations are strings)."""
    return get_type_hints(cls)


def _entry_type(hint: Any, container: type) -> Any:
    """The entry type of the ``list[X]`` (``container`` list) or ``dict[K, X]`` (dict) in
    union ``hint``, or None when ``hint`` takes no such container."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    for option in options:
        if get_origin(option) is container and container in (list, dict):
            return get_args(option)[-1]
    return None


def _plain(value: Any) -> Any:
    """jsonargparse's restricted numbers (``PositiveInt(2)``) as the builtins they stand for, in lists too.

    A Resources holding them would compare and hash as the numbers do, but would pickle
    jsonargparse's classes into every submitit job."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, bool) or type(value) in (int, float, str):
        return value
    for base in (int, float, str):
        if isinstance(value, base):
            return base(value)
    return value


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut at ``limit`` characters: a message quotes the value, not a whole section."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _closest(name: str, known: Iterable[str]) -> str:
    """`` Did you mean X?`` for the closest of ``known`` to a misspelt ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(close)}?" if close else ""
