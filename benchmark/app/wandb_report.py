"""The leaderboard as a W&B Report and a versioned W&B Table (``leaderboard --wandb E/P --publish``).

The report shows the comparison the local leaderboard computes, not another one:

* the **rows** are the leaderboard's own, logged first as a W&B Table in a versioned artifact
  (``leaderboard-<project>``, paper numbers included as rows of ``source = paper``); each dataset's
  section embeds that table (a versioned-file block), so a paper can cite one version;
* the **run sets** hold only results: finished ``fit`` runs (W&B state and job type) of the dataset,
  and of the suite when ``--filter suite=NAME`` is given;
* **bars and curves are grouped by** ``comparison_group`` (the comparison key and the steps trained,
  recorded by every run): runs that the leaderboard keeps apart are never pooled in a chart; curves
  run against ``val/epochs_trained``, the one epoch convention of the project;
* a **parallel-coordinates** panel over the options that differ between the dataset's groups, a
  **media browser** of the runs' figures, and the selection rule (final, or test-best labelled
  optimistic) in every title;
* ``--publish`` run again **updates the same report** (found by title in the project) instead of
  adding another; ``--dry-run`` prints the outline and needs no network (with ``--runs`` it needs
  no W&B project at all).

:func:`build_report` needs no network; :func:`publish` needs a W&B login.

``wandb`` and ``wandb_workspaces`` are imported inside the functions that use them: the
leaderboard imports this module on every run, and most runs of it never publish.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The file the logged W&B Table becomes inside the artifact (W&B adds ``.table.json`` to its name).
TABLE_FILE = "leaderboard.table.json"
#: The image keys a run's after-test figures are logged under (``log_images``: ``figures/<file stem>``).
FIGURE_KEYS = ("figures/retrieval_grid", "figures/embedding_map", "figures/per_class_recall", "figures/training_curves")


def artifact_name(project: str) -> str:
    """The versioned artifact that holds a project's leaderboard table: one per project, new versions
    on every ``--publish``."""
    return f"leaderboard-{project}"


def runset_filter(dataset: str, suite: str | None = None) -> str:
    """The runs a section charts: finished fit runs of the dataset (and suite).

    The same rule as the leaderboard's (only completed ``fit`` runs are results), written in the
    filter expressions of ``wandb_workspaces``: ``Config(...)`` for the run's flat config keys,
    ``Metric('State')`` / ``Metric('JobType')`` for W&B's run attributes.

    Args:
        dataset: the registered dataset name, as runs record it in ``config.dataset``.
        suite: a suite's name (``config.suite``, set by the suite's cells), or None for every run.

    Returns:
        The filter expression of a :class:`wandb_workspaces.reports.v2.Runset`.
    """
    parts = [f"Config('dataset') == '{dataset}'", "Metric('State') == 'finished'", "Metric('JobType') == 'fit'"]
    if suite:
        parts.append(f"Config('suite') == '{suite}'")
    return " and ".join(parts)


def _varying_options(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The comparison-config keys that differ between the dataset's rows, in full (``model.lr``).

    From the rows' ``differs_keys``: the ``differs`` column shortens ``model.lr`` to ``lr`` for
    reading, which is not the key a run logs (``config.model.lr``), so a chart column built from it
    would plot nothing. Returned in first-seen order, each once.
    """
    keys: list[str] = []
    for row in rows:
        for name in row.get("differs_keys") or ():
            if name not in keys:
                keys.append(name)
    return keys


