"""The suite file: its constants, data model (Resources, Cell, Suite) and loading (grids, selectors,
placeholders, dependencies, the paper rows its cells reproduce)."""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.core.catalog import Catalog, catalog
from benchmark.core.defaults import recipe_dir
from benchmark.core.errors import EXIT_COMPLETED, UserError
from benchmark.core.papers import known_papers, paper_numbers

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
    paper: str | None = None  # the paper whose tables the suite reproduces (benchmark/core/reference/<paper>.csv)

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
        known = catalog(plugins)  # the registered names, read without importing the methods (fast status)
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
        cells += _expand_grid(grid, where, common, base_resources, plugins, known, problems)
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

    Every entry names cells by selector and one (table, row) of ``benchmark/core/reference/<paper>.csv``;
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
        problems.add(f"paper {paper!r} has no reference numbers; known papers: {', '.join(known)} (benchmark/core/reference/).")
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


def _expand_grid(grid: Any, where: str, common: dict[str, Any], resources: Resources, plugins: tuple[str, ...], known: Catalog,
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
    for kind, names, table, command in (
        ("method", methods, known.methods, "list"), ("dataset", datasets, known.datasets, "list"),
        ("backbone", [b for b in backbones if b is not None], known.backbones, "list"),
    ):
        for name in names:
            if not isinstance(name, str) or name not in table:
                problems.add(f"{where}: unknown {kind} {name!r}.{_closest(str(name), table)} "
                             f"Registered: {', '.join(sorted(table))} (python -m benchmark {command}).")
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


# ---------------------------------------------------------------------------- text helpers
def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
