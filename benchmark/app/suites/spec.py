"""The suite file: its constants, data model (Cell, Suite) and loading (grids, selectors,
placeholders, dependencies, the paper rows its cells reproduce).

:func:`load_suite` turns a YAML file (docs/leaderboard.md, "The file format") into a
:class:`Suite`. The file's keys and value types are its schema's (:mod:`.fields`:
:class:`SuiteFile`, :class:`GridSpec`, :class:`Resources`, ...), parsed by jsonargparse section
by section; this module works on the typed sections and checks what is not a type (registered
names, options the suite sets itself, selectors, duplicates, dependencies). Every grid is
expanded into the product methods × datasets × backbones × variants × ``options:``
combinations × seeds, then ``exclude:`` removes cells and ``cells:`` overrides options of the
cells its selectors match, in file order. A cell's options are applied
in this order, a later one replacing an earlier one: ``args``, the grid's ``args``, the
variant's, the ``options`` combination's, the matching ``cells:`` entries, then ``resources``.
String values may name placeholders (``{output}``, ``{cell}``, ...), and a cell whose options
name another cell's run directory needs that cell (:func:`_find_dependencies`).

Loading reads only the file and the registries' names (:func:`benchmark.core.catalog.catalog`,
which imports no method; jsonargparse imports no torch either), so the light commands
(``suite status``, ``list``) can use it. Problems are collected in :class:`_Problems` and
raised together as one :class:`SuiteError`, so that a user fixes a file in one pass instead of
one error per run.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.app.suites.fields import (
    GRID_EXAMPLE,
    GridSpec,
    Reproduces,
    Resources,
    SlurmSpec,
    SuiteError,
    SuiteFile,
    _closest,
    _list,
    _options,
    _parse_fields,
    _Problems,
    _resources,
    _section,
)
from benchmark.core.catalog import Catalog, catalog
from benchmark.core.defaults import recipe_dir
from benchmark.core.errors import EXIT_COMPLETED
from benchmark.core.papers import known_papers, paper_numbers

try:  # POSIX file locks (run_lock); Windows has none and runs without the lock
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

# A suite's exit codes are the fit's (benchmark.core.errors): 0 completed, 1 failed, 2 a user
# error, 130 / 143 stopped by SIGINT / SIGTERM; EXIT_OK names the first in this package.
EXIT_OK = EXIT_COMPLETED

# What a selector (cells:, exclude:, --only, reproduces:) may name, in the order a cell id lists them.
AXES = ("method", "dataset", "backbone", "variant", "seed")
# resources: keys that are also trainer options. Written once in resources:, they reach both the
# fit (as these options) and the launchers (SLURM's GPUs and nodes), so the two cannot disagree.
RESOURCE_FLAGS = {"devices": "trainer.devices", "num_nodes": "trainer.num_nodes",
                  "accelerator": "trainer.accelerator", "precision": "trainer.precision"}
# {name} in string values, filled per cell (_placeholders); {output} is the resolved output folder.
PLACEHOLDERS = ("output", "method", "dataset", "backbone", "variant", "seed", "cell")
# Suite and variant names become folder names, cell ids and W&B group parts: no separators, no spaces.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
RECORD = "suite.json"  # the suite's record of a cell's attempts, in the cell's run directory
RUN_LOCK = ".suite-run.lock"  # held by the `suite run` that is using an output folder
LOG = "fit.log"  # the cell's output (every attempt, appended)

# `suite --help`; each command's own options are in its argparse parser (reading._parser).
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


# ---------------------------------------------------------------------------- data model
@dataclass
class Cell:
    """One ``fit`` of the grid: its id (also its folder name), axes, options and resources.

    Attributes:
        id: ``<method>-<dataset>[-<backbone>][-<variant>]-seed<seed>``: the run directory's
            name under the suite's output folder, the same for the same file every time.
        method, dataset, backbone: registered names; ``backbone`` None uses the recipe's.
        variant: the variant's name joined with the ``options:`` labels (``""``: none).
        seed: ``--seed_everything``.
        options: fit options without dashes -> YAML values, in command-line order (a later
            option wins, so the order is the precedence of the file's sections).
        sources: where the suite file set each option, quoted by the validation's messages.
        resources: what the run needs; its trainer keys are also in ``options``.
        plugins: ``--plugin`` modules (the file's ``plugins:``).
        needs: ids of the cells whose run directory this cell's options name.
        template: the arguments before placeholders were filled and before the resources'
            trainer options were added, without the seed: the validation parses one cell
            per template.
        reproduces: the (table, row) pairs of the suite's paper this cell gives a number for.
    """

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
        """The W&B group of the cell's run: its configuration without the seed, so seeds group together.

        ``<suite>/<dataset>/<method>[/<backbone>][/<variant>]``; the runner passes it as
        ``WANDB_RUN_GROUP`` unless the environment already sets one."""
        return "/".join([suite_name, self.dataset, self.method, *([self.backbone] if self.backbone else []),
                         *([self.variant] if self.variant else [])])

    def axis(self, name: str) -> str:
        """The cell's value on axis ``name`` (one of :data:`AXES`) as text, as selectors match it.

        A cell without a backbone has ``""`` there, which only ``backbone=*`` matches."""
        value = {"method": self.method, "dataset": self.dataset, "backbone": self.backbone or "",
                 "variant": self.variant, "seed": self.seed}[name]
        return str(value)

    @property
    def argv(self) -> list[str]:
        """The ``fit`` arguments, without ``--run_dir`` / ``--ckpt_path`` (the suite adds those).

        ``--seed_everything`` always comes last: ``argv[:-2]`` is the cell without its seed
        (:attr:`template`, the validation's grouping). A ``config`` list becomes one
        ``--config`` per file, as ``fit`` takes several."""
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
    """A loaded suite file: its cells in dependency order and what the launchers need.

    Attributes:
        path: the suite file (a shipped suite's path inside the package).
        name: the file's ``name:``, else the file name; names the default output folder.
        description: one line for ``suite list`` and the W&B sweep.
        output: the output folder, resolved to an absolute path (relative ones are relative to
            the directory the command runs in).
        cells: every cell, each after the cells it needs (:func:`_find_dependencies`).
        slurm: the ``slurm:`` section, for ``--launcher slurm``.
        plugins: ``--plugin`` modules of every cell.
    """
    path: Path
    name: str
    description: str
    output: Path
    cells: list[Cell]
    slurm: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    paper: str | None = None  # the paper whose tables the suite reproduces (benchmark/core/reference/<paper>.csv)

    def cell(self, cell_id: str) -> Cell:
        """The cell with id ``cell_id``.

        Raises:
            SuiteError: no such cell; the message offers the closest ids (a typo in ``--cell``).
        """
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        close = difflib.get_close_matches(cell_id, [c.id for c in self.cells], n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise SuiteError(f"{self.path}: no cell {cell_id!r}.{hint} `suite run {self.path} --dry-run` lists the cells.")

    def run_dir(self, cell: Cell) -> Path:
        """``<output>/<cell id>``: the cell's run directory (``fit --run_dir``) and its state on disk."""
        return self.output / cell.id


def flag_value(value: Any) -> str:
    """A YAML value as the command line writes it (``true``, ``null``, ``[1, 2, 4]``).

    Lists and mappings are YAML flow style on one line (a width no value reaches: YAML would
    otherwise wrap a long list, and the wrapped text is no longer one argument), which the
    fit's parser reads back as the same value."""
    if isinstance(value, bool):  # YAML's spelling, as the file wrote it; str() would give "True"
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return str(value)


# ---------------------------------------------------------------------------- loading
def shipped_suites() -> dict[str, Path]:
    """The suites installed with the package (``configs/suites/*.yaml``), by file stem, sorted.

    Found through :func:`benchmark.core.defaults.recipe_dir`, the same folder the recipes come
    from, so an installed package finds them as a checkout does; none when the folder is absent.
    """
    folder = recipe_dir() / "suites"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_suite_path(name: str) -> Path:
    """A suite file, or the name of one shipped in ``configs/suites`` (``smoke``).

    A file that exists wins over a shipped suite of the same name.

    Raises:
        SuiteError: ``name`` is neither a file nor a shipped suite (a folder, a missing
            path); the message lists the shipped suites.
    """
    path = Path(name).expanduser()  # ~ in a path given on the command line in quotes
    if path.is_file():
        return path
    shipped = shipped_suites()
    if name in shipped:
        return shipped[name]
    if path.exists():
        raise SuiteError(f"Suite {name} is not a file. Pass a suite YAML file.")
    names = ", ".join(shipped) or "none"
    raise SuiteError(f"Suite file {name} does not exist. Pass a path, or one of the shipped suites: {names}.")


def parse_selector(text: Any, where: str, problems: _Problems) -> dict[str, str] | None:
    """``"method=ms,dataset=cub"`` (or ``{method: ms, dataset: cub}``) -> {axis: pattern}.

    Patterns may use ``*`` and ``?`` (:func:`matches`).

    Args:
        text: the selector as the file or ``--only`` gives it.
        where: the key or flag it came from, for the message.
        problems: where a malformed selector is recorded.

    Returns:
        The selector, or None (the problem recorded) for text that is not
        ``axis=value[,...]``, names an axis outside :data:`AXES` or gives an empty value.
    """
    out: dict[str, str] = {}
    if isinstance(text, dict):  # the mapping form (exclude: entries) reads as the text form
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
    """Whether ``cell`` matches every ``axis: pattern`` of ``selector`` (shell patterns).

    Case-sensitive on every platform (``fnmatchcase``): registered names are, and a suite must
    select the same cells on Linux and macOS.
    """
    return all(fnmatch.fnmatchcase(cell.axis(axis), pattern) for axis, pattern in selector.items())


def _variant_name(option: str, value: Any) -> str:
    """The label of one ``options:`` value: the option's last part and the value (``layers2``).

    Characters a cell id may not hold are dropped (``[1, 2]`` gives ``12``), so two values can
    share a label; the duplicate-cell check then reports it.
    """
    text = flag_value(value)
    text = re.sub(r"[^A-Za-z0-9_.+=-]+", "", text) or "x"
    return f"{option.rsplit('.', 1)[-1]}{text}"


def _placeholders(value: Any, fill: dict[str, str]) -> Any:
    """``{output}``, ``{method}``, ``{dataset}``, ``{backbone}``, ``{variant}``, ``{seed}``, ``{cell}``
    in string values (others, e.g. a YAML mapping written as a string, stay as they are).

    Strings inside lists are filled too; mapping values are returned unchanged."""
    if isinstance(value, str):
        return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: fill[m.group(1)], value)
    if isinstance(value, list):
        return [_placeholders(v, fill) for v in value]
    return value


def load_suite(path: str | Path, output: str | Path | None = None) -> Suite:
    """Read and expand a suite file; every schema problem and name error raises one SuiteError.

    Args:
        path: a suite file, or the name of a shipped suite (``smoke``).
        output: replaces the file's ``output:`` (``--output DIR``).

    Returns:
        The suite, its cells expanded, options overridden, placeholders filled, resources
        turned into trainer options, and ordered so that every cell follows the cells it needs.

    Raises:
        SuiteError: an unreadable file, invalid YAML, or every problem of the file at once:
            unknown keys, values of the wrong type (the schema of :mod:`.fields`), empty
            lists, unknown methods / datasets / backbones, bad option names, selectors that
            match nothing, duplicate cells, a dependency cycle, and ``reproduces:`` rows that
            the paper does not have.
    """
    path = resolve_suite_path(str(path))
    problems = _Problems(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"{path} is not valid YAML: {err}") from None
    except OSError as err:
        raise SuiteError(f"Cannot read suite file {path}: {err}") from None
    if not isinstance(raw, dict):  # an empty file (None), a list or a scalar: nothing else can be checked
        raise SuiteError(f"{path}: a suite file is a mapping with a grid: section (docs/leaderboard.md).")
    # The top level's keys and value types; the sections with a class of their own are parsed
    # below, each where it is used. A wrong value leaves its key at the default (and is reported).
    parsed = _parse_fields(SuiteFile, raw, "the suite file", problems, prefix="")
    top = SuiteFile(**(parsed or {}))
    name = top.name or path.stem  # the default output folder and the W&B groups' first part
    if not _NAME.match(name):
        problems.add(f"name {name!r}: use letters, digits and _ . + = - only (it names the output folder).")
    # Plugins first: they register the methods, datasets and backbones the grid may name.
    plugins = tuple(top.plugins or ())
    if raw.get("plugins") is not None and top.plugins is None:
        # Without the plugins given, every name they register would be reported as unknown too.
        problems.raise_if_any()
    try:
        known = catalog(plugins)  # the registered names, read without importing the methods (fast status)
    except ImportError as err:
        raise SuiteError(f"{path}: {err}") from None
    out = Path(output if output is not None else top.output or Path("runs") / "suites" / name).expanduser()
    # Absolute: the cells' run directories are passed to fits and submitit jobs, and {output}
    # written into an option must name the same folder from wherever those start.
    out = out.resolve()
    # The sections every cell shares; a grid, its variants and cells: entries refine them.
    common = _options(top.args, "args", problems)
    base_resources = _resources(top.resources, "resources", problems)
    slurm_spec = _section(SlurmSpec, top.slurm, "slurm", problems)
    # The launchers read the keys given (slurm.get(key)), as submitit's slurm_<key> parameters.
    slurm = {k: v for k, v in vars(slurm_spec).items() if v is not None} if slurm_spec else {}

    # grid: is required: a suite without cells is a mistake in the file, not an empty run.
    # (top.grid is a list: one grid is a list of one; None after a wrong value, already reported.)
    grids = top.grid or []
    if raw.get("grid") is None:
        problems.add(f"no grid: section. Add one, e.g. {GRID_EXAMPLE}.")
    elif top.grid == []:
        problems.add(f"grid is an empty list, so the suite has no cell: give at least one grid, e.g. {GRID_EXAMPLE}.")
    cells: list[Cell] = []
    for g, grid in enumerate(grids):
        where = "grid" if len(grids) == 1 else f"grid[{g}]"
        spec = _section(GridSpec, grid, where, problems)
        if spec is not None:  # None: a grid without (valid) methods / datasets, reported
            cells += _expand_grid(spec, where, common, base_resources, plugins, known, problems)
    # Raised before the selectors are applied: over a grid with errors they would report
    # "matches no cell" for cells the user did ask for.
    problems.raise_if_any()

    # exclude:, then cells: (per-cell overrides by selector, in file order; later wins).
    all_cells = list(cells)
    for i, text in enumerate(top.exclude or []):
        selector = parse_selector(text, f"exclude[{i}]", problems)
        if selector is None:
            continue
        # Against the full grid, so that two overlapping excludes are not reported as matching nothing.
        if not any(matches(c, selector) for c in all_cells):
            problems.add(f"exclude[{i}] {text!r} matches no cell of the grid.")
        cells = [c for c in cells if not matches(c, selector)]
    for key, overrides in (top.cells or {}).items():
        where = f"cells[{key!r}]"
        selector = parse_selector(key, where, problems)
        # The options are checked before giving up on a broken selector, so that one pass
        # reports both.
        options = _options(overrides, where, problems, resources_allowed=True)
        if selector is None:
            continue
        chosen = [c for c in cells if matches(c, selector)]
        if not chosen:
            problems.add(f"{where} matches no cell. Cells are selected by axis=value (e.g. method=ms,dataset=cub).")
        resources = options.pop("resources", None)
        # Every matching entry applies, in file order: a later entry wins over an earlier one.
        for cell in chosen:
            for option, value in options.items():
                cell.options.pop(option, None)  # the override's position: last
                cell.options[option] = value
                cell.sources[option] = where
            if resources is not None:
                cell.resources = _resources(resources, f"{where}.resources", problems, base=cell.resources)
    problems.raise_if_any()
    # exclude: alone can empty a valid grid; say so rather than run a suite of no cell.
    if not cells:
        problems.add("the grid has no cell left after exclude:.")

    seen: dict[str, int] = {}
    for i, cell in enumerate(cells):
        # Taken before the placeholders are filled: cells whose options differ only in what
        # {output}, {cell}, ... fill in share one parse check (validate_cells).
        cell.template = tuple(cell.argv[:-2])
        fill = {"output": str(out), "method": cell.method, "dataset": cell.dataset, "backbone": cell.backbone or "",
                "variant": cell.variant, "seed": str(cell.seed), "cell": cell.id}
        cell.options = {k: _placeholders(v, fill) for k, v in cell.options.items()}
        # Resources last: they are the final say on the trainer's devices, nodes, accelerator and
        # precision, and giving one both ways would leave the winner to the argument order.
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
                # Part of what the validation parses: cells that differ only in their resources
                # (a cells: entry's precision) would otherwise share the first one's check.
                cell.template += (f"--{flag}", flag_value(value))
        if cell.id in seen:
            problems.add(f"duplicate cell {cell.id}: two entries of the grid give the same method, dataset, backbone, "
                         "variant and seed. Remove the repeated value, or give the variants different names.")
        seen.setdefault(cell.id, i)  # two cells with one id would share (and overwrite) one run directory
    problems.raise_if_any()
    # The paper rows and the dependencies need the final cells (ids, filled option values).
    paper = _paper_rows(top, cells, problems)
    problems.raise_if_any()
    suite = Suite(path=path, name=name, description=(top.description or "").strip(), output=out,
                  cells=cells, slurm=slurm, plugins=plugins, paper=paper)
    # Last: a dependency is found by a cell's run directory in another cell's filled-in options.
    _find_dependencies(suite, problems)
    problems.raise_if_any()
    return suite


def _paper_rows(top: SuiteFile, cells: list[Cell], problems: _Problems) -> str | None:
    """``paper:`` and ``reproduces:``: which cells reproduce which rows of the paper's tables.

    Every entry names cells by selector and one (table, row) of ``benchmark/core/reference/<paper>.csv``;
    both must exist, so a suite cannot claim a row the paper does not have or a cell it does not run.
    Each matching cell gets the (table, row) in :attr:`Cell.reproduces` (``suite paper-table``).
    ``reproduces:`` without ``paper:`` is a problem: the rows would belong to no table.

    Returns:
        The paper's name, or None without ``paper:`` (or with an unknown paper, a problem).
    """
    entries = top.reproduces or []
    # The reference numbers are read from the package (benchmark/core/reference/), no run needed.
    paper = top.paper
    if paper is None:
        if entries:
            problems.add("reproduces: needs paper: NAME (the paper whose tables the cells reproduce).")
        return None
    known = known_papers()
    if paper not in known:
        problems.add(f"paper {paper!r} has no reference numbers; known papers: {', '.join(known)} (benchmark/core/reference/).")
        return None
    rows = {(n.table, n.row) for n in paper_numbers(papers=[paper])}
    for i, raw_entry in enumerate(entries):
        where = f"reproduces[{i}]"
        entry = _section(Reproduces, raw_entry, where, problems)
        if entry is None:  # a wrong or missing cells / table / row, reported
            continue
        key = (entry.table, entry.row)
        # The hint lists the rows of the named table, or the tables when the table itself is wrong.
        if key not in rows:
            in_table = sorted(r for t, r in rows if t == key[0])
            hint = f" Rows of {key[0]}: {'; '.join(in_table)}." if in_table else \
                f" Tables: {', '.join(sorted({t for t, _ in rows}))}."  # fmt: skip
            problems.add(f"{where}: {paper} has no row {key[1]!r} in {key[0]!r}.{hint}")
            continue
        selector = parse_selector(entry.cells, f"{where}.cells", problems)
        if selector is None:
            continue
        chosen = [c for c in cells if matches(c, selector)]
        if not chosen:
            problems.add(f"{where}.cells {entry.cells!r} matches no cell.")
        for cell in chosen:
            # Overlapping selectors may give a cell the same row twice: it reproduces it once.
            if key not in cell.reproduces:
                cell.reproduces += (key,)
    return paper


def _expand_grid(grid: GridSpec, where: str, common: dict[str, Any], resources: Resources, plugins: tuple[str, ...],
                 known: Catalog, problems: _Problems) -> list[Cell]:
    """The cells of one grid (``where`` names it in messages), before ``exclude:`` and ``cells:``.

    Args:
        grid: the grid, parsed (its methods and datasets given, every axis a non-empty list).
        where: ``grid`` or ``grid[i]``.
        common: the file's ``args:``, applied first.
        resources: the file's ``resources:``, shared by every cell until ``cells:`` changes them.
        plugins: the file's ``plugins:``.
        known: the registered method, dataset and backbone names.
        problems: where every problem found is recorded; the returned cells may then be partial.

    Returns:
        One cell per combination of method, dataset, backbone, variant, ``options:`` values and
        seed, in that nesting order (seeds innermost).
    """
    # The schema made every axis a non-empty list; a cell's method and dataset are always given
    # (a silent default would turn a grid without them into fit's default method on the synthetic data).
    methods, datasets = grid.methods, grid.datasets
    backbones = grid.backbones or [None]  # without the key: one backbone, None (each recipe's)
    seeds = grid.seeds or [0]  # without the key: seed 0 alone
    # Checked against the registries' names (plugins included) so that a typo fails here, with
    # the registered names, and not minutes later in one fit subprocess per cell.
    for kind, names, table, command in (
        ("method", methods, known.methods, "list"), ("dataset", datasets, known.datasets, "list"),
        ("backbone", [b for b in backbones if b is not None], known.backbones, "list"),
    ):
        for name in names:
            if name not in table:
                problems.add(f"{where}: unknown {kind} {name!r}.{_closest(name, table)} "
                             f"Registered: {', '.join(sorted(table))} (python -m benchmark {command}).")
    # A repeated value would give two cells with one id, i.e. one run directory for two runs.
    for kind, values in (("methods", methods), ("datasets", datasets), ("backbones", backbones), ("seeds", seeds)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            problems.add(f"duplicate cells: {where}.{kind} lists {', '.join(repeated)} more than once.")
    grid_args = _options(grid.args, f"{where}.args", problems)  # after the file's args: win over them

    # Named override sets × the product of `options:`, each combination one variant.
    # `named` holds (name, options, where the file set them); without variants: one unnamed, empty.
    named: list[tuple[str, dict[str, Any], str]] = [("", {}, "")]
    if grid.variants is not None:
        if not grid.variants:
            problems.add(f"{where}.variants is empty: name at least one override set, or remove the key.")
        named = []
        for vname, overrides in grid.variants.items():
            vname = str(vname)
            if not _NAME.match(vname):
                problems.add(f"{where}.variants: name {vname!r}: use letters, digits and _ . + = - only.")
            named.append((vname, _options(overrides, f"{where}.variants.{vname}", problems), f"{where}.variants.{vname}"))
    products: list[list[tuple[str, str, Any]]] = [[]]
    if grid.options is not None:
        raw_options = _options(grid.options, f"{where}.options", problems)
        if not raw_options:
            problems.add(f"{where}.options is empty: give option: [values], or remove the key.")
        # One axis per option: its (option, label, value) triples; the product crosses them.
        axes = []
        for option, values in raw_options.items():
            values = _list(values, f"{where}.options.{option}", problems, "give at least one value")
            if values:
                axes.append([(option, _variant_name(option, v), v) for v in values])
        products = [list(combo) for combo in itertools.product(*axes)] if axes else [[]]
    # Each entry of `products` is one combination: (option, label, value) per option axis.
    cells = []
    for method, dataset, backbone, (vname, voptions, vsource), combo, seed in itertools.product(
        methods, datasets, backbones, named, products, seeds
    ):
        # e.g. variant "wide" with options layers=2, heads=4: "wide_layers2_heads4".
        variant = "_".join([p for p in [vname, *(label for _, label, _ in combo)] if p])
        options: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for source, opts in (("args", common), (f"{where}.args", grid_args), (vsource, voptions),
                             (f"{where}.options", {o: v for o, _, v in combo})):
            for option, value in opts.items():
                # Re-inserted, not updated: the option moves to the end of the command line, so
                # that it also comes after a --config file of an earlier section, which the
                # parser applies in order (a later file would otherwise undo the override).
                options.pop(option, None)
                options[option] = value
                sources[option] = source
        parts = [method, dataset, *([backbone] if backbone else []), *([variant] if variant else []), f"seed{seed}"]
        cells.append(Cell(id="-".join(parts), method=method, dataset=dataset, backbone=backbone,
                          variant=variant, seed=seed, options=options,
                          sources=sources, resources=resources, plugins=plugins))
    return cells


def _find_dependencies(suite: Suite, problems: _Problems) -> None:
    """A cell whose options name another cell's run directory (a stage-1 checkpoint) needs it:
    it runs after it, and is not started while that cell has not completed.

    Sets every cell's :attr:`Cell.needs` and reorders ``suite.cells`` so that each cell comes
    after the cells it needs, keeping the file's order otherwise (a stable topological sort,
    level by level). A cycle is recorded as a problem and leaves the order unchanged."""
    folders = {cell.id: str(suite.run_dir(cell)) for cell in suite.cells}
    for cell in suite.cells:
        text = " ".join(cell.argv)
        cell.needs = tuple(
            other for other, folder in folders.items()
            # The folder must end there: `...-seed1` must not match inside `...-seed10/...`.
            if other != cell.id and re.search(re.escape(folder) + r"(/|$|\s)", text)
        )
    # Kahn's algorithm by levels: each pass takes every cell whose needs are all placed, in
    # file order, so a suite without dependencies keeps its order exactly.
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
    """``1 cell``, ``3 cells``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _duration(seconds: float | None) -> str:
    """``M:SS`` or ``H:MM:SS`` for a time in seconds; ``""`` for None (a cell that never ran)."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