def build_report(
    entity: str,
    project: str,
    rows: Sequence[Mapping[str, Any]],
    rank_by: str,
    records: Sequence[Any],
    title: str = "DML benchmark leaderboard",
    suite: str | None = None,
    paper_rows: Sequence[Mapping[str, Any]] = (),
) -> Any:
    """A ``wandb_workspaces`` Report object (not saved).

    Args:
        rows: the leaderboard rows (``benchmark.app.leaderboard.table_rows``).
        records: the runs (``name``, ``url``, ``meta``, ``seed``), linked per dataset.
        suite: restrict the charts' run sets to this suite's runs.
        paper_rows: the papers' numbers shown in each section (``paper``, ``method``, ``dataset`` ...).
        entity, project: where the report and the runs it charts live.
        rank_by: the ranking metric: the bars chart ``test/<rank_by>``, the curves ``val/<rank_by>``.
        title: the report's title; ``--publish`` finds an earlier report by it.

    Returns:
        A :class:`wandb_workspaces.reports.v2.Report`; :func:`publish` saves it, :func:`outline`
        describes it.
    """
    import wandb_workspaces.reports.v2 as wr

    # Every row carries the same selection rule (with its "optimistic" label for test-best).
    select = rows[0]["select"] if rows else "final"
    blocks: list[Any] = [
        wr.H1(title),
        wr.P(f"Mean ± sample standard deviation over seeds, in percent; ranked by {rank_by}; the number each run "
             f"contributes: {select}. Only completed runs count; runs are pooled only when their whole configuration "
             f"(minus seeds and bookkeeping) and their number of trained steps agree (comparison_group). Built by "
             f"`python -m benchmark leaderboard --wandb {entity}/{project} --publish`."),  # fmt: skip
        wr.TableOfContents(),
    ]
    for dataset in sorted({str(r["dataset"]) for r in rows}):
        subset = [r for r in rows if str(r["dataset"]) == dataset]
        # Grouped by comparison_group, so that a bar or a band pools exactly the runs a row pools.
        runset = wr.Runset(entity=entity, project=project, name=f"{dataset}: finished fit runs",
                           filters=runset_filter(dataset, suite), groupby=["config.comparison_group"])  # fmt: skip
        group = wr.Config("comparison_group")
        # A dotted name is taken for a comparison-config option (logged as config.<option>), a plain one
        # for a flat config key.
        columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(f"config.{k}" if "." in k else k))
                   for k in _varying_options(subset)]  # fmt: skip
        columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(f"test/{rank_by}")))
        panels = [
            wr.BarPlot(title=f"test/{rank_by} ({select}): mean ± std over seeds, per comparison group",
                       metrics=[f"test/{rank_by}"], groupby=group, groupby_aggfunc="mean",
                       groupby_rangefunc="stddev"),
            wr.LinePlot(title=f"val/{rank_by} against epochs trained (band: std over seeds)", x="val/epochs_trained",
                        y=[f"val/{rank_by}"], groupby=group, groupby_aggfunc="mean", groupby_rangefunc="stddev"),
            wr.ParallelCoordinatesPlot(title="options that differ between the groups", columns=columns),
            wr.MediaBrowser(title="figures of each run", media_keys=list(FIGURE_KEYS), num_columns=2),
        ]  # fmt: skip
        # The rows themselves come from the logged table (one source for a citation), not a Markdown copy.
        blocks += [
            wr.H2(dataset),
            wr.P(f"The leaderboard's rows for {dataset} (table '{TABLE_FILE}' of the artifact "
                 f"{artifact_name(project)}, latest version; filter its 'dataset' column)."),  # fmt: skip
            wr.WeaveBlockArtifactVersionedFile(entity=entity, project=project, artifact=artifact_name(project),
                                               version="latest", file=TABLE_FILE),  # fmt: skip
            wr.PanelGrid(runsets=[runset], panels=panels),
        ]
        papers = [p for p in paper_rows if p.get("dataset") == dataset]
        if papers:
            items = [f"{p['method']} ({p['paper']}): {p['metric']} {p['value']:.1f} — {p['backbone']}, {p['dim']}-d"
                     + (f", {p['statistic']}" if p.get("statistic") else "") for p in papers]  # fmt: skip
            blocks += [wr.H3("Papers' numbers (references)"), wr.UnorderedList(items=items)]
        links = [r for r in records if str(r.meta.get("dataset")) == dataset and getattr(r, "url", None)]
        if links:
            items = [f"[{r.name}]({r.url}) — {r.meta.get('method')}, {r.meta.get('backbone')}, seed {r.seed}"
                     for r in sorted(links, key=lambda r: (str(r.meta.get("method")), str(r.seed)))]  # fmt: skip
            blocks += [wr.H3("Runs"), wr.MarkdownBlock("\n".join(f"- {item}" for item in items))]
    return wr.Report(project=project, entity=entity, title=title, blocks=blocks,
                     description=f"Leaderboard of {entity}/{project}")  # fmt: skip


