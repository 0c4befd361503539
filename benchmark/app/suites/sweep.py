"""``suite export-sweep``: a W&B sweep whose agents run the cells.

The sweep does not describe the grid in W&B's terms: it is a grid over one parameter, ``cell``,
whose values are the cell ids, and every agent run executes ``suite run-cell FILE --cell=<id>``.
The suite file stays the one description of every cell's options, and an agent run follows the
suite's rules (skip completed, resume interrupted, wait for the cells it needs); W&B only
distributes the ids over the machines that run agents.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmark.app.suites.fields import SuiteError
from benchmark.app.suites.spec import EXIT_OK, Cell, Suite
from benchmark.app.suites.state import cell_state
from benchmark.core import registry
from benchmark.core.io import atomic_write_text

# wandb's command macros: ${env} is /usr/bin/env, ${interpreter} `python`, ${program} the suite file
# (the sweep's program:), ${args} the parameters as --name=value, here --cell=<id>.
SWEEP_COMMAND = ["${env}", "${interpreter}", "-m", "benchmark", "suite", "run-cell", "${program}", "${args}"]

FALLBACK_METRIC = ("test/R@1", "max")  # the leaderboard's default ranking, logged by every method


def sweep_metric(cells: list[Cell]) -> tuple[dict[str, str], str]:
    """The ``metric:`` of the sweep: what the cells are judged by, as logged to W&B, and why.

    Each cell's checkpoints are selected by ``--checkpoint.monitor`` when the suite file sets it,
    else by its method's ``selection_metric`` (``val/R@1``; Context-Refine ``val/refined/R@1``),
    in the direction of ``--checkpoint.mode`` or the method's ``selection_mode``; the sweep's metric
    is its test-split counterpart (``test/...``, the end-of-training test, in every run's summary).
    When the cells disagree (a two-stage suite), or a metric has no test counterpart, it is
    ``test/R@1`` (maximize), which every method logs and the leaderboard ranks by by default.

    Returns:
        The ``metric:`` mapping (``name``, ``goal``) and a sentence saying why it was chosen,
        which :func:`export_sweep` writes into the file's header.
    """
    chosen: set[tuple[str, str]] = set()
    # The method classes carry selection_metric / selection_mode, so they are imported here
    # (with the suite's plugins), unlike the name-only catalog that loading uses.
    registry.discover(sorted({plugin for cell in cells for plugin in cell.plugins}))  # the classes' selection metrics
    for cell in cells:
        method = registry.METHODS.get(cell.method)
        monitor = str(cell.options.get("checkpoint.monitor") or getattr(method, "selection_metric", "val/R@1"))
        mode = str(cell.options.get("checkpoint.mode") or getattr(method, "selection_mode", "max"))
        # Only a val/ metric has a test counterpart that every run's summary holds (the
        # end-of-training test); a train/ or custom monitor falls back to test/R@1.
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
    metric the cells are judged by (:func:`sweep_metric`).

    The cells are listed in the suite's order, which puts every cell after those it needs, so
    that the agents reach stage-1 cells first. ``program`` is the suite file as the user named
    it; the agents resolve it from the folder they run in.
    """
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
    """Write (or print) the sweep config of ``cells``, with a header on how to start it.

    Warns (stderr) about two setups in which the sweep runs but does not do what it is for:
    cells that do not log to W&B (the sweep's runs would show no metric), and cells that need
    a cell the sweep does not run and that has not completed (their agents would wait, then
    give up).

    Args:
        program: the suite file as given on the command line.
        out: the file to write (atomically), or None to print the config to stdout.

    Raises:
        SuiteError: ``out`` cannot be written.
    """
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
    # A cell without a logger option uses fit's default, wandb.
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
