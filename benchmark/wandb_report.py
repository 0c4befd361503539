"""The leaderboard as a W&B Report and a versioned W&B Table (``leaderboard --wandb P --publish``).

Built with the ``wandb-workspaces`` Reports API: one section per dataset with the aggregated
table (mean ± sample std over seeds, as the console shows it), a bar chart of the ranking metric
with ± std error bars grouped by method, the validation curves grouped by method (band: std over
seeds), the papers' numbers, and links to the runs. The same rows are logged as a W&B Table in a
versioned artifact (``leaderboard-<project>``), so a paper can cite one version.

:func:`build_report` needs no network (the entity is given); ``--dry-run`` prints
:func:`outline` instead of saving. Saving and logging need a W&B login.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _dataset_filter(dataset: str) -> str:
    return f"Config('dataset') == '{dataset}'"


def build_report(
    entity: str,
    project: str,
    rows: Sequence[Mapping[str, Any]],
    tables: Mapping[str, str],
    rank_by: str,
    records: Sequence[Any],
    title: str = "DML benchmark leaderboard",
) -> Any:
    """A ``wandb_workspaces`` Report object (not saved).

    Args:
        rows: the leaderboard rows (``benchmark.leaderboard.table_rows``).
        tables: per dataset, the Markdown table of its rows and paper numbers.
        records: the runs (``name``, ``url``, ``meta``, ``seed``), linked per dataset.
    """
    import wandb_workspaces.reports.v2 as wr

    select = rows[0]["select"] if rows else "final"
    blocks: list[Any] = [
        wr.H1(title),
        wr.P(f"Mean ± sample standard deviation over seeds, in percent; ranked by {rank_by}; "
             f"the number each run contributes: {select}. Built by `python -m benchmark leaderboard "
             f"--wandb {entity}/{project} --publish`."),  # fmt: skip
        wr.TableOfContents(),
    ]
    for dataset in sorted({str(r["dataset"]) for r in rows}):
        runset = wr.Runset(entity=entity, project=project, name=f"{dataset} runs", filters=_dataset_filter(dataset),
                           groupby=["method", "backbone"])  # fmt: skip
        blocks += [
            wr.H2(dataset),
            wr.MarkdownBlock(tables[dataset]),
            wr.PanelGrid(
                runsets=[runset],
                panels=[
                    wr.BarPlot(title=f"test/{rank_by}: mean ± std over seeds", metrics=[f"test/{rank_by}"],
                               groupby="method", groupby_aggfunc="mean", groupby_rangefunc="stddev"),
                    wr.LinePlot(title=f"val/{rank_by} against epoch", x="epoch", y=[f"val/{rank_by}"],
                                groupby="method", groupby_aggfunc="mean", groupby_rangefunc="stddev"),
                ],  # fmt: skip
            ),
        ]
        links = [r for r in records if str(r.meta.get("dataset")) == dataset and r.url]
        if links:
            items = [f"[{r.name}]({r.url}) — {r.meta.get('method')}, {r.meta.get('backbone')}, seed {r.seed}"
                     for r in sorted(links, key=lambda r: (str(r.meta.get("method")), str(r.seed)))]  # fmt: skip
            blocks += [wr.H3("Runs"), wr.MarkdownBlock("\n".join(f"- {item}" for item in items))]
    return wr.Report(project=project, entity=entity, title=title, blocks=blocks,
                     description=f"Leaderboard of {entity}/{project}")  # fmt: skip


def outline(report: Any) -> str:
    """The report's structure as text (``--dry-run``): headings, tables and panels."""
    lines = [f"W&B Report '{report.title}' in {report.entity}/{report.project}"]
    for block in report.blocks:
        kind = type(block).__name__
        if kind in ("H1", "H2", "H3"):
            lines.append(f"{'  ' * (int(kind[1]) - 1)}{kind}: {block.text}")
        elif kind == "MarkdownBlock":
            first = next((line for line in block.text.splitlines() if line.startswith("|")), block.text.splitlines()[0])
            lines.append(f"    markdown ({len(block.text.splitlines())} lines): {first[:100]}")
        elif kind == "PanelGrid":
            panels = ", ".join(f"{type(p).__name__}('{p.title}')" for p in block.panels)
            filters = "; ".join(str(rs.filters) for rs in block.runsets)
            lines.append(f"    panels [{panels}] over runs where {filters}")
        elif kind == "P":
            lines.append(f"    text: {str(block.text)[:100]}")
    return "\n".join(lines)


def publish(report: Any, columns: Sequence[str], rows: Sequence[Mapping[str, Any]], entity: str, project: str) -> str:
    """Save the report and log the rows (``columns`` of each) as a versioned W&B Table artifact;
    returns the report's URL."""
    import wandb

    report.save()
    data = [[r.get(c) for c in columns] for r in rows]
    run = wandb.init(entity=entity, project=project, job_type="leaderboard", name="leaderboard")
    try:
        artifact = wandb.Artifact(f"leaderboard-{project}", type="leaderboard")
        artifact.add(wandb.Table(columns=list(columns), data=data), "leaderboard")
        run.log_artifact(artifact)
    finally:
        run.finish()
    return str(report.url)
