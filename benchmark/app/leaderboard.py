"""``python -m benchmark leaderboard``: runs grouped by what makes them comparable, aggregated over seeds.

A benchmark's table must not mix numbers that are not comparable, nor hide how a number was
chosen. The rules (docs/leaderboard.md):

* **Sources**: run directories anywhere under ``--runs`` (each ``metrics_test.json`` the
  evaluation callback writes, plus its ``metrics_val.json``), or a W&B project through the
  public API (``--wandb ENTITY/PROJECT``: config, summary and validation history). Both give the
  same rows for the same runs.
* **Groups**: runs fall into one group only when their comparison key (the whole resolved
  configuration minus seeds and bookkeeping, plus what it cannot carry: resolved precision,
  weights' hash, data found) and their number of trained steps agree; runs recorded before the
  key existed are grouped on every recorded setting instead (dataset, protocol, method, backbone,
  pretrained weights, embedding size, image size, precision, recipe hash, batch composition,
  augmentation and every option the method records in ``describe()``). Only the seeds (and the
  library versions) may differ. Groups that share dataset, method and backbone but differ
  elsewhere are shown as separate rows, each naming its differing fields.
* **Which number a run contributes** (``--select``): ``final`` (default) is the run's last test
  evaluation: the end of training under the ``paper`` protocol, the checkpoint selected on the
  holdout validation split under ``holdout`` (the run records which). ``test-best`` is the
  best test-split evaluation during training, as many papers report it: only under the
  ``paper`` protocol (where validation is the test split), and labelled "selected on test,
  optimistic" everywhere it appears. Each seed contributes its own number; the table shows
  the mean and the sample standard deviation over seeds (never "the best of the mean curve").
* **Paper numbers** (``benchmark/core/reference/<paper>.csv``, :mod:`benchmark.core.papers`) appear as reference rows, and a
  Δ column compares a group with the paper when dataset, backbone and embedding size match and
  the method declares the paper's name for it (:meth:`methods.base.RetrievalMethod.reference_names`).
* **Outputs**: the console table, and ``--format md|csv|html|json --out FILE`` (written
  atomically); ``--figures DIR`` writes PNG figures (ranking bars with error bars, R@K curves,
  validation curves with a band over seeds), which the HTML page embeds.

A light command: :mod:`benchmark.__main__` dispatches it before torch or Lightning is imported,
and every record is read through :mod:`benchmark.core.results`, the definition of a result that
``status``, ``suite status``, the paper tables and the W&B report share.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.app import wandb_report
from benchmark.app.leaderboard_figures import write_figures
from benchmark.app.leaderboard_tables import (
    ROW_FIELDS,
    csv_columns,
    render_console,
    to_csv,
    to_html,
    to_markdown,
)
from benchmark.core.errors import UserError
from benchmark.core.io import atomic_write_text, check_writable
from benchmark.core.io import console as make_console
from benchmark.core.papers import PaperNumber, paper_numbers
from benchmark.core.results import (
    OPTIMISTIC,
    RecordError,
    epochs_trained,
    final_evaluation,
    flat_metrics,
    read_record,
    run_state,
    selection_key,
    test_best,
    test_selected_evaluations,
)
from benchmark.engine.wandb_auth import wandb_logged_in

#: The rules for the number a run contributes (``--select``); see the module docstring.
SELECTIONS = ("final", "test-best")
# Recorded per run but not a setting: a seed sweep differs only in these. Used only to group runs
# recorded before the comparison key existed (settings()); newer runs are grouped by the key.
PER_RUN = {"seed", "data_seed", "checkpoint", "versions", "stage", "split", "evaluations", "metrics", "refined",
           "recall_ks", "nmi", "weights", "run", "selection_metric", "num_train_images", "num_test_images",
           "num_train_classes", "sampler"}
PER_RUN_PREFIXES = ("version.", "hparams/", "best/", "test/", "val/", "train/", "time/", "_")
#: Shown after the ranking metric when ``--metrics`` is not given (a metric a run lacks stays empty).
DEFAULT_METRICS = ("R@1", "MAP@R", "R-Precision", "NMI")


# ---------------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    """One run: its recorded settings, state, final test metrics and validation curve.

    Built from a local run folder (:func:`local_runs`) or a W&B run (:func:`wandb_runs`), with the
    same fields either way, so that everything after reading does not know the source. Metrics are
    fractions (``0.642``), as the runs record them; the table turns them into percent.
    """

    name: str  # the run folder relative to --runs, or the W&B run's name
    meta: dict[str, Any]  # the recorded settings (flat keys; "config": the comparison config)
    test: dict[str, float]  # the final test evaluation (results.final_evaluation), flat: "R@1", "refined/R@1", ...
    val_curve: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (epochs trained, flat metrics)
    source: str = "local"
    url: str | None = None  # the W&B run page
    state: str = "completed"  # benchmark.core.results.STATES, or "unknown"
    reason: str = ""  # why a run is not counted (its status, a missing final evaluation)
    test_selected: list[dict[str, float]] = field(default_factory=list)  # evaluations chosen on the test split

    @property
    def seed(self) -> Any:
        """The run's ``--seed_everything`` as recorded (None for a record without it)."""
        return self.meta.get("seed")

    @property
    def steps(self) -> Any:
        """Optimizer steps the run trained (``steps_trained``; None for older records)."""
        return self.meta.get("steps_trained")

    @property
    def counted(self) -> bool:
        """A result: a completed run with its end-of-training evaluation."""
        return self.state == "completed" and bool(self.test)

    def value(self, metric: str, select: str) -> float | None:
        """The number this run contributes for ``metric`` under the ``select`` rule.

        Args:
            metric: a flat metric name (``R@1``, ``MAP@R``, ``refined/R@1``).
            select: ``final`` (the end-of-training test) or ``test-best`` (of the evaluations
                selected on the test split, the best by the run's selection metric, with
                ``metric`` as it was there).

        Returns:
            The value as a fraction, or None when the run has no such number.
        """
        if select == "final":
            return self.test.get(metric)
        best = test_best(self.test_selected, selection_key(self.meta))
        return None if best is None else best.get(metric)




def settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What groups a run: its recorded comparison key and number of trained steps; for runs recorded
    before the key existed, every recorded field but the per-run ones (seeds, versions, results).

    The row fields ride along with the key: they are what a row shows, and they are equal within a
    group anyway (they are part of the configuration the key hashes).

    Args:
        meta: a run's recorded settings (:attr:`RunRecord.meta`).

    Returns:
        The grouping settings; values are hashable where they were lists (tuples), nested
        mappings are left out of the older records' settings.
    """
    if meta.get("comparison_key"):
        return {"comparison_key": meta["comparison_key"], "steps_trained": meta.get("steps_trained"),
                **{k: meta.get(k) for k in ROW_FIELDS}}  # fmt: skip
    return {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in meta.items()
        if k not in PER_RUN and not k.startswith(PER_RUN_PREFIXES) and not isinstance(v, dict)
    }


def _warn(message: str) -> None:
    """A warning on stderr, so that ``--format csv|md|json`` without ``--out`` still prints clean output."""
    print(f"[leaderboard] warning: {message}", file=sys.stderr)


def local_runs(root: Path) -> list[RunRecord]:
    """Every run directory under ``root`` (any depth) with a ``metrics_test.json`` or a ``status.json``.

    A results file that cannot be read is skipped with a warning naming it: one bad file never loses
    the whole table.

    A folder with a status but no evaluation (a run that failed at start-up) is not listed:
    ``python -m benchmark status`` shows it. Hidden folders, and the folders under them, are left out.

    Args:
        root: the ``--runs`` folder.

    Returns:
        One record per run folder, sorted by path; incomplete runs included (``counted`` False,
        with the reason).
    """
    root = Path(root)
    folders = sorted({p.parent for name in ("metrics_test.json", "status.json") for p in root.rglob(name)})
    records = []
    for folder in folders:
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue  # hidden folders: a suite's earlier failed attempts (.attempts/), caches
        name = str(folder.relative_to(root)) if folder != root else folder.name
        state = run_state(folder)
        test_path, val_path = folder / "metrics_test.json", folder / "metrics_val.json"
        test_record = val_record = None
        try:
            test_record = read_record(test_path) if test_path.is_file() else None
            val_record = read_record(val_path) if val_path.is_file() else None
        except RecordError as err:
            _warn(f"skipped {name}: {err}")
            continue
        if test_record is None and val_record is None:
            continue  # a run that never evaluated: `python -m benchmark status` lists it
        # Both files record the same settings; a run interrupted before its test has only metrics_val.json.
        source = test_record or val_record
        meta = {k: v for k, v in source.items() if k not in ("evaluations", "metrics", "refined")}
        final = final_evaluation(test_record) if test_record is not None else None
        curve = [(epochs_trained(e), flat_metrics(e)) for e in (val_record or {}).get("evaluations", [])
                 if int(e.get("global_step") or 0) > 0]  # fmt: skip  (the untrained pre-fit check is not a result)
        selected = [flat_metrics(e) for e in test_selected_evaluations(test_record, val_record)]
        reason = state.reason if state.state != "completed" else ("" if final else "no end-of-training test evaluation")
        records.append(RunRecord(name, meta, flat_metrics(final) if final else {}, curve, state=state.state,
                                 reason=reason, test_selected=selected))  # fmt: skip
    return records


#: W&B run states -> the benchmark's (a run finished with a non-zero exit code is "failed" in W&B too).
#: A state not listed keeps its W&B name, which is not a completed result.
WANDB_STATES = {"finished": "completed", "running": "running", "failed": "failed", "crashed": "killed",
                "killed": "killed", "preempted": "interrupted", "preempting": "interrupted"}  # fmt: skip


def wandb_runs(project: str, filters: Mapping[str, Any] | None = None, api: Any = None) -> list[RunRecord]:
    """The same records from a W&B project: flat config keys, ``test/*`` summary, ``val/*`` history.

    Only ``fit`` runs (job type) are results; their W&B state gives the run's state. ``api`` stands in
    for ``wandb.Api()`` (tests pass recorded run objects).

    Args:
        project: ``ENTITY/PROJECT``.
        filters: W&B's server-side run filters (MongoDB-style: ``{"config.dataset": "cub"}``).
        api: a stand-in for ``wandb.Api()``.

    Returns:
        One record per ``fit`` run, with the fields :func:`local_runs` gives a local run: the flat
        config as ``meta`` (``config.<option>`` keys gathered into ``meta["config"]``), the
        ``test/*`` summary as the final metrics, the ``val/*`` history as the curve.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    records = []
    for run in api.runs(project, filters=dict(filters or {})):
        if (getattr(run, "job_type", None) or "fit") != "fit":
            continue  # a `test` / `validate` command's own run is not a training result
        summary = dict(run.summary)
        # W&B's summary keeps the last value of every key: after a fit, test/* are the final test's.
        # bool is an int in Python, but never a metric.
        test = {k[len("test/"):]: float(v) for k, v in summary.items()
                if k.startswith("test/") and k != "test/epochs_trained" and isinstance(v, (int, float))
                and not isinstance(v, bool)}  # fmt: skip
        # Keys with a leading underscore are W&B's own (e.g. _wandb), not the run's settings.
        meta = {k: v for k, v in dict(run.config).items() if not str(k).startswith("_")}
        # The comparison config is logged as flat config.<option> keys (filterable in W&B); gathered
        # back into meta["config"], where a local record holds it, so that grouping reads both alike.
        config = {k[len("config."):]: v for k, v in meta.items() if str(k).startswith("config.")}
        meta = {k: v for k, v in meta.items() if not str(k).startswith("config.")}
        if config:
            meta["config"] = config
        curve = []
        # Every logged row; the validation rows are those with val/* values. Rows at step 0 are the
        # evaluation before training, a baseline and not part of the curve (as in local_runs).
        for row in run.history(pandas=False):
            metrics = {k[len("val/"):]: float(v) for k, v in row.items()
                       if k.startswith("val/") and k != "val/epochs_trained" and isinstance(v, (int, float))}  # fmt: skip
            if metrics and int(row.get("trainer/global_step", row.get("_step", 1)) or 0) > 0:
                # The recorded x-axis; older runs logged only the 0-based epoch at the end of which they
                # validated, i.e. epoch + 1 epochs trained (results.epochs_trained's convention).
                x = row.get("val/epochs_trained", row.get("epochs_trained"))
                curve.append((float(x) if isinstance(x, (int, float)) else float(row.get("epoch", 0)) + 1.0, metrics))
        state = WANDB_STATES.get(str(getattr(run, "state", "finished")), str(getattr(run, "state", "unknown")))
        # Under the paper protocol the validations ran on the test split: they are the test-selected
        # evaluations that --select test-best chooses from.
        selected = [m for _, m in curve] if meta.get("val_split") == "test" else []
        reason = "" if state == "completed" else f"W&B state {getattr(run, 'state', '?')}"
        if state == "completed" and not test:
            reason = "no test/* metrics in its summary"
        records.append(RunRecord(run.name, meta, test, curve, source="wandb", url=getattr(run, "url", None),
                                 state=state, reason=reason, test_selected=selected))  # fmt: skip
    return records


# ---------------------------------------------------------------------------- aggregation
@dataclass
class Group:
    """Runs with the same settings: one leaderboard row.

    Statistics are over the group's runs, one value per run; the seeds of its completed runs differ
    (:func:`check_duplicate_seeds` refuses two completed runs of one seed).
    """

    settings: dict[str, Any]  # what the runs agree on (settings(): the comparison key, steps, row fields)
    runs: list[RunRecord]
    differs: dict[str, Any] = field(default_factory=dict)  # fields that set it apart from its siblings
    # The same fields by their full comparison-config keys (model.lr), as runs log them (config.model.lr).
    differs_keys: list[str] = field(default_factory=list)

    def values(self, metric: str, select: str) -> list[tuple[Any, float]]:
        """(seed, value) per run that has the metric.

        Sorted by seed (as text, since seeds may be recorded as numbers or strings); non-finite
        values (a diverged run's NaN) are left out rather than poisoning the mean.
        """
        out = []
        for run in sorted(self.runs, key=lambda r: str(r.seed)):
            value = run.value(metric, select)
            if value is not None and math.isfinite(value):
                out.append((run.seed, value))
        return out

    def stats(self, metric: str, select: str) -> tuple[int, float | None, float | None]:
        """(n, mean, sample std) over the runs' values (std ``None`` for fewer than 2)."""
        values = [v for _, v in self.values(metric, select)]
        if not values:
            return 0, None, None
        return len(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    @property
    def seeds(self) -> list[Any]:
        """The distinct seeds of the group's runs, sorted as text."""
        return sorted({r.seed for r in self.runs}, key=str)

    @property
    def short(self) -> str:
        """Why the group's runs are shorter than asked (``""`` for complete runs)."""
        return next((str(r.meta.get("short")) for r in self.runs if r.meta.get("short")), "")

    @property
    def incomplete(self) -> str:
        """The states of its runs when they are not completed results (``--include-incomplete``)."""
        states = sorted({r.state for r in self.runs if not r.counted})
        return ", ".join(states)

    @property
    def label(self) -> str:
        """How figures and legends name the group: method (backbone) and what sets it apart."""
        differs = ", ".join(f"{k}={v}" for k, v in self.differs.items())
        text = f"{self.settings.get('method')} ({self.settings.get('backbone')})" + (f" [{differs}]" if differs else "")
        return text + (f" [{self.incomplete}]" if self.incomplete else "")


def _config_of(group: Group) -> dict[str, Any]:
    """The group's comparison config (every run in it has the same one) plus its trained steps.

    Steps are part of what separates sibling groups (a run cut short by ``max_time``), so they
    take part in naming the differences.
    """
    config = dict(group.runs[0].meta.get("config") or {})
    config["steps_trained"] = group.runs[0].steps
    return config


def _short_name(key: str) -> str:
    """A comparison-config key as the ``differs`` column shows it: ``model.lr`` -> ``lr``,
    ``data.samples_per_class`` -> ``samples_per_class``; other sections keep their prefix."""
    return key.split(".", 1)[1] if key.startswith(("model.", "data.")) else key


def check_duplicate_seeds(records: Sequence[RunRecord]) -> None:
    """Refuse two completed runs of one setting with the same seed: a seed must count once, and the
    table cannot choose between them (rerun on purpose? keep one; two settings? they would differ).

    Args:
        records: the runs that count (completed results).

    Raises:
        UserError: two runs share settings and seed; the message names both.
    """
    seen: dict[tuple, RunRecord] = {}
    for record in records:
        key = (tuple(sorted((k, repr(v)) for k, v in settings(record.meta).items())), repr(record.seed))
        other = seen.setdefault(key, record)
        if other is not record:
            raise UserError(
                f"Runs {other.name} and {record.name} have the same settings and the same seed ({record.seed}): a "
                "seed counts once in a mean over seeds. Move or delete one of them, or select runs with --filter."
            )


def group_runs(records: Iterable[RunRecord]) -> list[Group]:
    """Group by the comparison key and trained steps (or, for older records, every recorded setting);
    name the settings that separate sibling groups (same dataset, method and backbone).

    Completed results and incomplete runs (``--include-incomplete``) of one setting form separate
    groups: an interrupted run is never averaged with finished ones.

    Args:
        records: the runs to show.

    Returns:
        The groups in first-seen order, each with :attr:`Group.differs` set where it has siblings.
    """
    groups: dict[tuple, Group] = {}
    for record in records:
        key_settings = settings(record.meta)
        # repr: settings hold unhashable or mixed-type values (lists, None next to numbers).
        key = tuple(sorted((k, repr(v)) for k, v in key_settings.items())) + (("_counted", record.counted),)
        groups.setdefault(key, Group(key_settings, [])).runs.append(record)
    result = list(groups.values())
    # Siblings: groups a reader would take for the same row. Only what varies among them is named,
    # so that a row says "lr=0.001" instead of listing its whole configuration.
    families: dict[tuple, list[Group]] = {}
    for g in result:
        families.setdefault(tuple(str(g.settings.get(k)) for k in ("dataset", "method", "backbone")), []).append(g)
    for family in families.values():
        if len(family) < 2:
            continue
        # Older records have no comparison config: their recorded settings are compared instead.
        configs = [_config_of(g) if g.settings.get("comparison_key") else g.settings for g in family]
        keys = set().union(*configs)
        varying = sorted(k for k in keys if len({repr(c.get(k)) for c in configs}) > 1)
        for g, config in zip(family, configs):
            g.differs = {_short_name(k): config.get(k) for k in varying if k not in ROW_FIELDS}
            g.differs_keys = [k for k in varying if k not in ROW_FIELDS]
    return result


# ---------------------------------------------------------------------------- paper numbers
def _reference_names(meta: Mapping[str, Any], refined: bool) -> list[str]:
    """The papers' names for a run's setting, as the run recorded them (``RetrievalMethod.reference_names``
    at fit time); runs recorded before that have none, and no paper row."""
    names = meta.get("reference_names_refined" if refined else "reference_names") or []
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else []


def paper_match(group: Group, metric: str, numbers: Sequence[PaperNumber]) -> PaperNumber | None:
    """The paper's number for this group's setting (dataset, backbone, embedding size, method name).

    The method name is one of those the run recorded for its setting (:func:`_reference_names`),
    so a method decides which paper rows describe it; a 128-d run is never matched to a 512-d number.

    Args:
        group: a leaderboard group.
        metric: the ranking metric; ``refined/<metric>`` is matched against the names recorded for
            the method's refined output, and its last part against the paper's metric.
        numbers: every paper's numbers (:func:`benchmark.core.papers.paper_numbers`).

    Returns:
        The first matching number in the papers' order, or None.
    """
    s = {**group.runs[0].meta, **group.settings} if group.runs else group.settings
    refined = metric.startswith("refined/")
    base_metric = metric.split("/")[-1]
    names = _reference_names(s, refined)
    for n in numbers:
        if (n.method in names and n.dataset == s.get("dataset") and n.backbone == s.get("backbone")
                and n.dim == s.get("embedding_dim") and n.metric == base_metric):  # fmt: skip
            return n
    return None


# ---------------------------------------------------------------------------- the table
def table_rows(groups: Sequence[Group], metrics: Sequence[str], select: str, rank_by: str,
               numbers: Sequence[PaperNumber]) -> list[dict[str, Any]]:  # fmt: skip
    """One dict per group (best first within each dataset), values in percent.

    Every output format renders these rows (console, Markdown, HTML, CSV, JSON, the W&B Table).

    Args:
        groups: the groups of :func:`group_runs`.
        metrics: the metrics to aggregate (each gets ``<m>_mean``, ``<m>_std``, ``<m>_n`` and
            ``<m>_per_seed``).
        select: the number each run contributes (``final`` or ``test-best``).
        rank_by: the metric rows are ranked by and compared with the paper on; one of ``metrics``.
        numbers: the papers' numbers.

    Returns:
        The rows, sorted by dataset and then by mean ``rank_by``, descending (rows without a
        value last).
    """
    rows = []
    for g in groups:
        row: dict[str, Any] = {k: g.settings.get(k) for k in ROW_FIELDS}
        row["differs"] = ", ".join(f"{k}={v}" for k, v in g.differs.items())
        row["differs_keys"] = list(g.differs_keys)
        row["label"] = g.label
        row["n_seeds"] = len(g.seeds)
        row["runs"] = len(g.runs)
        row["seeds"] = g.seeds
        row["steps"] = g.runs[0].steps
        row["short"] = g.short  # why the runs are shorter than asked, or ""
        row["incomplete"] = g.incomplete  # the runs' states when --include-incomplete lets them in, or ""
        row["comparison_key"] = g.settings.get("comparison_key")
        row["comparison_group"] = g.runs[0].meta.get("comparison_group")
        row["run_names"] = sorted(r.name for r in g.runs)
        # The rule travels with every row, so that no output shows a test-selected number unlabelled.
        row["select"] = select if select == "final" else f"{select} ({OPTIMISTIC})"
        for m in metrics:
            n, mean, std = g.stats(m, select)
            row[f"{m}_mean"] = None if mean is None else 100 * mean
            row[f"{m}_std"] = None if std is None else 100 * std
            row[f"{m}_n"] = n
            row[f"{m}_per_seed"] = {str(seed): 100 * v for seed, v in g.values(m, select)}
        paper = paper_match(g, rank_by, numbers)
        row["paper"] = None if paper is None else f"{paper.paper} {paper.table}: {paper.row}"
        row[f"paper_{rank_by}"] = None if paper is None else paper.value
        row["paper_statistic"] = None if paper is None else paper.statistic
        mean = row[f"{rank_by}_mean"]
        # Δ is our mean under --select (final by default) minus the paper's number, whatever the paper's
        # statistic: the test-best beside it is for reading, not for the difference.
        row[f"delta_{rank_by}"] = None if paper is None or mean is None else mean - paper.value
        # The paper's own statistic beside ours: where it reports the best test epoch, our test-best
        # (labelled optimistic) stands next to the honest final number.
        matching = None
        if paper is not None and paper.statistic == "test-best":
            n, best_mean, best_std = g.stats(rank_by, "test-best")
            matching = None if best_mean is None else (100 * best_mean, None if best_std is None else 100 * best_std)
        row[f"{rank_by}_test_best_mean"] = None if matching is None else matching[0]
        row[f"{rank_by}_test_best_std"] = None if matching is None else matching[1]
        rows.append(row)
    rows.sort(key=lambda r: (str(r["dataset"]), -(r[f"{rank_by}_mean"] if r[f"{rank_by}_mean"] is not None else -1e9)))
    return rows


def reference_rows(datasets: Iterable[str], metric: str, numbers: Sequence[PaperNumber]) -> list[PaperNumber]:
    """The papers' numbers shown as reference rows: those of the shown datasets for ``metric``
    (``refined/R@1`` shows the papers' ``R@1``), in the papers' order."""
    base = metric.split("/")[-1]
    return [n for n in numbers if n.dataset in set(datasets) and n.metric == base]


# ---------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    """The options of ``leaderboard``; the module docstring's first line is the description."""
    parser = argparse.ArgumentParser(prog="python -m benchmark leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=None,
                        help="folder searched for run directories (any depth; default runs/)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs of a W&B project instead")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose recorded KEY equals VALUE (repeatable; W&B: config.KEY)")
    parser.add_argument("--metric", default="R@1", help="metric to rank by (default R@1; e.g. refined/R@1, MAP@R)")
    parser.add_argument("--metrics", help="comma-separated metrics to show (default: the ranking metric, MAP@R, "
                        "R-Precision, NMI)")
    parser.add_argument("--select", choices=SELECTIONS, default="final",
                        help="the number each run contributes: final (default) or test-best (selected on test, optimistic)")
    parser.add_argument("--dataset", help="only this dataset")
    parser.add_argument("--per-seed", action="store_true", help="also show every seed's value")
    parser.add_argument("--include-incomplete", action="store_true",
                        help="also show runs that are not completed results (running, interrupted, failed, killed), "
                        "in rows of their own labelled with their state")
    parser.add_argument("--format", choices=("console", "md", "csv", "html", "json"), default="console")
    parser.add_argument("--out", type=Path, help="file for --format md|csv|html|json (default: stdout)")
    parser.add_argument("--figures", type=Path, help="folder for the PNG figures (html: embedded)")
    parser.add_argument("--publish", action="store_true",
                        help="with --wandb: create a W&B Report of the leaderboard and log it as a versioned W&B Table")
    parser.add_argument("--dry-run", action="store_true", help="with --publish: print the report's outline, save nothing")
    parser.add_argument("--title", default="DML benchmark leaderboard", help="the report's title")
    return parser


def _parse_filters(items: Sequence[str]) -> dict[str, str]:
    """``--filter KEY=VALUE`` items as ``{KEY: VALUE}`` (values stay strings; a later KEY wins).

    Raises:
        UserError: an item without ``=``.
    """
    filters = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--filter takes KEY=VALUE (e.g. --filter method=ms); got {item!r}.")
        key, value = item.split("=", 1)
        filters[key] = value
    return filters


def _is_text(value: str) -> bool:
    """Whether a ``--filter`` value is text as a run's config stores it, not a number, boolean or null
    (which a config holds typed: ``seed=0`` names the number 0)."""
    if value.strip().lower() in ("true", "false", "null", "none"):
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


def _read_records(args: argparse.Namespace, filters: Mapping[str, str]) -> list[RunRecord]:
    """The runs of ``--runs`` (local folders) or ``--wandb`` (a W&B project), filtered.

    ``--wandb`` with ``--runs`` (only allowed with ``--publish --dry-run``) reads the local runs: the
    project then only names where the report would go.

    Raises:
        UserError: no W&B login for ``--wandb``, the W&B API fails (wrong entity or project, no
            network), or ``--runs`` is not a folder.
    """
    if args.wandb and args.runs is None:
        if not wandb_logged_in():
            raise UserError(
                f"--wandb {args.wandb} reads the project through W&B's API, which needs a login: run `wandb login` "
                "(or set WANDB_API_KEY), or read local run folders with --runs DIR."
            )
        # Server-side only the filters whose value is text as W&B stores it: W&B compares typed
        # values (a seed is logged as the number 0, which the text "0" does not equal), so a value
        # that reads as a number, a boolean or null is matched here, as text, like a local run's.
        server = {f"config.{k}": v for k, v in filters.items() if _is_text(v)}
        here = {k: v for k, v in filters.items() if f"config.{k}" not in server}
        try:
            records = wandb_runs(args.wandb, server)
            return [r for r in records if all(str(r.meta.get(k)) == v for k, v in here.items())]
        except UserError:
            raise
        except Exception as err:  # the API's own errors: a wrong entity or project, no network
            raise UserError(f"Cannot read the W&B project {args.wandb}: {type(err).__name__}: {err}") from None
    runs = args.runs if args.runs is not None else Path("runs")
    if not runs.is_dir():
        raise UserError(f"--runs {runs} is not a folder; pass the folder that holds your run directories.")
    # Compared as text: a --filter value is a string, the recorded value may be a number (seed=0).
    return [r for r in local_runs(runs) if all(str(r.meta.get(k)) == v for k, v in filters.items())]


def _not_counted(records: Sequence[RunRecord]) -> None:
    """List the runs that are not results (not completed, or without a final evaluation), with why.

    Printed on stderr, so that the table on stdout (or a ``--format`` output piped on) stays clean.
    """
    if not records:
        return
    from rich.table import Table

    table = Table(title=f"Not counted: {len(records)} run(s) that are not completed results (--include-incomplete "
                        "shows them, labelled)")  # fmt: skip
    for col in ("run", "state", "steps", "why"):
        table.add_column(col)
    for r in sorted(records, key=lambda r: r.name):
        table.add_row(r.name, r.state, str(r.steps if r.steps is not None else ""), r.reason)
    make_console(stderr=True).print(table)


def main(argv: list[str] | None = None) -> int:
    """``leaderboard``: read the runs, group and aggregate them, and print, write or publish the table.

    Args:
        argv: the arguments after ``leaderboard`` (``--help`` lists them; default ``sys.argv[1:]``).

    Returns:
        0, also when there is no completed result (a sentence says so).

    Raises:
        UserError: contradictory or malformed options (``--out`` without a file format,
            ``--publish`` without ``--wandb``, two sources), an unwritable ``--out`` or ``--figures``,
            an unreadable source, or two runs of one setting with the same seed.
    """
    args = build_parser().parse_args(argv)
    filters = _parse_filters(args.filter)
    if args.format == "console" and args.out:
        raise UserError("--out needs --format md, csv, html or json.")
    if args.publish and not args.wandb:
        raise UserError("--publish builds a W&B Report in a W&B project: add --wandb ENTITY/PROJECT.")
    if args.wandb and args.wandb.count("/") != 1:
        raise UserError(f"--wandb takes ENTITY/PROJECT (e.g. my-team/dml-benchmark); got {args.wandb!r}.")
    if args.runs is not None and args.wandb and not (args.publish and args.dry_run):
        raise UserError("--runs and --wandb name two sources; give one (with --publish --dry-run, --runs gives the "
                        "rows and --wandb the report's project).")  # fmt: skip
    # Checked before anything is read: a long W&B read must not end on an unwritable path.
    if args.out is not None:
        check_writable(args.out, "--out")
    if args.figures is not None:
        check_writable(args.figures / ".write-test", "--figures")
    records = _read_records(args, filters)
    if args.dataset:
        records = [r for r in records if r.meta.get("dataset") == args.dataset]
    # The runs that are not results are listed (stderr) or shown labelled, never averaged in silently.
    left_out = [r for r in records if not r.counted]
    if not args.include_incomplete:
        records = [r for r in records if r.counted]
    check_duplicate_seeds([r for r in records if r.counted])
    _not_counted(left_out if not args.include_incomplete else [])  # on stderr: the table's output stays clean
    if not records:
        make_console().print(f"No completed results in {args.wandb or args.runs or 'runs'} (a run counts once its fit "
                             "has completed and written metrics_test.json).")  # fmt: skip
        return 0
    # Without --metrics: the ranking metric first, then the defaults, each once.
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else \
        list(dict.fromkeys([args.metric, *DEFAULT_METRICS]))  # fmt: skip
    if args.metric not in metrics:  # the rows are ranked by it: it is always shown, first
        metrics.insert(0, args.metric)
    numbers = paper_numbers()
    groups = group_runs(records)
    rows = table_rows(groups, metrics, args.select, args.metric, numbers)
    refs = reference_rows({str(r["dataset"]) for r in rows}, args.metric, numbers)
    figures = write_figures(groups, rows, args.metric, args.select, args.figures) if args.figures else []
    # The HTML page always embeds the figures: without --figures they go beside the page (<out>_figures/).
    if args.format == "html" and not args.figures and args.out:
        figures = write_figures(groups, rows, args.metric, args.select, args.out.with_suffix("").with_name(
            args.out.stem + "_figures"))  # fmt: skip
    if args.publish:
        entity, project = args.wandb.split("/")
        papers = [{**n.__dict__, "source": "paper"} for n in refs]
        report = wandb_report.build_report(entity, project, rows, args.metric, records, args.title,
                                           suite=filters.get("suite"), paper_rows=papers)  # fmt: skip
        if args.dry_run:
            print(wandb_report.outline(report))
            return 0
        # The W&B Table: the leaderboard's rows, then the papers' numbers as rows of their own.
        columns = [*csv_columns(metrics, args.metric), "source", "paper", "metric", "value"]
        table = [{**r, "source": "benchmark"} for r in rows] + [
            {"dataset": p["dataset"], "method": p["method"], "backbone": p["backbone"], "embedding_dim": p["dim"],
             "source": "paper", "paper": p["paper"], "metric": p["metric"], "value": p["value"]} for p in papers]  # fmt: skip
        url = wandb_report.publish(report, columns, table, entity, project)
        print(f"published {url}")
        return 0
    if args.format == "console":
        render_console(rows, metrics, args.metric, refs, args.per_seed)
        return 0
    if args.format == "csv":
        text = to_csv(rows, metrics, args.metric)
    elif args.format == "md":
        text = to_markdown(rows, metrics, args.metric, refs)
    elif args.format == "html":
        text = to_html(rows, metrics, args.metric, refs, figures, args.title)
    else:
        text = json.dumps({"select": args.select, "rank_by": args.metric, "rows": rows,
                           "paper": [n.__dict__ for n in refs]}, indent=1, default=str)  # fmt: skip
    if args.out:
        try:
            atomic_write_text(args.out, text)
        except OSError as err:
            raise UserError(f"Cannot write --out {args.out}: {err.strerror or err}. Pass a writable path.") from None
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
