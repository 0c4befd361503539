"""``python -m benchmark suite``: a grid of ``fit`` runs as one command.

A suite file (YAML, ``configs/suites/*.yaml``; docs/leaderboard.md describes the format)
lists methods × datasets × backbones × override sets × seeds, options for every cell and
per-cell overrides, and the resources a run needs. Every cell is one ``python -m benchmark
fit`` subprocess writing into ``<output>/<cell id>/``, so that one crash never takes the
others down, and the run directory's ``status.json`` is the cell's state:

* ``suite run FILE``: validate every cell (each cell's configuration is parsed by the CLI's
  own parser, as ``fit --print_config`` does, before anything runs), then run the cells one
  after another with a progress view and a summary table. Run again, it skips the completed
  cells, resumes the interrupted ones from ``last.ckpt`` and reports the failed ones
  (``--retry-failed`` starts them again; the failed attempt is kept under ``.attempts/``).
  A cell whose options in the file differ from those it ran with (``suite.json``) is never
  resumed: the run is refused, or ``--restart-changed`` starts it again from scratch.
  ``--launcher local|slurm`` hands the cells to submitit (this machine, or one SLURM job
  array per stage and resource set) instead.
* ``suite run-cell FILE --cell ID``: one cell, same rules (what a W&B sweep agent and a
  submitit job run); a cell that needs another cell's run waits while that one is pending or
  running, and is skipped (recorded as blocked, exit 0) when it cannot complete.
* ``suite status FILE``: the cells and their states; ``suite export-sweep FILE``: a W&B
  sweep whose agents run the same cells; ``suite list``: the suites that ship with the package.

The framework names no method: methods, datasets and backbones come from the suite file and
are checked against the registries.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import difflib
import fnmatch
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import torch
import yaml

from benchmark import paper_tables, registry
from benchmark.backbones import BACKBONES
from benchmark.builder import build_cli
from benchmark.defaults import recipe_dir
from benchmark.errors import EXIT_COMPLETED, EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM, UserError
from benchmark.io import atomic_write_text
from benchmark.io import console as make_console
from benchmark.papers import known_papers, paper_numbers
from benchmark.results import RecordError, final_evaluation, read_record, run_state

try:  # POSIX file locks (run_lock); Windows has none and runs without the lock
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

EXIT_OK = EXIT_COMPLETED

SUITE_KEYS = ("name", "description", "output", "plugins", "args", "grid", "cells", "exclude", "resources", "slurm",
              "paper", "reproduces")
REPRODUCES_KEYS = ("cells", "table", "row")
GRID_KEYS = ("methods", "datasets", "backbones", "seeds", "variants", "options", "args")
RESOURCE_KEYS = ("devices", "num_nodes", "accelerator", "precision", "time", "cpus_per_task", "mem_gb")
SLURM_KEYS = ("partition", "account", "qos", "constraint", "array_parallelism", "signal_delay_s", "setup", "additional")
AXES = ("method", "dataset", "backbone", "variant", "seed")
# Set by the grid, the cell's folder or the launcher: not options a suite may give.
RESERVED = {
    "method": "grid.methods", "data": "grid.datasets", "backbone": "grid.backbones",
    "seed_everything": "grid.seeds", "run_dir": "the suite (<output>/<cell id>)",
    "ckpt_path": "the suite (it resumes interrupted cells itself)", "plugin": "plugins: at the top of the file",
    "print_config": "suite run --dry-run", "help": "python -m benchmark fit --help",
}
# resources: keys that are also trainer options.
RESOURCE_FLAGS = {"devices": "trainer.devices", "num_nodes": "trainer.num_nodes",
                  "accelerator": "trainer.accelerator", "precision": "trainer.precision"}
PLACEHOLDERS = ("output", "method", "dataset", "backbone", "variant", "seed", "cell")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
_OPTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
GRID_EXAMPLE = "grid: {methods: [ms], datasets: [cub], seeds: [0, 1, 2]}"
RECORD = "suite.json"  # the suite's record of a cell's attempts, in the cell's run directory
RUN_LOCK = ".suite-run.lock"  # held by the `suite run` that is using an output folder
LOG = "fit.log"  # the cell's output (every attempt, appended)

USAGE = """usage: python -m benchmark suite <command> FILE [options]