def outline(report: Any) -> str:
    """The report's structure as text (``--dry-run``): headings, tables, panels and their run sets.

    Reads the blocks :func:`build_report` makes, by type name (headings indented by level, text
    cut to 100 characters), so that a dry run shows what would be saved without a W&B login.

    Args:
        report: a report from :func:`build_report`.

    Returns:
        One line per block (a list's items and a grid's run sets one line each).
    """
    lines = [f"W&B Report '{report.title}' in {report.entity}/{report.project}"]
    for block in report.blocks:
        kind = type(block).__name__
        if kind in ("H1", "H2", "H3"):
            lines.append(f"{'  ' * (int(kind[1]) - 1)}{kind}: {block.text}")
        elif kind == "WeaveBlockArtifactVersionedFile":
            lines.append(f"    table: {block.artifact}:{block.version}/{block.file}")
        elif kind == "MarkdownBlock":
            lines.append(f"    markdown ({len(block.text.splitlines())} lines): {block.text.splitlines()[0][:100]}")
        elif kind == "UnorderedList":
            lines += [f"    - {item}" for item in block.items]
        elif kind == "PanelGrid":
            panels = ", ".join(f"{type(p).__name__}('{p.title}')" for p in block.panels)
            for rs in block.runsets:
                lines.append(f"    panels [{panels}] over runs where {rs.filters}, grouped by {', '.join(rs.groupby)}")
        elif kind == "P":
            lines.append(f"    text: {str(block.text)[:100]}")
    return "\n".join(lines)


def existing_report(entity: str, project: str, title: str, api: Any = None) -> Any | None:
    """The project's report with this title (the one ``--publish`` made before), loaded, or None.

    Args:
        entity, project: the W&B project searched.
        title: the report's title (``--title``); the first report with it is taken.
        api: stands in for ``wandb.Api()`` (tests).

    Returns:
        The report loaded with ``wandb_workspaces`` (from its URL), so that its blocks can be replaced.
    """
    import wandb
    import wandb_workspaces.reports.v2 as wr

    api = api or wandb.Api()
    for report in api.reports(f"{entity}/{project}"):
        # The title is read from whichever of the two attributes the API's report object carries.
        if (getattr(report, "display_name", None) or getattr(report, "title", None)) == title:
            return wr.Report.from_url(report.url)
    return None


def publish(report: Any, columns: Sequence[str], rows: Sequence[Mapping[str, Any]], entity: str, project: str) -> str:
    """Log the rows (``columns`` of each) as a versioned W&B Table artifact, then save the report (the
    same report as before when one with its title exists: it is updated, not duplicated); returns its URL.

    The table is logged first: the report's table blocks name the artifact's ``latest`` version,
    which must exist when the report is opened.

    Args:
        report: a report from :func:`build_report` (not saved).
        columns: the table's columns (the leaderboard's CSV columns and the paper rows' own).
        rows: the table's rows as dicts; a missing column is an empty cell.
        entity, project: the W&B project the artifact and the report go to.

    Returns:
        The saved report's URL.
    """
    import tempfile

    import wandb

    # A W&B Table cell holds a scalar: lists (seeds, run names) and dicts are written as their text.
    data = [[r.get(c) if not isinstance(r.get(c), (list, tuple, dict)) else str(r.get(c)) for c in columns]
            for r in rows]  # fmt: skip
    # The run only carries the table: its local files go to a temporary folder, not ./wandb.
    with tempfile.TemporaryDirectory(prefix="dml-benchmark-leaderboard-") as folder:
        run = wandb.init(entity=entity, project=project, job_type="leaderboard", name="leaderboard", dir=folder)
        try:
            artifact = wandb.Artifact(artifact_name(project), type="leaderboard")
            # W&B appends ".table.json" to the name it is given: the file becomes TABLE_FILE.
            artifact.add(wandb.Table(columns=list(columns), data=data), TABLE_FILE.removesuffix(".table.json"))
            run.log_artifact(artifact)
        finally:
            run.finish()
    previous = existing_report(entity, project, report.title)
    # Updating the earlier report keeps its URL (links and bookmarks to it stay valid).
    if previous is not None:
        previous.blocks = report.blocks
        previous.description = report.description
        report = previous
    report.save()
    return str(report.url)
