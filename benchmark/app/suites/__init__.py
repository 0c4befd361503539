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
``commands`` (serial runs and the views), ``sweep`` (W&B), ``launchers`` (submitit), ``reading``
(the commands that only read: ``status``, ``paper-table``, ``list``; light, they start without torch)
and ``command`` (the entry point). This file imports nothing, so that the reading commands stay
light: import the names from their modules.
"""