FILE is a suite file (configs/suites/*.yaml; docs/leaderboard.md) or the name of a shipped suite.

commands:
  run FILE          run every cell as its own `fit` (skips completed cells, resumes interrupted ones)
      --dry-run         list the cells and their exact commands; run nothing
      --retry-failed    start failed cells again (the failed attempt moves to <output>/.attempts/)
      --restart-changed start cells whose options changed since they ran again from scratch (an
                        interrupted one is otherwise refused, not resumed; the old attempt moves to .attempts/)
      --only SELECTOR   only the cells that match, e.g. --only dataset=cub --only method=ms,seed=0
      --output DIR      the suite's output folder (default: output: in the file, or runs/suites/<name>)
      --launcher NAME   serial (default: one cell after another here), local (submitit, in parallel
                        on this machine: --max-parallel N), slurm (submitit: one job array per stage)
      --wait            slurm: wait for the jobs and print the summary (default: submit and return)
  run-cell FILE --cell ID   run one cell (what a W&B sweep agent or a submitit job runs); a cell that
                    needs another waits while that one is pending or running (--wait-needs, default
                    24h), and is skipped (exit 0, recorded as blocked) when that one cannot complete
  status FILE       the cells, their states, times and test R@1
  paper-table FILE [--table T]   the paper's tables in its order: its numbers and statistics, ours
                    (final; test-best where the paper reports it, labelled), cells NOT COVERED marked
  export-sweep FILE [--out sweep.yaml]   a W&B sweep config whose agents run the cells
  list              the suites shipped with the package
"""


class SuiteError(UserError):
    """A problem with a suite file or the suite command line: printed without a traceback, exit 2."""


# ---------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Resources:
    """What one run needs. ``devices`` / ``num_nodes`` / ``accelerator`` / ``precision`` become
    trainer options of the cell; ``time`` (minutes) stops a serial run with SIGTERM (resumable)
    and is the SLURM time limit; ``cpus_per_task`` / ``mem_gb`` are for the launchers."""

    devices: int | str | None = None
    num_nodes: int | None = None
    accelerator: str | None = None
    precision: str | None = None
    time: float | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None


@dataclass
class Cell:
    """One ``fit`` of the grid: its id (also its folder name), axes, options and resources."""

    id: str
    method: str
    dataset: str
    backbone: str | None
    variant: str
    seed: int
    options: dict[str, Any]
    sources: dict[str, str]  # option -> where the suite file set it (for error messages)
    resources: Resources
    plugins: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # cells whose run directory this cell's options name
    template: tuple[str, ...] = ()  # the arguments before {placeholders} and the seed: one parse check each
    reproduces: tuple[tuple[str, str], ...] = ()  # (table, row) of the suite's paper this cell reproduces

    def group(self, suite_name: str) -> str:
        """The W&B group of the cell's run: its configuration without the seed, so seeds group together."""
        return "/".join([suite_name, self.dataset, self.method, *([self.backbone] if self.backbone else []),
                         *([self.variant] if self.variant else [])])

    def axis(self, name: str) -> str:
        value = {"method": self.method, "dataset": self.dataset, "backbone": self.backbone or "",
                 "variant": self.variant, "seed": self.seed}[name]
        return str(value)

    @property
    def argv(self) -> list[str]:
        """The ``fit`` arguments, without ``--run_dir`` / ``--ckpt_path`` (the suite adds those)."""
        argv = ["--method", self.method, "--data", self.dataset]
        if self.backbone:
            argv += ["--backbone", self.backbone]
        for plugin in self.plugins:
            argv += ["--plugin", plugin]
        for key, value in self.options.items():
            if key == "config" and isinstance(value, list):
                for item in value:
                    argv += ["--config", str(item)]
            else:
                argv += [f"--{key}", flag_value(value)]
        return [*argv, "--seed_everything", str(self.seed)]


@dataclass
class Suite:
    path: Path
    name: str
    description: str
    output: Path
    cells: list[Cell]
    slurm: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    paper: str | None = None  # the paper whose tables the suite reproduces (benchmark/reference/<paper>.csv)

    def cell(self, cell_id: str) -> Cell:
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        close = difflib.get_close_matches(cell_id, [c.id for c in self.cells], n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise SuiteError(f"{self.path}: no cell {cell_id!r}.{hint} `suite run {self.path} --dry-run` lists the cells.")

    def run_dir(self, cell: Cell) -> Path:
        return self.output / cell.id


def flag_value(value: Any) -> str:
    """A YAML value as the command line writes it (``true``, ``null``, ``[1, 2, 4]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return str(value)


# ---------------------------------------------------------------------------- loading
def shipped_suites() -> dict[str, Path]:
    folder = recipe_dir() / "suites"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_suite_path(name: str) -> Path:
    """A suite file, or the name of one shipped in ``configs/suites`` (``smoke``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = shipped_suites()
    if name in shipped:
        return shipped[name]
    if path.exists():
        raise SuiteError(f"Suite {name} is not a file. Pass a suite YAML file.")
    names = ", ".join(shipped) or "none"
    raise SuiteError(f"Suite file {name} does not exist. Pass a path, or one of the shipped suites: {names}.")


class _Problems:
    """Every problem found in a suite file, reported together before anything runs."""

    def __init__(self, path: Path) -> None:
        self.path, self.items = path, []

    def add(self, message: str) -> None:
        if message not in self.items:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise SuiteError(f"{self.path}: {self.items[0]}")
        lines = "\n".join(f"  - {item}" for item in self.items)
        raise SuiteError(f"{self.path}: {len(self.items)} problems, no cell was started:\n{lines}")


def _unknown_keys(where: str, given: Iterable[str], allowed: Iterable[str], problems: _Problems) -> None:
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            problems.add(f"unknown key {key!r} in {where}. {hint}Valid keys: {', '.join(allowed)}.")


def _mapping(value: Any, where: str, problems: _Problems) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(f"{where} must be a mapping (key: value), not {type(value).__name__} {value!r}.")
        return {}
    return value


def _list(value: Any, where: str, problems: _Problems, hint: str) -> list[Any] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        value = [value]
    if not value:
        problems.add(f"{where} is an empty list: {hint}.")
        return None
    return value


def _options(value: Any, where: str, problems: _Problems, resources_allowed: bool = False) -> dict[str, Any]:
    """``{option: value}`` of fit options; keys may be written with or without ``--``."""
    out: dict[str, Any] = {}
    for key, item in _mapping(value, where, problems).items():
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
    """``90``, ``"90m"``, ``"4h"``, ``"1-12:00:00"``, ``"2:30:00"`` as minutes."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if match:
        return float(match.group(1)) * {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}[match.group(2)]
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", text)
    if match:
        days, a, b, c = match.groups()
        hours, minutes, seconds = (int(a), int(b), int(c)) if c is not None else (0, int(a), int(b))
        return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60
    problems.add(f"{where} = {value!r} is not a duration: give minutes (90), '90m', '4h' or 'D-HH:MM:SS'.")
    return None


def _resources(value: Any, where: str, problems: _Problems, base: Resources | None = None) -> Resources:
    raw = _mapping(value, where, problems)
    _unknown_keys(where, raw, RESOURCE_KEYS, problems)
    fields = dict(vars(base)) if base is not None else {}
    for key in ("num_nodes", "cpus_per_task"):
        if key in raw:
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                problems.add(f"{where}.{key} must be a positive integer, not {raw[key]!r}.")
            else:
                fields[key] = raw[key]
    if "devices" in raw:
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
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(close)}?" if close else ""


def parse_selector(text: Any, where: str, problems: _Problems) -> dict[str, str] | None:
    """``"method=ms,dataset=cub"`` (or ``{method: ms, dataset: cub}``) -> {axis: pattern}; patterns may use * and ?."""
    out: dict[str, str] = {}
    if isinstance(text, dict):
        text = ",".join(f"{k}={v}" for k, v in text.items())
    for part in str(text).split(","):
        axis, eq, pattern = part.strip().partition("=")
        if not eq or not pattern.strip():
            problems.add(f"{where}: {text!r} is not a selector; write axis=value[,axis=value], "
                         f"e.g. method=ms,dataset=cub (axes: {', '.join(AXES)}).")
            return None
        if axis.strip() not in AXES:
            problems.add(f"{where}: unknown axis {axis.strip()!r} in {text!r}.{_closest(axis.strip(), AXES)} "
                         f"Axes: {', '.join(AXES)}.")
            return None
        out[axis.strip()] = pattern.strip()
    return out


def matches(cell: Cell, selector: dict[str, str]) -> bool:
    return all(fnmatch.fnmatchcase(cell.axis(axis), pattern) for axis, pattern in selector.items())


def _variant_name(option: str, value: Any) -> str:
    text = flag_value(value)
    text = re.sub(r"[^A-Za-z0-9_.+=-]+", "", text) or "x"
    return f"{option.rsplit('.', 1)[-1]}{text}"


def _placeholders(value: Any, fill: dict[str, str]) -> Any:
    """``{output}``, ``{method}``, ``{dataset}``, ``{backbone}``, ``{variant}``, ``{seed}``, ``{cell}``
    in string values (others, e.g. a YAML mapping written as a string, stay as they are)."""
    if isinstance(value, str):
        return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: fill[m.group(1)], value)
    if isinstance(value, list):
        return [_placeholders(v, fill) for v in value]
    return value


def load_suite(path: str | Path, output: str | Path | None = None) -> Suite:
    """Read and expand a suite file; every schema problem and name error raises one SuiteError."""
    path = resolve_suite_path(str(path))
    problems = _Problems(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"{path} is not valid YAML: {err}") from None
    except OSError as err:
        raise SuiteError(f"Cannot read suite file {path}: {err}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: a suite file is a mapping with a grid: section (docs/leaderboard.md).")
    _unknown_keys("the suite file", raw, SUITE_KEYS, problems)
    name = str(raw.get("name") or path.stem)
    if not _NAME.match(name):
        problems.add(f"name {name!r}: use letters, digits and _ . + = - only (it names the output folder).")
    plugins = tuple(str(p) for p in (_list(raw.get("plugins"), "plugins", problems, "remove the key") or []))
    try:
        registry.discover(list(plugins))
    except ImportError as err:
        raise SuiteError(f"{path}: {err}") from None
    out = Path(output if output is not None else raw.get("output") or Path("runs") / "suites" / name).expanduser()
    out = out.resolve()
    common = _options(raw.get("args"), "args", problems)
    base_resources = _resources(raw.get("resources"), "resources", problems)
    slurm = _mapping(raw.get("slurm"), "slurm", problems)
    _unknown_keys("slurm", slurm, SLURM_KEYS, problems)

    grids = raw.get("grid")
    if grids is None:
        problems.add(f"no grid: section. Add one, e.g. {GRID_EXAMPLE}.")
        grids = []
    grids = grids if isinstance(grids, list) else [grids]
    if raw.get("grid") is not None and not grids:
        problems.add(f"grid is an empty list, so the suite has no cell: give at least one grid, e.g. {GRID_EXAMPLE}.")
    cells: list[Cell] = []
    for g, grid in enumerate(grids):
        where = "grid" if len(grids) == 1 else f"grid[{g}]"
        cells += _expand_grid(grid, where, common, base_resources, plugins, problems)
    problems.raise_if_any()

    # exclude:, then cells: (per-cell overrides by selector, in file order; later wins).
    all_cells = list(cells)
    for i, text in enumerate(_list(raw.get("exclude"), "exclude", problems, "remove the key") or []):
        selector = parse_selector(text, f"exclude[{i}]", problems)
        if selector is None:
            continue
        if not any(matches(c, selector) for c in all_cells):
            problems.add(f"exclude[{i}] {text!r} matches no cell of the grid.")
        cells = [c for c in cells if not matches(c, selector)]
    for key, overrides in _mapping(raw.get("cells"), "cells", problems).items():
        where = f"cells[{key!r}]"
        selector = parse_selector(key, where, problems)
        options = _options(overrides, where, problems, resources_allowed=True)
        if selector is None:
            continue
        chosen = [c for c in cells if matches(c, selector)]
        if not chosen:
            problems.add(f"{where} matches no cell. Cells are selected by axis=value (e.g. method=ms,dataset=cub).")
        resources = options.pop("resources", None)
        for cell in chosen:
            for option, value in options.items():
                cell.options.pop(option, None)  # the override's position: last
                cell.options[option] = value
                cell.sources[option] = where
            if resources is not None:
                cell.resources = _resources(resources, f"{where}.resources", problems, base=cell.resources)
    problems.raise_if_any()
    if not cells:
        problems.add("the grid has no cell left after exclude:.")

    seen: dict[str, int] = {}
    for i, cell in enumerate(cells):
        cell.template = tuple(cell.argv[:-2])
        fill = {"output": str(out), "method": cell.method, "dataset": cell.dataset, "backbone": cell.backbone or "",
                "variant": cell.variant, "seed": str(cell.seed), "cell": cell.id}
        cell.options = {k: _placeholders(v, fill) for k, v in cell.options.items()}
        for key, flag in RESOURCE_FLAGS.items():
            value = getattr(cell.resources, key)
            if value is None:
                continue
            if flag in cell.options:
                problems.add(f"--{flag} is given both as an option ({cell.sources[flag]}) and as resources.{key}; "
                             "give it once.")
            else:
                cell.options[flag] = value
                cell.sources[flag] = f"resources.{key}"
        if cell.id in seen:
            problems.add(f"duplicate cell {cell.id}: two entries of the grid give the same method, dataset, backbone, "
                         "variant and seed. Remove the repeated value, or give the variants different names.")
        seen.setdefault(cell.id, i)
    problems.raise_if_any()
    paper = _paper_rows(raw, cells, problems)
    problems.raise_if_any()
    suite = Suite(path=path, name=name, description=str(raw.get("description") or "").strip(), output=out,
                  cells=cells, slurm=slurm, plugins=plugins, paper=paper)
    _find_dependencies(suite, problems)
    problems.raise_if_any()
    return suite


def _paper_rows(raw: dict[str, Any], cells: list[Cell], problems: _Problems) -> str | None:
    """``paper:`` and ``reproduces:``: which cells reproduce which rows of the paper's tables.

    Every entry names cells by selector and one (table, row) of ``benchmark/reference/<paper>.csv``;
    both must exist, so a suite cannot claim a row the paper does not have or a cell it does not run.
    """
    entries = _list(raw.get("reproduces"), "reproduces", problems, "remove the key") or []
    paper = raw.get("paper")
    if paper is None:
        if entries:
            problems.add("reproduces: needs paper: NAME (the paper whose tables the cells reproduce).")
        return None
    known = known_papers()
    if str(paper) not in known:
        problems.add(f"paper {paper!r} has no reference numbers; known papers: {', '.join(known)} (benchmark/reference/).")
        return None
    rows = {(n.table, n.row) for n in paper_numbers(papers=[str(paper)])}
    for i, entry in enumerate(entries):
        where = f"reproduces[{i}]"
        entry = _mapping(entry, where, problems)
        _unknown_keys(where, entry, REPRODUCES_KEYS, problems)
        missing = [k for k in REPRODUCES_KEYS if k not in entry]
        if missing:
            problems.add(f"{where} needs {', '.join(missing)} (e.g. {{cells: variant=base, table: Table 1, row: Ours}}).")
            continue
        key = (str(entry["table"]), str(entry["row"]))
        if key not in rows:
            in_table = sorted(r for t, r in rows if t == key[0])
            hint = f" Rows of {key[0]}: {'; '.join(in_table)}." if in_table else \
                f" Tables: {', '.join(sorted({t for t, _ in rows}))}."  # fmt: skip
            problems.add(f"{where}: {paper} has no row {key[1]!r} in {key[0]!r}.{hint}")
            continue
        selector = parse_selector(entry["cells"], f"{where}.cells", problems)
        if selector is None:
            continue
        chosen = [c for c in cells if matches(c, selector)]
        if not chosen:
            problems.add(f"{where}.cells {entry['cells']!r} matches no cell.")
        for cell in chosen:
            if key not in cell.reproduces:
                cell.reproduces += (key,)
    return str(paper)


def _expand_grid(grid: Any, where: str, common: dict[str, Any], resources: Resources, plugins: tuple[str, ...],
                 problems: _Problems) -> list[Cell]:
    if isinstance(grid, dict):
        # A cell's method and dataset are what the table compares: never a silent default (`fit`'s
        # defaults would turn `grid: {}` into one cell of the default method on the synthetic data).
        absent = [key for key in ("methods", "datasets") if grid.get(key) is None]
        if absent:
            what = "is empty" if not grid else f"names no {' and no '.join(absent)}"
            problems.add(f"{where} {what}: every grid lists its methods: and datasets: (registered names: python -m "
                         f"benchmark list), e.g. {GRID_EXAMPLE}; the embedded default is datasets: [synthetic].")
    grid = _mapping(grid, where, problems)
    _unknown_keys(where, grid, GRID_KEYS, problems)
    methods = _list(grid.get("methods"), f"{where}.methods", problems, "list at least one method") or []
    datasets = _list(grid.get("datasets"), f"{where}.datasets", problems, "list at least one dataset") or []
    backbones = _list(grid.get("backbones"), f"{where}.backbones", problems,
                      "list at least one backbone, or leave the key out for each recipe's") or (
        [] if "backbones" in grid else [None])
    seeds = _list(grid.get("seeds"), f"{where}.seeds", problems, "list at least one seed") or (
        [] if "seeds" in grid else [0])
    for kind, names, known, command in (
        ("method", methods, registry.METHODS, "list"), ("dataset", datasets, registry.DATASETS, "list"),
        ("backbone", [b for b in backbones if b is not None], BACKBONES, "list"),
    ):
        for name in names:
            if not isinstance(name, str) or name not in known:
                problems.add(f"{where}: unknown {kind} {name!r}.{_closest(str(name), known)} "
                             f"Registered: {', '.join(sorted(known))} (python -m benchmark {command}).")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            problems.add(f"{where}.seeds: {seed!r} is not a non-negative integer.")
    for kind, values in (("methods", methods), ("datasets", datasets), ("backbones", backbones), ("seeds", seeds)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            problems.add(f"duplicate cells: {where}.{kind} lists {', '.join(repeated)} more than once.")
    grid_args = _options(grid.get("args"), f"{where}.args", problems)

    # Named override sets × the product of `options:`, each combination one variant.
    named: list[tuple[str, dict[str, Any], str]] = [("", {}, "")]
    if "variants" in grid:
        raw_variants = _mapping(grid["variants"], f"{where}.variants", problems)
        if not raw_variants:
            problems.add(f"{where}.variants is empty: name at least one override set, or remove the key.")
        named = []
        for vname, overrides in raw_variants.items():
            vname = str(vname)
            if not _NAME.match(vname):
                problems.add(f"{where}.variants: name {vname!r}: use letters, digits and _ . + = - only.")
            named.append((vname, _options(overrides, f"{where}.variants.{vname}", problems), f"{where}.variants.{vname}"))
    products: list[list[tuple[str, str, Any]]] = [[]]
    if "options" in grid:
        raw_options = _options(grid["options"], f"{where}.options", problems)
        if not raw_options:
            problems.add(f"{where}.options is empty: give option: [values], or remove the key.")
        axes = []
        for option, values in raw_options.items():
            values = _list(values, f"{where}.options.{option}", problems, "give at least one value")
            if values:
                axes.append([(option, _variant_name(option, v), v) for v in values])
        products = [list(combo) for combo in itertools.product(*axes)] if axes else [[]]
    cells = []
    for method, dataset, backbone, (vname, voptions, vsource), combo, seed in itertools.product(
        methods, datasets, backbones, named, products, seeds
    ):
        variant = "_".join([p for p in [vname, *(label for _, label, _ in combo)] if p])
        options: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for source, opts in (("args", common), (f"{where}.args", grid_args), (vsource, voptions),
                             (f"{where}.options", {o: v for o, _, v in combo})):
            for option, value in opts.items():
                options.pop(option, None)
                options[option] = value
                sources[option] = source
        parts = [str(method), str(dataset), *([str(backbone)] if backbone else []), *([variant] if variant else []),
                 f"seed{seed}"]
        cells.append(Cell(id="-".join(parts), method=str(method), dataset=str(dataset), backbone=backbone,
                          variant=variant, seed=seed if isinstance(seed, int) else 0, options=options,
                          sources=sources, resources=resources, plugins=plugins))
    return cells


def _find_dependencies(suite: Suite, problems: _Problems) -> None:
    """A cell whose options name another cell's run directory (a stage-1 checkpoint) needs it:
    it runs after it, and is not started while that cell has not completed."""
    folders = {cell.id: str(suite.run_dir(cell)) for cell in suite.cells}
    for cell in suite.cells:
        text = " ".join(cell.argv)
        cell.needs = tuple(
            other for other, folder in folders.items()
            if other != cell.id and re.search(re.escape(folder) + r"(/|$|\s)", text)
        )
    order: list[Cell] = []
    done: set[str] = set()
    remaining = list(suite.cells)
    while remaining:
        ready = [c for c in remaining if set(c.needs) <= done]
        if not ready:
            problems.add(f"cells that need each other's run directories (a cycle): {', '.join(c.id for c in remaining)}.")
            return
        for cell in ready:
            order.append(cell)
            done.add(cell.id)
        remaining = [c for c in remaining if c.id not in done]
    suite.cells = order


# ---------------------------------------------------------------------------- validation
def validate_cells(suite: Suite, cells: list[Cell] | None = None) -> None:
    """Parse every cell's configuration with the CLI's parser, as ``fit --print_config`` does
    (recipe, options, types), in this process. Cells that differ only in their seed share one check."""
    problems = _Problems(suite.path)
    checked: dict[tuple[str, ...], str | None] = {}
    refused: dict[str, list[str]] = {}  # one message, every cell it concerns
    for cell in cells if cells is not None else suite.cells:
        argv = cell.argv
        # Cells that differ only in the seed or in what {placeholders} filled in (paths) parse alike.
        key = cell.template or tuple(argv[:-2])
        if key not in checked:
            checked[key] = _parse_error(argv)
        message = checked[key]
        if message:
            origin = [f"--{o} ({src})" for o, src in cell.sources.items() if re.search(rf"--{re.escape(o)}\b", message)]
            where = f" Set in the suite file: {', '.join(origin)}." if origin else ""
            refused.setdefault(f"{message}{where}", []).append(cell.id)
    for message, ids in refused.items():
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        problems.add(f"{'cell' if len(ids) == 1 else 'cells'} {', '.join(ids[:3])}{more}: {message}")
    problems.raise_if_any()


def _parse_error(argv: list[str]) -> str | None:
    """The CLI's message for a configuration it refuses, or None."""
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            build_cli("fit", [*argv, "--print_config"], run=True)
    except SystemExit as exit_:
        code = exit_.code
    except Exception as error:  # noqa: BLE001 - what the parser refuses is the user's to fix
        cause = _user_cause(error)
        return str(cause) if cause is not None else f"{type(error).__name__}: {error}"
    if code in (0, None):
        return None
    lines = [line.strip() for line in err.getvalue().splitlines() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
    return " ".join(errors) if errors else (lines[-1] if lines else f"the configuration was refused (exit {code}).")


def _user_cause(error: BaseException) -> BaseException | None:
    """The UserError behind ``error`` (itself or a cause), as the CLI reports it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def check_output(folder: Path, create: bool) -> None:
    """The output folder must be writable (created when ``create``)."""
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise SuiteError(f"Cannot write into the suite's output folder {folder}: {err}. "
                             "Pass --output DIR (or output: in the file) with a writable folder.") from None
        return
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SuiteError(f"Cannot write into the suite's output folder {folder} ({existing} is not a writable folder). "
                         "Pass --output DIR (or output: in the file) with a writable folder.")


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``<folder>/.suite-run.lock`` while a ``suite run`` uses the output folder.

    Without it, two runs of one suite plan the same pending cell and both start a fit into its
    folder: a fit says it is running only once its interpreter has started (seconds), so the
    second run cannot see the first one's cell yet. The lock is an OS file lock (``flock``),
    released when the process ends however it ends, so a killed run leaves nothing stale; the
    file names its holder for the message a second run gets.
    """
    if fcntl is None:
        yield
        return
    path = folder / RUN_LOCK
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SuiteError(
                f"Another `suite run` is using the output folder {folder} ({holder}). Wait for it to finish "
                f"(`python -m benchmark suite status FILE` shows its progress), stop it, or run into another "
                f"folder with --output DIR."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


# ---------------------------------------------------------------------------- cell states
@dataclass
class CellState:
    """A cell's state on disk: pending, running, completed, interrupted, failed, or blocked (a
    ``run-cell`` found that a cell it needs cannot complete and did not start it).

    ``changes`` lists the options that differ between the arguments the cell's folder was made
    with (``suite.json``'s ``argv``) and what the suite file gives now, as ``--opt old -> new``."""

    state: str
    exit_code: int | None = None
    reason: str = ""
    checkpoint: Path | None = None
    attempts: int = 0
    seconds: float | None = None
    r_at_1: str = ""
    changes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _argv_options(argv: list[str]) -> dict[str, list[str]]:
    """``fit`` arguments as the suite writes them (``--option value`` pairs) -> {option: [values]}
    (``--config`` and ``--plugin`` may repeat; their order counts)."""
    options: dict[str, list[str]] = {}
    for flag, value in zip(argv[0::2], argv[1::2]):
        options.setdefault(flag.removeprefix("--"), []).append(value)
    return options


def argv_changes(recorded: list[str], now: list[str]) -> list[str]:
    """The options that differ between the ``fit`` arguments a cell ran with and those the suite
    file gives now, each ``--option old -> new`` (``(not set)`` where one side lacks it). Only
    values count: options written in another order in the file are the same configuration."""
    before, after = _argv_options(list(recorded)), _argv_options(list(now))

    def shown(values: list[str] | None) -> str:
        return "(not set)" if values is None else " ".join(values)

    keys = [*before, *(key for key in after if key not in before)]
    return [f"--{key} {shown(before.get(key))} -> {shown(after.get(key))}"
            for key in keys if before.get(key) != after.get(key)]


def cell_state(suite: Suite, cell: Cell) -> CellState:
    """The cell's state: its run's ``status.json`` as :func:`benchmark.results.run_state` reads it
    (a run whose process died without a final status, "killed" there, is interrupted here:
    resumable from ``last.ckpt``), else what ``suite.json`` recorded (an attempt that ended before
    ``fit`` wrote a status; a cell that ``run-cell`` did not start because a cell it needs cannot
    complete), else pending."""
    run = suite.run_dir(cell)
    record = _read_json(run / RECORD)
    attempts = record.get("attempts", [])
    seconds = sum(a.get("seconds", 0.0) for a in attempts) if attempts else None
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = last if last.is_file() else None
    changes = tuple(argv_changes(record["argv"], cell.argv)) if record.get("argv") else ()
    common = {"attempts": len(attempts), "seconds": seconds, "checkpoint": checkpoint, "changes": changes}
    status = run_state(run)
    if status.state == "completed":
        return CellState("completed", 0, status.reason, r_at_1=_test_r1(run), **common)
    if status.state in ("interrupted", "failed"):
        return CellState(status.state, status.exit_code, status.reason, **common)
    if status.state == "killed":
        return CellState("interrupted", None, status.reason, **common)
    if status.state == "running":
        return CellState("running", None, f"on {status.host} (pid {status.pid})", **common)
    if attempts and attempts[-1].get("exit_code") not in (None, 0):
        code = attempts[-1]["exit_code"]
        if code in (EXIT_SIGINT, EXIT_SIGTERM):
            return CellState("interrupted", code, "stopped before the run started", **common)
        return CellState("failed", code, attempts[-1].get("reason") or f"exit {code}", **common)
    blocked = record.get("blocked")
    if isinstance(blocked, dict):
        return CellState("blocked", None, str(blocked.get("reason") or ""), **common)
    return CellState("pending", **common)


def _test_r1(run: Path) -> str:
    """The run's final test R@1 in percent (:func:`benchmark.results.final_evaluation`, not a later
    ``test --ckpt_path``), with the first refined R@1 after an arrow."""
    try:
        final = final_evaluation(read_record(run / "metrics_test.json"))
    except RecordError:
        return ""
    if final is None:
        return ""
    value = final["metrics"].get("R@1")
    text = f"{100 * value:.2f}" if isinstance(value, (int, float)) else ""
    for key, refined in (final.get("refined") or {}).items():
        if isinstance(refined.get("R@1"), (int, float)):
            text += f" → {100 * refined['R@1']:.2f} ({key})"
            break
    return text


@dataclass
class Plan:
    """What running a cell now does: skip, run (fresh), resume (--ckpt_path), retry (fresh, the
    failed attempt kept), restart (fresh because its options changed, the old attempt kept),
    report (failed), wait (running elsewhere), blocked (a cell it needs has not completed), or
    refuse (interrupted, but its options changed: resuming would mix two configurations)."""

    action: str
    state: CellState
    ckpt: Path | None = None
    note: str = ""


STARTS = ("run", "resume", "retry", "restart")  # the plans that start a fit


def plan_cell(suite: Suite, cell: Cell, retry_failed: bool, states: dict[str, CellState] | None = None,
              restart_changed: bool = False) -> Plan:
    """What running ``cell`` now does, from its state and its needs' states (``states``: already
    read, else read now). A cell whose options changed since it ran is never resumed: it is
    refused, or with ``restart_changed`` started again from scratch (completed ones too)."""
    state = (states or {}).get(cell.id) or cell_state(suite, cell)
    changes = "; ".join(state.changes)
    changed = f"options changed: {changes}" if changes else ""

    def note(*parts: str) -> str:
        return "; ".join(p for p in parts if p)

    if state.state == "running":
        return Plan("wait", state, note=note(f"running {state.reason}", changed))
    if state.state == "completed" and not (state.changes and restart_changed):
        return Plan("skip", state, note=f"completed with other options: {changes} (--restart-changed runs it again)"
                    if changes else "completed")
    for need in cell.needs:
        need_state = (states or {}).get(need) or cell_state(suite, suite.cell(need))
        if need_state.state != "completed":
            return Plan("blocked", state, note=note(f"needs {need} ({need_state.state})", changed))
    if state.changes and restart_changed:
        return Plan("restart", state, note=f"start again from scratch: {changed}")
    if state.state == "interrupted":
        if state.checkpoint is None:
            return Plan("retry", state, note=note("interrupted before its first checkpoint: start again", changed))
        if state.changes:
            return Plan("refuse", state, note=f"not resumed: {changed}; --restart-changed starts it again from scratch")
        return Plan("resume", state, ckpt=state.checkpoint, note=f"resume from {state.checkpoint.name}")
    if state.state == "failed":
        failed = f"failed: {state.reason or f'exit {state.exit_code}'}"
        if retry_failed:
            return Plan("retry", state, note=note(f"retry ({failed})", changed))
        return Plan("report", state, note=note(failed, changed))
    return Plan("run", state)


def refuse_changed(suite: Suite, plans: dict[str, Plan]) -> None:
    """Raise when a cell would resume under options other than those it ran with.

    Resuming continues the checkpoint under the new options while the run's ``config.yaml``
    keeps the old ones: a result of neither configuration. The message names every such cell,
    what changed, and the two ways out."""
    refused = [(cell_id, plan) for cell_id, plan in plans.items() if plan.action == "refuse"]
    if not refused:
        return
    cells = "; ".join(f"{cell_id}: {', '.join(plan.state.changes)}" for cell_id, plan in refused)
    raise SuiteError(
        f"{suite.path}: the suite file's options changed since {_plural(len(refused), 'interrupted cell')} ran "
        f"({cells}). Resuming would continue their checkpoints under the new options while their config.yaml keeps "
        f"the old ones, so nothing was started. Pass --restart-changed to start them again from scratch (the old "
        f"attempt is kept under {suite.output / '.attempts'}), or restore the old values in the file to resume them."
    )


def fit_command(suite: Suite, cell: Cell, plan: Plan) -> list[str]:
    """The cell's ``fit`` command for ``plan`` (``--ckpt_path`` when it resumes)."""
    command = [sys.executable, "-m", "benchmark", "fit", *cell.argv, "--run_dir", str(suite.run_dir(cell))]
    if plan.action == "resume" and plan.ckpt is not None:
        command += ["--ckpt_path", str(plan.ckpt)]
    return command


def _move_aside(suite: Suite, cell: Cell) -> list[dict[str, Any]]:
    """Keep a failed / unusable attempt under ``<output>/.attempts/<cell>.<n>``; return its record."""
    run = suite.run_dir(cell)
    if not run.exists():
        return []
    attempts = _read_json(run / RECORD).get("attempts", [])
    keep = suite.output / ".attempts"
    keep.mkdir(parents=True, exist_ok=True)
    n = 1
    while (keep / f"{cell.id}.{n}").exists():
        n += 1
    os.replace(run, keep / f"{cell.id}.{n}")
    for attempt in attempts:
        attempt.setdefault("kept_in", str(keep / f"{cell.id}.{n}"))
    return attempts


# ---------------------------------------------------------------------------- running one cell
def _die_with_parent() -> None:
    """Linux: the fit gets SIGTERM (and saves last.ckpt) if the suite process dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class CellRun:
    """One attempt of a cell: a ``fit`` subprocess in its own process group, output to ``fit.log``."""

    def __init__(self, suite: Suite, cell: Cell, plan: Plan) -> None:
        self.suite, self.cell, self.plan = suite, cell, plan
        self.run_dir = suite.run_dir(cell)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.signals: list[int] = []
        self.reason = ""
        self.attempts: list[dict[str, Any]] = []

    def start(self) -> None:
        if self.plan.action in ("retry", "restart") or (
            self.plan.action == "run" and (self.run_dir / "config.yaml").exists()
        ):
            self.attempts = _move_aside(self.suite, self.cell)
        else:
            self.attempts = _read_json(self.run_dir / RECORD).get("attempts", [])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.command = fit_command(self.suite, self.cell, self.plan)
        self.log = open(self.run_dir / LOG, "a")  # noqa: SIM115 - closed in finish()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.log.write(f"\n===== suite {self.suite.name}: {self.cell.id} ({self.plan.action}) {stamp}\n"
                       f"$ {shlex.join(self.command)}\n")
        self.log.flush()
        self._record(None)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": os.environ.get("COLUMNS", "160")}
        env.setdefault("WANDB_RUN_GROUP", self.cell.group(self.suite.name))  # the W&B logger groups by it
        # Recorded by the run (metrics JSON, W&B config): the report filters a suite's runs by them.
        env.update(DML_BENCHMARK_SUITE=self.suite.name, DML_BENCHMARK_CELL=self.cell.id,
                   DML_BENCHMARK_VARIANT=self.cell.variant or "")  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            self.command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def send(self, signum: int, reason: str = "") -> None:
        """Forward a signal to the fit's process group (its DDP workers included)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signals.append(signum)
        self.reason = self.reason or reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def check_time_limit(self) -> None:
        limit = self.cell.resources.time
        if limit and self.elapsed > limit * 60 and not self.signals:
            self.send(signal.SIGTERM, f"time limit ({_duration(limit * 60)}) reached")

    def finish(self) -> int:
        code = self.proc.wait() if self.proc is not None else EXIT_FAILED
        if code < 0:  # killed by a signal the fit did not handle
            code = 128 - code
        if code not in (0, EXIT_SIGINT, EXIT_SIGTERM) and not self.reason:
            errors = [line for line in self.log_tail(40) if line.startswith(("error:", "Error", "Traceback"))]
            last = self.log_tail(1)
            self.reason = (errors[-1] if errors and not errors[-1].startswith("Traceback") else last[0] if last else "")[:300]
        self.log.write(f"===== exit {code} after {_duration(self.elapsed)}\n")
        self.log.close()
        self._record(code)
        return code

    def _record(self, code: int | None) -> None:
        attempt = {"action": self.plan.action, "command": self.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "host": socket.gethostname()}
        if code is None:
            self.attempts.append(attempt)
        else:
            self.attempts[-1].update(exit_code=code, seconds=round(self.elapsed, 1), reason=self.reason)
        payload = {"suite": str(self.suite.path), "cell": self.cell.id, "argv": self.cell.argv, "attempts": self.attempts}
        atomic_write_text(self.run_dir / RECORD, json.dumps(payload, indent=2) + "\n")

    def log_tail(self, lines: int = 1) -> list[str]:
        try:
            with open(self.run_dir / LOG, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        parts = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip() and not p.startswith("=====")]
        return parts[-lines:]


class _Signals:
    """SIGINT / SIGTERM while cells run: forward to the running fit (it stops after its step and
    saves last.ckpt), start no further cell, exit 130 / 143. A second Ctrl-C is forwarded too
    (the fit then aborts at once)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.running: list[CellRun] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        with contextlib.suppress(ValueError):  # not the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(ValueError):
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n[suite] {name}: stopping the running cell (it saves last.ckpt and resumes on the next run); "
                  "no further cell starts.", file=sys.stderr, flush=True)
        for run in self.running:
            run.send(signum, "stopped by " + ("SIGINT" if signum == signal.SIGINT else "SIGTERM"))

    @property
    def exit_code(self) -> int | None:
        if self.received is None:
            return None
        return EXIT_SIGINT if self.received == signal.SIGINT else EXIT_SIGTERM


# ---------------------------------------------------------------------------- progress view
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Cells finished / running / failed, elapsed and ETA: a live view on a terminal, lines otherwise."""

    def __init__(self, suite: Suite, todo: int, live: bool | None = None) -> None:
        self.suite, self.todo = suite, todo
        self.counts = {"completed": 0, "failed": 0, "interrupted": 0, "not started": 0}
        self.durations: list[float] = []
        self.start = time.monotonic()
        self.running: list[CellRun] = []
        self.failures: list[str] = []
        self.live_view = None
        if live if live is not None else sys.stdout.isatty():
            from rich.live import Live

            self.live_view = Live(self._render(), console=make_console(), refresh_per_second=2, transient=False)
            self.live_view.start()

    @property
    def finished_count(self) -> int:
        return sum(self.counts.values())

    def eta(self) -> str:
        left = self.todo - self.finished_count
        if left <= 0:
            return ""
        if not self.durations:
            return "?"
        mean = sum(self.durations) / len(self.durations)
        running = sum(min(r.elapsed, mean) for r in self.running)
        return _duration(max(0.0, left * mean - running))

    def headline(self) -> str:
        eta = self.eta()
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        return (f"{self.finished_count}/{self.todo} finished{' (' + counts + ')' if counts else ''} · "
                f"{len(self.running)} running · elapsed {_duration(time.monotonic() - self.start)}"
                + (f" · ETA {eta}" if eta else ""))

    def _render(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table.grid(padding=(0, 1))
        table.add_row(f"[bold]suite {self.suite.name}[/bold]: {self.headline()}")
        for run in self.running:
            tail = run.log_tail(1)
            table.add_row(f"  [cyan]▶ {run.cell.id}[/cyan] {_duration(run.elapsed)}  [dim]{escape(tail[0][:120]) if tail else ''}[/dim]")
        for line in self.failures[-5:]:
            table.add_row(f"  [red]✗ {escape(line)}[/red]")
        return table

    def say(self, line: str) -> None:
        if self.live_view is None:
            print(f"[suite] {line}", flush=True)
        else:
            self.live_view.console.print(line, highlight=False, markup=False)

    def started(self, run: CellRun) -> None:
        self.running.append(run)
        if self.live_view is None:
            self.say(f"{self.finished_count + 1}/{self.todo} {run.cell.id}: {run.plan.action}"
                     f"{' (' + run.plan.note + ')' if run.plan.note else ''}; log {run.run_dir / LOG}")
        self.refresh()

    def not_started(self, cell: Cell, note: str) -> None:
        self.counts["not started"] += 1
        self.failures.append(f"{cell.id}: not started, {note}")
        self.say(f"{cell.id}: not started ({note})")
        self.refresh()

    def finished(self, run: CellRun, code: int, state: CellState) -> None:
        self.running.remove(run)
        self.counts[state.state if state.state in self.counts else "failed"] += 1
        if state.state in ("completed", "failed"):
            self.durations.append(run.elapsed)
        if state.state == "completed":
            self.say(f"{run.cell.id}: completed in {_duration(run.elapsed)}"
                     + (f", test R@1 {state.r_at_1}" if state.r_at_1 else "") + f" — {self.headline()}")
        else:
            self.failures.append(f"{run.cell.id}: {state.state}, exit {code} ({state.reason or 'see ' + str(run.run_dir / LOG)})")
            self.say(f"{run.cell.id}: {state.state} (exit {code}) after {_duration(run.elapsed)}: {state.reason} — "
                     f"{self.headline()}")
            if state.state == "failed":
                for line in run.log_tail(12):
                    self.say(f"    | {line}")
        self.refresh()

    def refresh(self) -> None:
        if self.live_view is not None:
            self.live_view.update(self._render())

    def close(self) -> None:
        if self.live_view is not None:
            self.live_view.update(self._render())
            self.live_view.stop()


def status_table(suite: Suite, cells: list[Cell], states: dict[str, CellState], plans: dict[str, Plan] | None = None):
    """The cells as a table: state (``(changed)`` when the file's options differ from those the
    cell ran with), exit code, attempts, time, test R@1 and a note."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"suite {suite.name} ({suite.output})")
    for column in ("cell", "state", "exit", "tries", "time", "test R@1 %", "note"):
        table.add_column(column, justify="right" if column in ("exit", "tries", "time") else "left")
    colours = {"completed": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "pending": "dim",
               "blocked": "magenta"}
    for cell in cells:
        state = states[cell.id]
        note = state.reason
        if plans and cell.id in plans and plans[cell.id].action in ("blocked", "report", "refuse"):
            note = plans[cell.id].note
        if state.state == "interrupted" and state.checkpoint is not None and not state.changed:
            note = f"{note}; resumes from last.ckpt".strip("; ")
        if state.changed and "options changed" not in note:
            note = f"options changed: {'; '.join(state.changes)}; {note}".strip("; ")
        shown = f"[{colours.get(state.state, 'white')}]{state.state}[/]" + (" [magenta](changed)[/]" if state.changed else "")
        table.add_row(cell.id, shown, "" if state.exit_code is None else str(state.exit_code), str(state.attempts or ""),
                      _duration(state.seconds), state.r_at_1, escape(note[:100]))
    return table


def changed_lines(suite: Suite, cells: list[Cell], states: dict[str, CellState]) -> list[str]:
    """Every cell whose options changed since it ran, with what changed in full (the table's note
    is cut short), and what to do about it; no lines when none changed."""
    changed = [c for c in cells if states[c.id].changed]
    if not changed:
        return []
    lines = [f"changed since they ran ({RECORD}'s arguments -> the suite file's now):"]
    lines += [f"  {c.id} ({states[c.id].state}): {'; '.join(states[c.id].changes)}" for c in changed]
    lines.append(f"completed cells keep the results of their old options and interrupted ones are not resumed: "
                 f"`python -m benchmark suite run {suite.path} --restart-changed` starts them again from scratch "
                 f"(the old attempts are kept under {suite.output / '.attempts'}).")
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _counts(states: Iterable[CellState]) -> str:
    counts: dict[str, int] = {}
    changed = 0
    for state in states:
        counts[state.state] = counts.get(state.state, 0) + 1
        changed += state.changed
    order = ("completed", "running", "interrupted", "failed", "blocked", "pending")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) + (f" ({changed} changed)" if changed else "")


# ---------------------------------------------------------------------------- commands
def _selected(suite: Suite, only: list[str]) -> list[Cell]:
    if not only:
        return list(suite.cells)
    problems = _Problems(suite.path)
    selectors = [s for s in (parse_selector(text, "--only", problems) for text in only) if s is not None]
    problems.raise_if_any()
    chosen = [c for c in suite.cells if any(matches(c, s) for s in selectors)]
    if not chosen:
        raise SuiteError(f"--only {' '.join(only)} matches no cell of {suite.path}. `suite status` lists them.")
    return chosen


def run_serial(suite: Suite, cells: list[Cell], retry_failed: bool, live: bool | None = None,
               restart_changed: bool = False) -> int:
    """Run the cells one after another, each a fit subprocess; the exit code of the suite."""
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    plans = {c.id: plan_cell(suite, c, retry_failed, states, restart_changed) for c in cells}
    todo = [c for c in cells if plans[c.id].action in (*STARTS, "blocked")]
    skipped = [c for c in cells if plans[c.id].action == "skip"]
    reported = [c for c in cells if plans[c.id].action in ("report", "wait", "refuse")]
    print(f"[suite] {suite.name}: {_plural(len(cells), 'cell')} in {suite.output}: {len(skipped)} completed (skipped), "
          f"{len(todo)} to run, {len(reported)} failed or running elsewhere (not started)", flush=True)
    progress = Progress(suite, len(todo), live=live)
    with _Signals() as signals:
        try:
            for cell in todo:
                if signals.received is not None:
                    break
                plan = plan_cell(suite, cell, retry_failed, restart_changed=restart_changed)  # needs may have finished
                plans[cell.id] = plan
                if plan.action not in STARTS:
                    states[cell.id] = plan.state
                    progress.not_started(cell, plan.note)
                    continue
                run = CellRun(suite, cell, plan)
                run.start()
                signals.running.append(run)
                if signals.received is not None:  # the signal came while the fit was starting
                    run.send(signals.received, "stopped by " + signal.Signals(signals.received).name)
                progress.started(run)
                while run.poll() is None:
                    run.check_time_limit()
                    progress.refresh()
                    time.sleep(0.25)
                code = run.finish()
                signals.running.remove(run)
                states[cell.id] = cell_state(suite, cell)
                if run.reason and states[cell.id].state == "interrupted":
                    states[cell.id].reason = run.reason
                progress.finished(run, code, states[cell.id])
        finally:
            progress.close()
    _summary(suite, cells, states, plans)
    if signals.exit_code is not None:
        return signals.exit_code
    return EXIT_OK if all(states[c.id].state == "completed" for c in cells) else EXIT_FAILED


def _summary(suite: Suite, cells: list[Cell], states: dict[str, CellState], plans: dict[str, Plan]) -> None:
    console = make_console()
    console.print(status_table(suite, cells, states, plans))
    console.print(f"{_plural(len(cells), 'cell')}: {_counts(states[c.id] for c in cells)}", highlight=False)
    failed = [c for c in cells if states[c.id].state == "failed"]
    if failed:
        console.print(f"failed cells keep their folder and log ({LOG}); start them again with "
                      f"`python -m benchmark suite run {suite.path} --retry-failed`.", highlight=False)
    if any(states[c.id].state == "interrupted" and not states[c.id].changed for c in cells):
        console.print(f"interrupted cells resume from last.ckpt with `python -m benchmark suite run {suite.path}`.",
                      highlight=False)
    for line in changed_lines(suite, cells, states):
        console.print(line, highlight=False, markup=False)
    if any(states[c.id].state == "completed" for c in cells):
        console.print(f"results over the seeds: `python -m benchmark leaderboard --runs {suite.output}`", highlight=False)


WAIT_NEEDS_MINUTES = 24 * 60  # run-cell: how long a cell waits for the cells it needs (--wait-needs)
WAITABLE = ("pending", "running")  # states of a needed cell that may still complete without anyone's action


def record_blocked(suite: Suite, cell: Cell, reason: str) -> None:
    """Note in the cell's ``suite.json`` that it was not started, and why (``suite status`` shows the
    cell as blocked). The arguments are not recorded: the cell has not run with any."""
    run = suite.run_dir(cell)
    record = _read_json(run / RECORD)
    payload = {"suite": str(suite.path), "cell": cell.id, **({"argv": record["argv"]} if record.get("argv") else {}),
               "attempts": record.get("attempts", []),
               "blocked": {"reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname()}}
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / RECORD, json.dumps(payload, indent=2) + "\n")


def wait_for_needs(suite: Suite, cell: Cell, retry_failed: bool, restart_changed: bool,
                   wait_s: float) -> Plan | int:
    """``run-cell`` of a cell whose needs have not completed (W&B agents run the cells of a sweep
    at once): wait while every unfinished need is pending or running, polling their states, at
    most ``wait_s`` seconds. Returns the cell's plan once its needs have completed, or an exit code:

    * 0 when a need cannot complete by itself (failed, interrupted, blocked): the cell is not
      started and is recorded as blocked with the reason. Not an error of this cell (the need's
      own run carries the failure), and a W&B agent counts every non-zero exit as a failed run and
      stops after a few quick ones, which would end the sweep on that machine;
    * 1 when the wait runs out (recorded as blocked too): something is holding the sweep up;
    * 130 on Ctrl-C.
    """
    deadline = time.monotonic() + wait_s
    poll = min(30.0, max(1.0, wait_s / 60))  # 24 h: every 30 s; a minute: every second
    said = ""
    try:
        while True:
            plan = plan_cell(suite, cell, retry_failed, restart_changed=restart_changed)
            if plan.action != "blocked":
                return plan
            unfinished = {n: cell_state(suite, suite.cell(n)) for n in cell.needs}
            unfinished = {n: s for n, s in unfinished.items() if s.state != "completed"}
            if not unfinished:
                continue  # completed between the two reads
            stuck = {n: s for n, s in unfinished.items() if s.state not in WAITABLE}
            if stuck:
                reason = "; ".join(f"needs {n}, which is {s.state}" + (f" ({s.reason})" if s.reason else "")
                                   for n, s in stuck.items())
                record_blocked(suite, cell, reason)
                print(f"[suite] {cell.id}: skipped, not started: {reason}. Recorded as blocked in "
                      f"{suite.run_dir(cell) / RECORD} (exit 0: not a failure of this cell). Once the cell it needs "
                      f"has completed (`python -m benchmark suite run {suite.path} --retry-failed` retries failed cells "
                      "and resumes interrupted ones), run this cell again.", file=sys.stderr, flush=True)
                return EXIT_OK
            waiting = ", ".join(f"{n} ({s.state}{' ' + s.reason if s.reason else ''})" for n, s in unfinished.items())
            left = deadline - time.monotonic()
            if left <= 0:
                reason = f"waited {_duration(wait_s)} for {waiting}"
                record_blocked(suite, cell, reason)
                print(f"[suite] {cell.id}: not started: {reason}, which did not complete. Start the cells it needs "
                      f"(`python -m benchmark suite run {suite.path}`), or wait longer with --wait-needs.",
                      file=sys.stderr, flush=True)
                return EXIT_FAILED
            if waiting != said:
                print(f"[suite] {cell.id}: waiting for the cells it needs: {waiting}; up to {_duration(left)} more, "
                      f"checking every {poll:g} s (--wait-needs sets the limit).", flush=True)
                said = waiting
            time.sleep(min(poll, left))
    except KeyboardInterrupt:
        print(f"\n[suite] {cell.id}: Ctrl-C while waiting for the cells it needs; not started.", file=sys.stderr)
        return EXIT_SIGINT


def run_one(suite: Suite, cell: Cell, retry_failed: bool, quiet: bool = False, restart_changed: bool = False,
            wait_needs_s: float = WAIT_NEEDS_MINUTES * 60) -> int:
    """``suite run-cell``: one cell with the suite's rules; the fit's exit code (see
    :func:`wait_for_needs` for a cell whose needs have not completed)."""
    plan = plan_cell(suite, cell, retry_failed, restart_changed=restart_changed)
    if plan.action == "blocked":
        waited = wait_for_needs(suite, cell, retry_failed, restart_changed, wait_needs_s)
        if isinstance(waited, int):
            return waited
        plan = waited
    refuse_changed(suite, {cell.id: plan})
    if plan.action == "skip":
        print(f"[suite] {cell.id}: {plan.note}; nothing to do.", flush=True)
        return EXIT_OK
    if plan.action in ("report", "wait"):
        print(f"[suite] {cell.id}: not started: {plan.note}"
              + (" (--retry-failed starts it again)" if plan.action == "report" else ""), file=sys.stderr, flush=True)
        return EXIT_FAILED
    with _Signals() as signals:
        run = CellRun(suite, cell, plan)
        run.start()
        signals.running.append(run)
        if signals.received is not None:
            run.send(signals.received, "stopped by " + signal.Signals(signals.received).name)
        if not quiet:
            print(f"[suite] {cell.id}: {plan.action}; log {run.run_dir / LOG}\n$ {shlex.join(run.command)}", flush=True)
        while run.poll() is None:
            run.check_time_limit()
            time.sleep(0.25)
        code = run.finish()
    state = cell_state(suite, cell)
    print(f"[suite] {cell.id}: {state.state} (exit {code}) after {_duration(run.elapsed)}"
          + (f", test R@1 {state.r_at_1}" if state.r_at_1 else ""), flush=True)
    if state.state == "failed":
        for line in run.log_tail(12):
            print(f"    | {line}", file=sys.stderr, flush=True)
    return code


def dry_run(suite: Suite, cells: list[Cell], retry_failed: bool, restart_changed: bool = False) -> int:
    """List the cells, their states, what a run would do (and why) and their exact ``fit`` commands."""
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    print(f"suite {suite.name} ({suite.path}): {len(cells)} cells, output {suite.output}")
    for i, cell in enumerate(cells, 1):
        plan = plan_cell(suite, cell, retry_failed, states, restart_changed)
        label = {"skip": "skip", "run": "run", "resume": "resume", "retry": "retry", "restart": "restart",
                 "report": "not started", "wait": "not started", "refuse": "not started",
                 "blocked": "after its dependencies"}[plan.action]
        note = f" ({plan.note})" if plan.note else ""
        shown = states[cell.id].state + (", changed" if states[cell.id].changed else "")
        print(f"[{i}/{len(cells)}] {cell.id}: {shown} -> {label}{note}")
        if "config" not in cell.options and "recipe" not in cell.options:
            recipe = recipe_dir() / cell.method / f"{cell.dataset}.yaml"
            print(f"    recipe: {recipe if recipe.is_file() else 'none (the constructors defaults apply)'}")
        if cell.needs:
            print(f"    needs: {', '.join(cell.needs)}")
        for table, row in cell.reproduces:
            print(f"    reproduces: {suite.paper} {table}, {row}")
        command_plan = plan if plan.action in STARTS else Plan("run", plan.state)
        print(f"    {shlex.join(fit_command(suite, cell, command_plan))}")
    for line in changed_lines(suite, cells, states):
        print(line)
    return EXIT_OK


def show_status(suite: Suite, cells: list[Cell]) -> int:
    """``suite status``: the table of cells (with SLURM's view of submitted ones) and what changed."""
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    jobs = submitted_jobs(suite.output / ".submitit")
    queued = queued_on_slurm(jobs)
    for cell_id, job in jobs.items():
        state = states.get(cell_id)
        if state is not None and state.state not in ("completed", "running"):
            state.reason = (f"{queued[cell_id]}" if cell_id in queued else f"submitted as job {job}") + (
                f"; {state.reason}" if state.reason else "")
    console = make_console()
    console.print(status_table(suite, cells, states))
    console.print(f"{_plural(len(cells), 'cell')}: {_counts(states[c.id] for c in cells)}", highlight=False)
    for line in changed_lines(suite, cells, states):
        console.print(line, highlight=False, markup=False)
    return EXIT_OK


# ---------------------------------------------------------------------------- W&B sweeps
SWEEP_COMMAND = ["${env}", "${interpreter}", "-m", "benchmark", "suite", "run-cell", "${program}", "${args}"]


FALLBACK_METRIC = ("test/R@1", "max")  # the leaderboard's default ranking, logged by every method


def sweep_metric(cells: list[Cell]) -> tuple[dict[str, str], str]:
    """The ``metric:`` of the sweep: what the cells are judged by, as logged to W&B, and why.

    Each cell's checkpoints are selected by ``--checkpoint.monitor`` when the suite file sets it,
    else by its method's ``selection_metric`` (``val/R@1``; Context-Refine ``val/refined/R@1``),
    in the direction of ``--checkpoint.mode`` or the method's ``selection_mode``; the sweep's metric
    is its test-split counterpart (``test/...``, the end-of-training test, in every run's summary).
    When the cells disagree (a two-stage suite), or a metric has no test counterpart, it is
    ``test/R@1`` (maximize), which every method logs and the leaderboard ranks by by default."""
    chosen: set[tuple[str, str]] = set()
    for cell in cells:
        method = registry.METHODS.get(cell.method)
        monitor = str(cell.options.get("checkpoint.monitor") or getattr(method, "selection_metric", "val/R@1"))
        mode = str(cell.options.get("checkpoint.mode") or getattr(method, "selection_mode", "max"))
        chosen.add(("test/" + monitor.removeprefix("val/"), mode) if monitor.startswith("val/") else FALLBACK_METRIC)
    if len(chosen) == 1:
        (name, mode), = chosen
        why = "the metric every cell's checkpoints are selected by, on the test split"
    else:
        name, mode = FALLBACK_METRIC
        why = (f"the cells are selected by different metrics ({', '.join(sorted(n for n, _ in chosen))}): "
               "test/R@1, which every method logs")
    return {"name": name, "goal": "maximize" if mode == "max" else "minimize"}, why


def sweep_config(suite: Suite, cells: list[Cell], program: str) -> dict[str, Any]:
    """A W&B sweep (grid over one ``cell`` parameter) whose agents run ``suite run-cell``, with the
    metric the cells are judged by (:func:`sweep_metric`)."""
    return {
        "name": f"suite-{suite.name}",
        "description": suite.description or f"benchmark suite {suite.name}",
        "project": os.environ.get("WANDB_PROJECT", "dml-benchmark"),  # where the cells' W&B runs log
        "program": program,
        "method": "grid",
        "metric": sweep_metric(cells)[0],
        "parameters": {"cell": {"values": [c.id for c in cells]}},
        "command": list(SWEEP_COMMAND),
    }


def export_sweep(suite: Suite, cells: list[Cell], program: str, out: str | None) -> int:
    """Write (or print) the sweep config of ``cells``, with a header on how to start it."""
    config = sweep_config(suite, cells, program)
    metric, why = sweep_metric(cells)
    header = (
        f"# W&B sweep for the suite {suite.name} ({len(cells)} cells): each agent run is one cell,\n"
        f"#   python -m benchmark suite run-cell {program} --cell=<id>\n"
        "# with the suite's rules (completed cells are skipped, interrupted ones resume; a cell that needs\n"
        "# another cell's run waits for it while it is pending or running, and is skipped, exit 0, if it failed).\n"
        f"# metric: {metric['name']} ({metric['goal']}): {why}.\n"
        "# Start it with\n"
        f"#   wandb sweep {out or 'sweep.yaml'}      then, on each machine, from this folder and this venv:\n"
        "#   wandb agent <entity>/<project>/<sweep id>\n"
    )
    text = header + yaml.safe_dump(config, sort_keys=False, width=1 << 20)
    others = sorted({str(c.options.get("logger", "wandb")) for c in cells} - {"wandb"})
    if others:
        print(f"[suite] note: cells log with --logger {', '.join(others)}; the sweep's runs show their metrics in W&B "
              "only with the wandb logger (logger: wandb in the suite's args).", file=sys.stderr)
    chosen = {c.id for c in cells}
    outside = sorted({n for c in cells for n in c.needs if n not in chosen
                      and cell_state(suite, suite.cell(n)).state != "completed"})
    if outside:
        print(f"[suite] note: cells of the sweep need {', '.join(outside)}, which the sweep does not run and which "
              "have not completed: their agents wait for them (--wait-needs), then give up.", file=sys.stderr)
    if out:
        try:
            atomic_write_text(Path(out), text)
        except OSError as err:
            raise SuiteError(f"Cannot write {out}: {err}.") from None
        print(f"[suite] wrote {out}: a W&B grid sweep over {len(cells)} cells; `wandb sweep {out}`, then `wandb agent ...`")
    else:
        sys.stdout.write(text)
    return EXIT_OK


# ---------------------------------------------------------------------------- submitit launchers
class CellJob(submitit.helpers.Checkpointable):
    """A submitit job running one cell (``run_one`` with the suite's rules).

    On SLURM's time limit or a preemption submitit calls :meth:`checkpoint`: the fit gets
    SIGTERM, saves ``last.ckpt`` and exits, and the job is requeued; the requeued job resumes
    the cell. In a job of several tasks (multi-GPU / multi-node DDP), task 0 decides how the
    cell starts and the other tasks run the same command (Lightning's SLURM environment wires
    the ranks).
    """

    def __init__(self, enforce_time: bool = True, restart_changed: bool = False) -> None:
        self.enforce_time = enforce_time  # resources.time: SIGTERM the fit (SLURM enforces it itself)
        self.restart_changed = restart_changed  # suite run --restart-changed
        self.run: CellRun | None = None

    def __call__(self, suite: Suite, cell_id: str, retry_failed: bool) -> dict[str, Any]:
        cell = suite.cell(cell_id)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1 and env.global_rank != 0:
            return self._follow(suite, cell, env)
        plan = plan_cell(suite, cell, retry_failed, restart_changed=self.restart_changed)
        if plan.action == "skip":
            return {"cell": cell_id, "state": "completed", "exit_code": 0, "skipped": True}
        if plan.action not in STARTS:
            raise RuntimeError(f"{cell_id}: not started: {plan.note}")
        self.run = CellRun(suite, cell, plan)
        self.run.start()
        if env.num_tasks > 1:
            atomic_write_text(self.run.run_dir / f".launch-{env.job_id}.json", json.dumps({"command": self.run.command}))
        with _Signals() as signals:
            signals.running.append(self.run)
            while self.run.poll() is None:
                if self.enforce_time:
                    self.run.check_time_limit()
                time.sleep(0.5)
            code = self.run.finish()
        state = cell_state(suite, cell)
        if code != 0:
            raise RuntimeError(f"{cell_id}: {state.state} (exit {code}): {state.reason}; log {self.run.run_dir / LOG}")
        return {"cell": cell_id, "state": state.state, "exit_code": code, "seconds": round(self.run.elapsed, 1)}

    def _follow(self, suite: Suite, cell: Cell, env: Any) -> dict[str, Any]:
        launch = suite.run_dir(cell) / f".launch-{env.job_id}.json"
        deadline = time.monotonic() + 600
        while not launch.is_file():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cell.id}: task 0 did not start the cell within 10 minutes")
            time.sleep(1)
        command = json.loads(launch.read_text())["command"]
        with open(suite.run_dir(cell) / f"fit.rank{env.global_rank}.log", "a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        return {"cell": cell.id, "rank": env.global_rank, "exit_code": code}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        if self.run is not None and self.run.poll() is None:
            self.run.send(signal.SIGTERM, "time limit or preemption (requeued)")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run.proc.wait(timeout=300)
            self.run.finish()
        self.run = None
        return submitit.helpers.DelayedSubmission(CellJob(self.enforce_time, self.restart_changed), *args, **kwargs)


def _executor(suite: Suite, launcher: str, resources: Resources, folder: Path):
    executor = submitit.AutoExecutor(folder=str(folder), cluster=launcher)
    gpus = 0
    if resources.accelerator not in ("cpu",) and isinstance(resources.devices, int):
        gpus = resources.devices
    params: dict[str, Any] = {"name": f"suite-{suite.name}", "nodes": resources.num_nodes or 1}
    if resources.time:
        params["timeout_min"] = int(max(1, round(resources.time)))
    if resources.cpus_per_task:
        params["cpus_per_task"] = resources.cpus_per_task
    if resources.mem_gb:
        params["mem_gb"] = resources.mem_gb
    if launcher == "slurm":
        params["gpus_per_node"] = gpus
        params["tasks_per_node"] = max(1, gpus)  # one task per GPU: Lightning's SLURM environment
        slurm = suite.slurm
        for key in ("partition", "account", "qos", "constraint", "array_parallelism", "signal_delay_s"):
            if slurm.get(key) is not None:
                params[f"slurm_{key}"] = slurm[key]
        params.setdefault("slurm_signal_delay_s", 120)
        if slurm.get("setup"):
            params["slurm_setup"] = [str(line) for line in slurm["setup"]]
        if slurm.get("additional"):
            params["slurm_additional_parameters"] = dict(slurm["additional"])
    else:
        params["tasks_per_node"] = 1  # Lightning starts its own DDP processes on one machine
        if gpus:
            params["gpus_per_node"] = gpus
    executor.update_parameters(**params)
    return executor


def _stages(suite: Suite, cells: list[Cell]) -> list[list[Cell]]:
    """Cells grouped so that every cell comes after the cells it needs."""
    chosen = {c.id for c in cells}
    level: dict[str, int] = {}
    for cell in suite.cells:  # already in dependency order
        level[cell.id] = max([level[n] + 1 for n in cell.needs if n in chosen] or [0])
    stages: dict[int, list[Cell]] = {}
    for cell in cells:
        stages.setdefault(level[cell.id], []).append(cell)
    return [stages[k] for k in sorted(stages)]


class _Jobs:
    """The submitted jobs: ``jobs.json`` for the record, one line per job as it finishes."""

    def __init__(self, suite: Suite, folder: Path, total: int) -> None:
        self.suite, self.folder, self.total = suite, folder, total
        self.items: list[tuple[Cell, Any]] = []
        self.reported: set[str] = set()
        self.start = time.monotonic()
        self.record = submitted_jobs(folder)  # earlier submissions too: cell -> its latest job

    def add(self, cell: Cell, job: Any) -> None:
        self.items.append((cell, job))
        self.record[cell.id] = str(job.job_id)
        payload = [{"cell": c, "job_id": j} for c, j in self.record.items()]
        atomic_write_text(self.folder / "jobs.json", json.dumps(payload, indent=2) + "\n")

    def report_finished(self) -> bool:
        """Print the jobs that finished since the last call; True when every job has finished."""
        for cell, job in self.items:
            if cell.id in self.reported or not job.done():
                continue
            self.reported.add(cell.id)
            state = cell_state(self.suite, cell)
            error = ""
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - the job's failure is reported, not raised
                error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            print(f"[suite] {cell.id}: {state.state} (job {job.job_id}) — {len(self.reported)}/{self.total} finished, "
                  f"elapsed {_duration(time.monotonic() - self.start)}"
                  + (f"; {error}" if error and state.state != "completed" else ""), flush=True)
        return len(self.reported) == len(self.items)

    def wait(self) -> None:
        while not self.report_finished():
            time.sleep(1.0)

    def cancel(self) -> None:
        for _, job in self.items:
            if not job.done():
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
        for _, job in self.items:
            with contextlib.suppress(Exception):
                job.wait()


def submitted_jobs(folder: Path) -> dict[str, str]:
    """The job id each cell was last submitted as (``<output>/.submitit/jobs.json``)."""
    try:
        return {item["cell"]: str(item["job_id"]) for item in json.loads((folder / "jobs.json").read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def queued_on_slurm(jobs: dict[str, str]) -> dict[str, str]:
    """The cells whose job SLURM still holds (pending, running, requeued): ``squeue``; none without it."""
    if not jobs or shutil.which("squeue") is None:
        return {}
    arrays = sorted({job.split("_")[0] for job in jobs.values()})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)], capture_output=True,
                             text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    alive = {line.split()[0]: line.split()[1] for line in out.splitlines() if len(line.split()) >= 2}
    return {cell: f"job {job} {alive[job].lower()}" for cell, job in jobs.items() if job in alive}


def run_submitit(suite: Suite, cells: list[Cell], retry_failed: bool, launcher: str, wait: bool,
                 max_parallel: int | None, restart_changed: bool = False) -> int:
    """Hand the cells to submitit: one job array per stage and resource set (SLURM; a later
    stage's arrays depend on the earlier ones), or local jobs (at most ``max_parallel`` at once,
    a stage after the previous one has finished). Each job runs :class:`CellJob`."""
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    plans = {c.id: plan_cell(suite, c, retry_failed, states, restart_changed) for c in cells}
    todo = [c for c in cells if plans[c.id].action in (*STARTS, "blocked")]
    folder = suite.output / ".submitit"
    queued = queued_on_slurm(submitted_jobs(folder)) if launcher == "slurm" else {}
    for cell in [c for c in todo if c.id in queued]:
        print(f"[suite] {cell.id}: already submitted ({queued[cell.id]}); not submitted again", flush=True)
    todo = [c for c in todo if c.id not in queued]
    print(f"[suite] {suite.name}: {_plural(len(cells), 'cell')}, {len(todo)} to run with submitit ({launcher}); "
          f"job logs in {folder}", flush=True)
    jobs = _Jobs(suite, folder, len(todo))
    interrupted = None
    try:
        previous: list[str] = []  # the job arrays of the earlier stages (SLURM: afterok dependencies)
        for stage in _stages(suite, todo):
            groups: dict[Resources, list[Cell]] = {}
            for cell in stage:
                groups.setdefault(cell.resources, []).append(cell)
            stage_ids = []
            for resources, group in groups.items():
                executor = _executor(suite, launcher, resources, folder)
                job = CellJob(enforce_time=launcher != "slurm", restart_changed=restart_changed)  # SLURM: its own limit
                if launcher == "local":
                    _local_jobs(executor, job, group, retry_failed, max_parallel, resources, jobs)
                    continue
                if previous:
                    executor.update_parameters(slurm_additional_parameters={
                        **dict(suite.slurm.get("additional") or {}), "dependency": "afterok:" + ":".join(previous)})
                array = executor.map_array(job, [suite] * len(group), [c.id for c in group], [retry_failed] * len(group))
                for cell, submitted in zip(group, array):
                    jobs.add(cell, submitted)
                if array:
                    stage_ids.append(str(array[0].job_id).split("_")[0])
                    print(f"[suite] submitted {_plural(len(group), 'cell')} as job array {stage_ids[-1]}", flush=True)
            previous += stage_ids
        if launcher == "slurm" and wait:
            jobs.wait()
    except KeyboardInterrupt:
        interrupted = EXIT_SIGINT
        print("\n[suite] Ctrl-C: cancelling the jobs (running cells save last.ckpt and resume on the next run).",
              file=sys.stderr, flush=True)
        jobs.cancel()
    if launcher == "slurm" and not wait and interrupted is None:
        print(f"[suite] submitted; `python -m benchmark suite status {suite.path}` shows the cells' states "
              f"(job ids in {folder / 'jobs.json'}).", flush=True)
        return EXIT_OK
    states = {c.id: cell_state(suite, c) for c in suite.cells}
    _summary(suite, cells, states, plans)
    if interrupted is not None:
        return interrupted
    return EXIT_OK if all(states[c.id].state == "completed" for c in cells) else EXIT_FAILED


def _local_jobs(executor: Any, job: CellJob, group: list[Cell], retry_failed: bool, max_parallel: int | None,
                resources: Resources, jobs: _Jobs) -> None:
    """Run ``group`` as local jobs, at most ``max_parallel`` at once, each on its own GPUs.

    submitit's local executor starts every job at once and shows each the same GPUs; here a job
    takes a free slot k and sees GPUs [k*g, (k+1)*g) (g = ``resources.devices``). Without
    ``--max-parallel``: one slot per GPU set, or every cell at once on a CPU-only machine.
    """
    gpus = resources.devices if isinstance(resources.devices, int) and resources.accelerator != "cpu" else 0
    available = torch.cuda.device_count() if gpus else 0
    if available < gpus:
        gpus = 0  # no (or too few) GPUs here: each cell runs as its accelerator setting decides
    slots = available // gpus if gpus else len(group)
    free = list(range(max(1, min(max_parallel or slots, slots))))
    pending, running = list(group), []
    while pending or running:
        while pending and free:
            cell, slot = pending.pop(0), free.pop(0)
            if gpus:
                executor.update_parameters(visible_gpus=list(range(slot * gpus, (slot + 1) * gpus)))
            submitted = executor.submit(job, jobs.suite, cell.id, retry_failed)
            jobs.add(cell, submitted)
            running.append((submitted, slot))
        time.sleep(0.5)
        for submitted, slot in list(running):
            if submitted.done():
                running.remove((submitted, slot))
                free.append(slot)
        jobs.report_finished()


# ---------------------------------------------------------------------------- entry point
def _parser(command: str) -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=f"python -m benchmark suite {command}", add_help=True)
    parser.add_argument("file", help="suite file or the name of a shipped suite")
    if command in ("run", "status", "run-cell"):
        parser.add_argument("--output", help="the suite's output folder (default: output: in the file)")
    if command in ("run", "status", "export-sweep"):
        parser.add_argument("--only", action="append", default=[], help="selector, e.g. dataset=cub,seed=0")
    if command in ("run", "run-cell"):
        parser.add_argument("--retry-failed", action="store_true", help="start failed cells again")
        parser.add_argument("--restart-changed", action="store_true",
                            help="start cells whose options changed since they ran again from scratch")
    if command == "run":
        parser.add_argument("--dry-run", action="store_true", help="list the cells and their commands")
        parser.add_argument("--launcher", choices=("serial", "local", "slurm"), default="serial")
        parser.add_argument("--max-parallel", type=int, default=None, help="local launcher: cells at once")
        parser.add_argument("--wait", action="store_true", help="slurm: wait for the jobs")
    if command == "run-cell":
        parser.add_argument("--cell", required=True, help="the cell id (suite run --dry-run lists them)")
        parser.add_argument("--wait-needs", default=f"{WAIT_NEEDS_MINUTES // 60}h",
                            help="how long to wait for the cells this one needs (90, '90m', '4h'; 0: not at all)")
    if command == "export-sweep":
        parser.add_argument("--out", help="write the sweep config here (default: stdout)")
    if command == "paper-table":
        parser.add_argument("--output", help="the suite's output folder (default: output: in the file)")
        parser.add_argument("--table", action="append", default=None,
                            help="only this table of the paper (repeatable; default: every table the suite reproduces)")
    return parser


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        command = self.prog.rsplit(" ", 1)[-1]
        raise SuiteError(f"suite {command}: {message}. `python -m benchmark suite {command} --help` lists the options.")


def _parse_args(command: str, argv: list[str]) -> argparse.Namespace:
    return _parser(command).parse_args(argv)


def main(argv: list[str]) -> int:
    """``python -m benchmark suite ...``; user errors become SuiteError (exit 2 in cli.main)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    commands: dict[str, Callable[[list[str]], int]] = {
        "run": _cmd_run, "run-cell": _cmd_run_cell, "status": _cmd_status, "export-sweep": _cmd_export, "list": _cmd_list,
        "paper-table": _cmd_paper_table,
    }
    if command not in commands:
        raise SuiteError(f"Unknown suite command {command!r}.{_closest(command, commands)} "
                         f"Choose one of: {', '.join(commands)}.")
    try:
        return commands[command](rest)
    except SystemExit as exit_:  # --help of a suite command
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK


def cell_recipe(cell: Cell) -> Path | None:
    """The recipe a cell's fit applies (its own --config/--recipe, else configs/<method>/<dataset>.yaml)."""
    given = cell.options.get("recipe") or cell.options.get("config")
    if given == "none":
        return None
    path = Path(str(given)) if given else recipe_dir() / cell.method / f"{cell.dataset}.yaml"
    return path if path.is_file() else None


def _cmd_paper_table(argv: list[str]) -> int:
    """``suite paper-table FILE``: the paper's tables in its order, our numbers beside them, uncovered cells marked."""
    args = _parse_args("paper-table", argv)
    suite = load_suite(args.file, args.output)
    if suite.paper is None:
        raise SuiteError(f"{suite.path} names no paper: add paper: NAME and reproduces: entries (docs/leaderboard.md).")
    found = paper_tables.lines(suite, cell_recipe, args.table)
    if not found:
        raise SuiteError(f"{suite.path}: no number of {suite.paper} in the tables asked for ({args.table}).")
    paper_tables.render(suite, found, make_console())
    return EXIT_OK


def _cmd_list(argv: list[str]) -> int:
    from rich.table import Table

    table = Table(title="suites (python -m benchmark suite run NAME)")
    table.add_column("name")
    table.add_column("cells", justify="right")
    table.add_column("description")
    for name, path in shipped_suites().items():
        try:
            suite = load_suite(path)
            count, text = str(len(suite.cells)), suite.description.splitlines()[0] if suite.description else ""
        except UserError as err:
            count, text = "?", f"(invalid: {err})"
        table.add_row(name, count, text)
    make_console().print(table)
    return EXIT_OK


def _cmd_run(argv: list[str]) -> int:
    args = _parse_args("run", argv)
    suite = load_suite(args.file, args.output)
    cells = _selected(suite, args.only)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SuiteError("--max-parallel must be at least 1.")
    if args.launcher == "slurm" and not args.dry_run and shutil.which("sbatch") is None:
        raise SuiteError("--launcher slurm needs SLURM's sbatch, which is not on this machine's PATH: run the "
                         "command on the cluster's login node, or use --launcher local (this machine, in parallel).")
    check_output(suite.output, create=not args.dry_run)
    validate_cells(suite, cells)
    if args.dry_run:
        return dry_run(suite, cells, args.retry_failed, args.restart_changed)
    with run_lock(suite.output):
        states = {c.id: cell_state(suite, c) for c in suite.cells}
        refuse_changed(suite, {c.id: plan_cell(suite, c, args.retry_failed, states, args.restart_changed) for c in cells})
        if args.launcher == "serial":
            return run_serial(suite, cells, args.retry_failed, restart_changed=args.restart_changed)
        return run_submitit(suite, cells, args.retry_failed, args.launcher, args.wait, args.max_parallel,
                            restart_changed=args.restart_changed)


def _cmd_run_cell(argv: list[str]) -> int:
    args = _parse_args("run-cell", argv)
    suite = load_suite(args.file, args.output)
    cell = suite.cell(args.cell)
    text = str(args.wait_needs).strip()
    given: Any = float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else text  # minutes, or 90m / 4h / D-HH:MM:SS
    problems = _Problems(suite.path)
    minutes = 0.0 if given == 0 else _minutes(given, "--wait-needs", problems)
    if problems.items:
        raise SuiteError(f"suite run-cell: {problems.items[0]}")
    wait = (minutes or 0.0) * 60
    check_output(suite.output, create=True)
    validate_cells(suite, [cell])
    return run_one(suite, cell, args.retry_failed, restart_changed=args.restart_changed, wait_needs_s=wait)


def _cmd_status(argv: list[str]) -> int:
    args = _parse_args("status", argv)
    suite = load_suite(args.file, args.output)
    return show_status(suite, _selected(suite, args.only))


def _cmd_export(argv: list[str]) -> int:
    args = _parse_args("export-sweep", argv)
    suite = load_suite(args.file)
    cells = _selected(suite, args.only)
    validate_cells(suite, cells)
    return export_sweep(suite, cells, args.file, args.out)
