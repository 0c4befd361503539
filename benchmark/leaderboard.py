"""``python -m benchmark leaderboard``: local results next to the papers' reported numbers.

Reads every ``<runs>/*/metrics_test.json`` (the evaluation callback's output), keeps the
last test evaluation of each run and prints one table per dataset, best first, with the
number the source papers report for the same method, backbone and dataset where there is
one (``benchmark/reference/paper_results.csv``). ``--wandb ENTITY/PROJECT`` reads the same
fields from W&B run summaries instead (needs network and a login).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from benchmark.io import console as make_console

REFERENCE = Path(__file__).with_name("reference") / "paper_results.csv"
META_KEYS = ("method", "backbone", "embedding_dim", "dataset", "protocol", "seed")


def paper_numbers(path: Path = REFERENCE) -> dict[tuple[str, str, str, str], float]:
    """(method, backbone, dataset, metric) -> reported value, from the reference CSV."""
    rows = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    table: dict[tuple[str, str, str, str], float] = {}
    for row in csv.DictReader(rows):
        table[(row["method"], row["backbone"], row["dataset"], row["metric"])] = float(row["value"])
    return table


def _paper_method(method: str) -> list[str]:
    """Names a method goes by in the reference CSV (baselines are listed as '<name>_baseline')."""
    return [method, f"{method}_baseline"]


def local_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per run: its metadata and the metrics of its last test evaluation."""
    rows = []
    for path in sorted(runs_dir.glob("*/metrics_test.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run being written or a foreign file: skip, never crash the table
        evaluations = data.get("evaluations") or []
        if not evaluations:
            continue
        meta = {**data.get("meta", {}), **{k: data[k] for k in META_KEYS if k in data}}
        rows.append({"run": path.parent.name, **meta, "metrics": evaluations[-1].get("metrics", {})})
    return rows


def wandb_runs(project: str) -> list[dict[str, Any]]:
    """The same rows from a W&B project's run summaries (``test/<metric>`` keys)."""
    import wandb

    rows = []
    for run in wandb.Api().runs(project):
        summary = {k[len("test/") :]: v for k, v in run.summary.items() if k.startswith("test/") and "/" not in k[5:]}
        if summary:
            rows.append({"run": run.name, **{k: run.config.get(k) for k in META_KEYS}, "metrics": summary})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run directories (default: runs)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read W&B run summaries instead of local files")
    parser.add_argument("--metric", default="R@1", help="metric to rank by (default: R@1)")
    parser.add_argument("--dataset", help="only this dataset")
    args = parser.parse_args(argv)

    from rich.table import Table

    rows = wandb_runs(args.wandb) if args.wandb else local_runs(args.runs)
    if args.dataset:
        rows = [r for r in rows if r.get("dataset") == args.dataset]
    console = make_console()
    if not rows:
        console.print(f"No results found in {args.wandb or args.runs} (runs write metrics_test.json at the end of fit/test).")
        return 0
    reported = paper_numbers()
    columns = [args.metric] + [m for m in ("MAP@R", "R-Precision", "NMI") if m != args.metric]
    for dataset in sorted({str(r.get("dataset")) for r in rows}):
        table = Table(title=f"{dataset} (ranked by {args.metric}, in %)")
        for col in ("run", "method", "backbone", "dim", "protocol", "seed", *columns, f"paper {args.metric}"):
            table.add_column(col)
        subset = [r for r in rows if str(r.get("dataset")) == dataset]
        subset.sort(key=lambda r: -float(r["metrics"].get(args.metric, float("-inf"))))
        for r in subset:
            paper = next(
                (reported[key] for name in _paper_method(str(r.get("method")))
                 if (key := (name, str(r.get("backbone")), dataset, args.metric)) in reported),
                None,
            )
            values = [r["metrics"].get(c) for c in columns]
            table.add_row(
                str(r["run"]), str(r.get("method")), str(r.get("backbone")), str(r.get("embedding_dim", "")),
                str(r.get("protocol", "")), str(r.get("seed", "")),
                *("" if v is None else f"{100 * float(v):.2f}" for v in values),
                "" if paper is None else f"{paper:.1f}",
            )
        console.print(table)
    return 0
