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

The package: ``spec`` (the file format and loading), ``validation`` (checks before anything runs),
``state`` (a cell's state and plan), ``runner`` (one cell as a subprocess, the progress view),
``commands`` (serial runs and the views), ``sweep`` (W&B), ``launchers`` (submitit) and ``command``
(the entry point).
"""

from __future__ import annotations

from benchmark.app.suites.command import cell_recipe, main
from benchmark.app.suites.commands import dry_run, run_one, run_serial, show_status
from benchmark.app.suites.launchers import CellJob, run_submitit
from benchmark.app.suites.runner import CellRun
from benchmark.app.suites.spec import (
    EXIT_OK,
    LOG,
    RECORD,
    RUN_LOCK,
    USAGE,
    Cell,
    Resources,
    Suite,
    SuiteError,
    load_suite,
    matches,
    parse_selector,
    resolve_suite_path,
    shipped_suites,
)
from benchmark.app.suites.state import (
    CellState,
    Plan,
    argv_changes,
    cell_state,
    fit_command,
    plan_cell,
    refuse_changed,
)
from benchmark.app.suites.sweep import export_sweep, sweep_config
from benchmark.app.suites.validation import check_output, run_lock, validate_cells

__all__ = ["Cell", "CellJob", "CellRun", "CellState", "EXIT_OK", "LOG", "Plan", "RECORD", "RUN_LOCK", "Resources", "Suite", "SuiteError", "USAGE", "argv_changes", "cell_recipe", "cell_state", "check_output", "dry_run", "export_sweep", "fit_command", "load_suite", "main", "matches", "parse_selector", "plan_cell", "refuse_changed", "resolve_suite_path", "run_lock", "run_one", "run_serial", "run_submitit", "shipped_suites", "show_status", "sweep_config", "validate_cells"]
