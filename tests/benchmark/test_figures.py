"""The figure layer: what the figures draw agrees with an independent computation, every figure
command writes its files, a run's figures are written after its test, and they are deterministic."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from benchmark.app.cli import build_cli, main
from benchmark.core import registry
from benchmark.core.contracts import Figure, RankedLists
from benchmark.core.results import OPTIMISTIC, best_validation, epochs_trained
from benchmark.engine import figures as fig
from benchmark.engine import plotting
from benchmark.engine.evaluation import Evaluation
from benchmark.engine.evaluation.metrics import query_rankings, retrieval_metrics
from tests.benchmark.test_analysis import png_size
from tests.datamodules import fixtures

TINY = ["--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--model.embedding_dim", "8",
        "--data.image_size", "16", "--data.num_workers", "0", "--data.eval_batch_size", "128",
        "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"]  # fmt: skip


# ---------------------------------------------------------------------------- a toy evaluation
def toy_evaluation(tmp_path: Path, classes: int = 6, per_class: int = 6, dim: int = 12, seed: int = 0,
                   refined: dict | None = None, folder: str = "{:03d}.Class_{}") -> tuple[Evaluation, SimpleNamespace]:
    """Overlapping classes (so the rankings have errors), every sample query and gallery, and
    records with one small image per sample (the colour of its class) in a folder per class
    (``folder.format(label, label)``: the class's name)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    emb = 1.2 * torch.randn(classes, dim, generator=g)[labels] + torch.randn(len(labels), dim, generator=g)
    n = len(labels)
    paths = []
    for i, lab in enumerate(labels.tolist()):
        path = tmp_path / "images" / folder.format(lab, lab) / f"{i}.jpg"
        fixtures.write_jpeg(path, lab)
        paths.append(str(path))
    records = SimpleNamespace(paths=paths, labels=labels.numpy(), class_ids=np.arange(classes) + 100)
    evaluation = Evaluation("test", emb, labels, torch.arange(n), torch.ones(n, dtype=torch.bool),
                            torch.ones(n, dtype=torch.bool), refined=refined or {})
    return evaluation, SimpleNamespace(test_records=records)


def naive_ranking(emb: torch.Tensor, query: int) -> list[int]:
    """Every other sample by float64 cosine, ties to the lower index: the reference order."""
    x = torch.nn.functional.normalize(emb.double(), dim=1).numpy()
    sims = x @ x[query]
    others = [j for j in range(len(x)) if j != query]
    return sorted(others, key=lambda j: (-sims[j], j))


def context(tmp_path: Path, evaluation: Evaluation, dm: SimpleNamespace, **settings) -> fig.FigureContext:
    return fig.FigureContext(out_dir=tmp_path / "figs", evaluation=evaluation, datamodule=dm,
                             model=SimpleNamespace(method_name="toy"), settings=fig.FigureSettings(**settings))


# ---------------------------------------------------------------------------- what is drawn
def test_retrieval_grid_marks_agree_with_a_naive_float64_ranking(tmp_path: Path) -> None:
    evaluation, dm = toy_evaluation(tmp_path)
    labels = evaluation.labels.tolist()
    ctx = context(tmp_path, evaluation, dm, top_k=5, queries=4, worst_queries=3)
    result = fig.retrieval_grid(ctx)
    rows = result.data["rankings"]["plain"]["rows"]
    assert [r["kind"] for r in rows] == ["random"] * 4 + ["worst"] * 3
    first_ranks = {}
    for q in range(len(labels)):
        order = naive_ranking(evaluation.embeddings, q)
        first_ranks[q] = next(i for i, j in enumerate(order) if labels[j] == labels[q]) + 1
    for row in rows:
        q = row["query"]
        expected = naive_ranking(evaluation.embeddings, q)[:5]
        assert [n["index"] for n in row["neighbours"]] == expected
        assert [n["correct"] for n in row["neighbours"]] == [labels[j] == labels[q] for j in expected]  # the marks
        assert row["first_positive_rank"] == first_ranks[q]
        x = torch.nn.functional.normalize(evaluation.embeddings.double(), dim=1)
        assert [n["score"] for n in row["neighbours"]] == pytest.approx([float(x[q] @ x[j]) for j in expected], abs=1e-5)
    random_queries = {r["query"] for r in rows[:4]}
    rest = sorted((-first_ranks[q], q) for q in first_ranks if q not in random_queries)[:3]
    assert [r["query"] for r in rows[4:]] == [q for _, q in rest]  # the worst queries by first-positive rank
    assert result.data["rankings"]["plain"]["recall_at_1"] == pytest.approx(
        np.mean([first_ranks[q] == 1 for q in first_ranks]))
    assert min(png_size(result.paths[0])) > 200
    again = fig.retrieval_grid(context(tmp_path, evaluation, dm, top_k=5, queries=4, worst_queries=3))
    assert again.data == result.data  # deterministic for a seed
    other = fig.retrieval_grid(context(tmp_path, evaluation, dm, top_k=5, queries=4, worst_queries=3, seed=1))
    assert [r["query"] for r in other.data["rankings"]["plain"]["rows"][:4]] != [r["query"] for r in rows[:4]]


def test_a_methods_ranked_lists_are_drawn_as_it_ranked_them(tmp_path: Path) -> None:
    evaluation, dm = toy_evaluation(tmp_path)
    n = len(evaluation.labels)
    reversed_lists = torch.tensor([naive_ranking(evaluation.embeddings, q)[::-1][:6] for q in range(n)])
    evaluation.refined = {"": RankedLists(reversed_lists)}
    ctx = context(tmp_path, evaluation, dm, top_k=4, queries=3, worst_queries=1)
    assert ctx.ranking_keys() == ["", "refined"]
    result = fig.retrieval_grid(ctx)
    assert [p.name for p in result.paths] == ["retrieval_grid.png", "retrieval_grid_refined.png"]
    labels = evaluation.labels.tolist()
    for row in result.data["rankings"]["refined"]["rows"]:
        q = row["query"]
        assert [nb["index"] for nb in row["neighbours"]] == reversed_lists[q, :4].tolist()
        assert [nb["correct"] for nb in row["neighbours"]] == [labels[j] == labels[q] for j in reversed_lists[q, :4]]


def test_query_rankings_rank_as_the_metrics_do_ties_and_roles_included() -> None:
    g = torch.Generator().manual_seed(3)
    codebook = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)][1:], dtype=torch.float32)
    emb = codebook[torch.randint(0, 7, (90,), generator=g)]  # 7 distinct rows: many exact ties, in any summation order
    labels = torch.randint(0, 7, (90,), generator=g)
    is_query = torch.rand(90, generator=g) < 0.6
    is_gallery = ~is_query | (torch.rand(90, generator=g) < 0.5)
    ranks = query_rankings(emb, labels, is_query, is_gallery, k=4)
    metrics = retrieval_metrics(emb, labels, is_query, is_gallery, recall_ks=(1, 2, 4), device="cpu")
    has = ranks.first_positive >= 0
    for k in (1, 2, 4):
        assert float((ranks.first_positive[has] < k).double().mean()) == pytest.approx(metrics[f"R@{k}"], abs=1e-12)
    assert int((~has).sum()) == metrics["queries_without_positive"]
    x = torch.nn.functional.normalize(emb, dim=1)
    gallery = is_gallery.nonzero().flatten().tolist()
    for row, q in enumerate(ranks.queries.tolist()):  # the top of the list: score, then lower index
        order = sorted((j for j in gallery if j != q), key=lambda j: (-float(x[q] @ x[j]), j))
        assert ranks.top[row].tolist() == order[:4]


def test_embedding_map_before_and_after_refinement_on_one_projection(tmp_path: Path) -> None:
    base, _ = toy_evaluation(tmp_path)
    refined = base.embeddings + 0.3 * torch.randn(base.embeddings.shape, generator=torch.Generator().manual_seed(1))
    evaluation, dm = toy_evaluation(tmp_path, refined={"": refined})
    result = fig.embedding_map(context(tmp_path, evaluation, dm, max_classes=4, max_points=40))
    data = result.data
    assert set(data["sets"]) == {"plain", "refined"} and data["shared_projection"]
    assert data["projection"] == "t-SNE (openTSNE)"
    assert len(np.unique(data["labels"])) == 4 and len(data["indices"]) == 20  # 40 points over the two sets
    again = fig.embedding_map(context(tmp_path, evaluation, dm, max_classes=4, max_points=40))
    assert np.array_equal(np.asarray(again.data["sets"]["plain"]), np.asarray(data["sets"]["plain"]))  # seeded
    assert min(png_size(result.paths[0])) > 200


def test_the_map_keeps_classes_apart() -> None:
    g = torch.Generator().manual_seed(3)
    labels = np.repeat(np.arange(8), 15)
    points = (3.0 * torch.randn(8, 32, generator=g)[labels] + torch.randn(len(labels), 32, generator=g)).numpy()
    one, name = fig.project_2d(points, seed=0)
    assert name == "t-SNE (openTSNE)"
    d = ((one[:, None] - one[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() >= 0.95  # separated classes stay separated in 2-D


def test_per_class_recall_names_the_worst_classes(tmp_path: Path) -> None:
    evaluation, dm = toy_evaluation(tmp_path)
    result = fig.per_class_recall(context(tmp_path, evaluation, dm))
    labels = evaluation.labels.tolist()
    hits = {}
    for q in range(len(labels)):
        hits.setdefault(labels[q], []).append(labels[naive_ranking(evaluation.embeddings, q)[0]] == labels[q])
    plain = result.data["plain"]
    for name, entry in plain["classes"].items():
        assert entry["recall_at_1"] == pytest.approx(np.mean(hits[entry["label"]]))
        assert name == f"{entry['label']:03d}.Class_{entry['label']}"  # one image folder per class: its name
    worst = [w["recall_at_1"] for w in plain["worst"]]
    assert worst == sorted(worst) and worst[0] == min(np.mean(h) for h in hits.values())


def keep_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The matplotlib figures the figure functions save, by file stem (to read what they drew)."""
    kept: dict[str, Any] = {}
    save = fig.FigureContext.save

    def keeping(self: fig.FigureContext, figure: Any, stem: str) -> Path:
        kept[stem] = figure
        return save(self, figure, stem)

    monkeypatch.setattr(fig.FigureContext, "save", keeping)
    return kept


def test_class_names_are_shortened_at_word_boundaries_wherever_they_are_drawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = "{:03d}.Black_footed_Albatross_variant_{}"
    evaluation, dm = toy_evaluation(tmp_path, folder=folder)
    full = {folder.format(c, c) for c in range(6)}
    kept = keep_figures(monkeypatch)
    ctx = context(tmp_path, evaluation, dm, max_points=40, queries=3, worst_queries=1)
    fig.per_class_recall(ctx)
    grid = fig.retrieval_grid(ctx)
    fig.embedding_map(ctx)
    bars = [t.get_text().rsplit(" (", 1)[0] for t in kept["per_class_recall"].axes[1].get_yticklabels()
            if t.get_text().endswith(" q)")]
    legend = [t.get_text() for t in kept["embedding_map"].axes[-1].get_legend().get_texts()]
    captions = [row["caption"] for row in grid.data["rankings"]["plain"]["rows"]]
    for text in bars + legend + captions:
        if text not in full:  # shortened: a whole-word prefix of a name, then the ellipsis
            assert text.endswith(fig.ELLIPSIS), text
            prefix = text[: -len(fig.ELLIPSIS)]
            assert any(name.startswith(prefix) and name[len(prefix)] in fig.WORD_SEPARATORS for name in full), text
    assert bars and legend and captions and all(t.endswith(fig.ELLIPSIS) for t in bars + legend + captions)
    assert fig.shorten("001.Black_footed_Albatross", 20) == "001.Black_footed\u2026"
    assert fig.shorten("Albatross", 5) == "Alba\u2026"  # one word longer than the room: the only cut inside a word


def test_the_worst_classes_stop_before_a_tie_they_cannot_order() -> None:
    spread = {c: (c / 20, 3) for c in range(15)}
    assert fig.worst_classes(spread, 10) == ([(c, c / 20, 3) for c in range(10)], None)
    tied = {0: (0.1, 3), 1: (0.2, 4), **{c: (0.5, 3) for c in range(2, 14)}, 14: (0.9, 3)}
    assert fig.worst_classes(tied, 10) == ([(0, 0.1, 3), (1, 0.2, 4)], {"recall_at_1": 0.5, "classes": 12})
    assert fig.worst_classes({c: (0.25, 2) for c in range(4)}, 10) == ([], {"recall_at_1": 0.25, "classes": 4})


def test_the_projection_fits_its_time_budget_and_says_how() -> None:
    assert fig.tsne_schedule(0.1, 0.001, 10.0) == (100, 200)
    assert fig.tsne_schedule(0.1, 0.001, 0.1 + 0.001 * 140) == (50, 100)  # 150 iterations, 10 of them run
    assert fig.tsne_schedule(0.1, 0.001, 0.1 + 0.001 * 65) == (25, 50)
    assert fig.tsne_schedule(0.1, 0.001, 0.16) is None
    g = torch.Generator().manual_seed(0)
    points = (3.0 * torch.randn(6, 16, generator=g)[torch.arange(6).repeat_interleave(20)]
              + torch.randn(120, 16, generator=g)).numpy()
    full = fig.project(points, seed=0)
    assert (full.method, full.iterations, full.note) == ("t-SNE (openTSNE)", (100, 200), "")
    roomy = fig.project(points, seed=0, seconds=1000.0)
    assert roomy.iterations == (100, 200) and np.array_equal(roomy.coords, full.coords)  # one schedule, one map
    for seconds in (0.0, 1e-4):  # no time: PCA, and the note says why
        pca = fig.project(points, seed=0, seconds=seconds)
        assert pca.method == "PCA" and pca.iterations is None and "figures' time budget" in pca.note
        assert pca.coords.shape == (120, 2)


def test_figures_go_to_wandb_as_images_only_through_a_wandb_logger(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    calls = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, **kw: calls.append(kw))
    logger = WandbLogger.__new__(WandbLogger)
    paths = [tmp_path / "retrieval_grid.png", tmp_path / "embedding_map.png"]
    assert fig.log_images(SimpleNamespace(loggers=[CSVLogger(str(tmp_path)), logger]), paths) == 2
    assert [c["key"] for c in calls] == ["figures/retrieval_grid", "figures/embedding_map"]
    assert calls[0]["images"] == [str(paths[0])]


# ---------------------------------------------------------------------------- commands and runs
def drawn(path: Path) -> dict:
    """What a figure drew (its JSON without the times it took)."""
    data = json.loads(path.read_text())
    data.pop("seconds", None)
    data.pop("projection_seconds", None)
    return data


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


@pytest.fixture(scope="module")
def fitted_run(cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fit") / "run"
    args = ["fit", "--method", "ms", "--data", "cub", "--data.root", str(cub_root), "--recipe", "none", *TINY,
            "--data.classes_per_batch", "4", "--data.samples_per_class", "2", "--data.batches_per_epoch", "3",
            "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1", "--logger", "csv", "--run_dir", str(run),
            "--figures.max_points", "60", "--figures.budget", "null"]  # the full t-SNE, as `analyze` draws it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    return run


def test_fit_writes_the_generic_figures_into_the_run(fitted_run: Path) -> None:
    out = fitted_run / "figures"
    for name in ("retrieval_grid", "embedding_map", "per_class_recall", "training_curves"):
        assert min(png_size(out / f"{name}.png")) > 200, name
        assert json.loads((out / f"{name}.json").read_text())["figure"] == name
    curves = json.loads((out / "training_curves.json").read_text())
    assert curves["source"] == "figures/training_history.csv" and "loss" in curves["training_terms"]
    assert curves["selection_metric"] == "val/R@1" and curves["validations"] == 3 and curves["tests"] == 1
    history = (out / "training_history.csv").read_text().splitlines()
    assert history[0] == "step,epoch,name,value" and len([r for r in history if ",train/loss," in r]) == 6
    test = json.loads((fitted_run / "metrics_test.json").read_text())["evaluations"][-1]
    assert test["embed_seconds"] > 0 and test["seconds"] > 0  # the loop over the split, then the metrics


def test_analyze_redraws_a_runs_figures_from_its_checkpoint_without_touching_its_results(
    fitted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = (fitted_run / "metrics_test.json").read_text()
    out = tmp_path / "again"
    ckpt = str(fitted_run / "checkpoints" / "last.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["analyze", "figures", "--ckpt", ckpt, "--out", str(out), "--trainer.enable_progress_bar", "false"]) == 0
        # the fit tested these same weights (paper protocol: the last ones): the same figures
        for name in ("retrieval_grid", "per_class_recall", "embedding_map"):
            assert drawn(out / f"{name}.json") == drawn(fitted_run / "figures" / f"{name}.json"), name
        assert (fitted_run / "metrics_test.json").read_text() == results and not (fitted_run / "config_test.yaml").exists()
        assert main(["analyze", "retrieval_grid", "--ckpt", ckpt, "--out", str(tmp_path / "seed1"), "--seed", "1",
                     "--trainer.enable_progress_bar", "false"]) == 0
        assert sorted(p.name for p in (tmp_path / "seed1").iterdir()) == ["retrieval_grid.json", "retrieval_grid.png"]
        capsys.readouterr()
        assert main(["analyze", "context_refine_drift", "--ckpt", ckpt, "--out", str(tmp_path / "no")]) == 2
    assert "is drawn for context_refine runs" in capsys.readouterr().err


def test_a_later_test_of_the_checkpoint_is_drawn_at_the_checkpoints_epoch(fitted_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a `test --ckpt_path` evaluates at step 0 of a fresh trainer
        assert main(["test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar",
                     "false", "--figures.names", "[training_curves]"]) == 0
    tests = json.loads((run / "figures" / "training_curves.json").read_text())["validation"]["test/R@1"]
    assert [t["epochs_trained"] for t in tests] == pytest.approx([2.0, 2.0])  # both tested the weights after 2 epochs
    recorded = json.loads((run / "metrics_test.json").read_text())["evaluations"]
    assert [t["value"] for t in tests] == [e["metrics"]["R@1"] for e in recorded]


def _val_entries(run: Path) -> list[dict]:
    return json.loads((run / "metrics_val.json").read_text())["evaluations"]


def test_training_curves_star_the_checkpoint_callbacks_best_never_the_untrained_model(
    fitted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = json.loads((fitted_run / "metrics_val.json").read_text())
    assert record["split"] == "test"  # the paper protocol: validation on the test split
    best = best_validation(record["evaluations"], "R@1")
    assert best is not None and best["global_step"] > 0
    (kept_ckpt,) = (fitted_run / "checkpoints").glob("best-*.ckpt")  # best-<epoch>-<step>.ckpt
    assert int(kept_ckpt.stem.rsplit("-", 1)[1]) == best["global_step"]
    drawn_best = json.loads((fitted_run / "figures" / "training_curves.json").read_text())["best"]
    assert drawn_best["global_step"] == best["global_step"] and drawn_best["value"] == best["metrics"]["R@1"]
    assert drawn_best["epochs_trained"] == epochs_trained(best) and OPTIMISTIC in drawn_best["label"]
    kept = keep_figures(monkeypatch)
    fig.training_curves(fig.FigureContext(out_dir=tmp_path / "again", run_dir=fitted_run, selection_metric="val/R@1"))
    star = next(c for c in kept["training_curves"].axes[1].collections if c.get_label() == drawn_best["label"])
    assert star.get_offsets().tolist() == [[epochs_trained(best), 100 * best["metrics"]["R@1"]]]
    holdout = tmp_path / "holdout"  # the same records under the holdout protocol: not optimistic
    holdout.mkdir()
    (holdout / "metrics_val.json").write_text(json.dumps({**record, "split": "holdout"}))
    again = fig.training_curves(fig.FigureContext(out_dir=holdout / "figures", run_dir=holdout, selection_metric="val/R@1"))
    assert again.data["best"]["global_step"] == best["global_step"] and OPTIMISTIC not in again.data["best"]["label"]


def test_training_curves_are_percent_at_epochs_trained_with_short_series_visible(
    fitted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = keep_figures(monkeypatch)
    fig.training_curves(fig.FigureContext(out_dir=tmp_path, run_dir=fitted_run, selection_metric="val/R@1"))
    ax_loss, ax_val = kept["training_curves"].axes
    assert ax_loss.get_xlabel() == ax_val.get_xlabel() == "epochs trained"
    vals = _val_entries(fitted_run)
    lines = {line.get_label(): line for line in ax_val.get_lines()}
    for label, metric in (("val/R@1  (selects the checkpoint)", "R@1"), ("val/MAP@R", "MAP@R")):
        assert list(lines[label].get_xdata()) == [epochs_trained(e) for e in vals] == [0.0, 1.0, 2.0]
        assert list(lines[label].get_ydata()) == pytest.approx([100 * e["metrics"][metric] for e in vals])
    final = json.loads((fitted_run / "metrics_test.json").read_text())["evaluations"][-1]
    (test_point,) = [c for c in ax_val.collections if c.get_label() == "test/R@1"]
    assert test_point.get_offsets().tolist() == [[2.0, 100 * final["metrics"]["R@1"]]]  # after the fit's 2 epochs
    short = [line for ax in (ax_loss, ax_val) for line in ax.get_lines() if len(line.get_xdata()) <= plotting.FEW_POINTS]
    assert short and all(line.get_marker() not in (None, "", " ", "None") for line in short)


def test_records_without_epochs_trained_are_drawn_at_the_same_epochs(fitted_run: Path, tmp_path: Path) -> None:
    """Runs recorded before ``epochs_trained`` was: the end-of-fit test and a later checkpoint test too."""
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar",
                     "false", "--figures.names", "[training_curves]"]) == 0
    now = json.loads((run / "figures" / "training_curves.json").read_text())
    for stage in ("val", "test"):
        record = json.loads((run / f"metrics_{stage}.json").read_text())
        for entry in record["evaluations"]:
            entry.pop("epochs_trained", None)
        (run / f"metrics_{stage}.json").write_text(json.dumps(record))
    legacy = fig.training_curves(fig.FigureContext(out_dir=tmp_path / "legacy", run_dir=run, selection_metric="val/R@1"))
    assert legacy.data["validation"] == now["validation"] and legacy.data["best"] == now["best"]
    assert [t["epochs_trained"] for t in now["validation"]["test/R@1"]] == [2.0, 2.0]


def test_per_class_recall_says_that_all_classes_tie_instead_of_listing_some(fitted_run: Path) -> None:
    data = json.loads((fitted_run / "figures" / "per_class_recall.json").read_text())["plain"]
    final = json.loads((fitted_run / "metrics_test.json").read_text())["evaluations"][-1]["metrics"]
    classes = data["classes"]
    assert {c["recall_at_1"] for c in classes.values()} == {final["R@1"]}  # one colour per class: all told apart
    assert data["worst"] == [] and data["tied"] == {"recall_at_1": final["R@1"], "classes": len(classes)}
    assert data["worst_summary"] == f"all {len(classes)} classes at {100 * final['R@1']:.1f} %"


def test_after_a_test_the_figures_keep_to_their_share_of_the_runs_evaluation_time(
    fitted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar",
                     "false", "--figures.names", "[embedding_map, training_curves]", "--figures.budget", "0.1"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("[benchmark] figures:"))
    assert line.startswith("[benchmark] figures: training_curves")  # the adaptive map last (the first always starts)
    total = sum(e["seconds"] + e["embed_seconds"] for stage in ("val", "test")
                for e in json.loads((run / f"metrics_{stage}.json").read_text())["evaluations"])
    assert f"of the run's {total:.1f}s of evaluation; budget 10 %" in line
    if "skipped for time: embedding_map" in line:  # a tiny run's evaluation left no time for it
        assert f"analyze figures --ckpt {run / 'checkpoints' / 'last.ckpt'}` draws" in line
        assert not (run / "figures" / "embedding_map.json").exists()  # the fit's map (other weights) is gone
        assert not (run / "figures" / "embedding_map.png").exists()
        return
    drawn_map = json.loads((run / "figures" / "embedding_map.json").read_text())
    assert 0 <= drawn_map["time_budget_seconds"] <= 0.1 * total
    if drawn_map["projection"] == "t-SNE (openTSNE)":  # the full schedule fitted
        assert drawn_map["projection_seconds"] <= drawn_map["time_budget_seconds"] and not drawn_map["projection_note"]
    else:  # a shorter t-SNE or PCA, and the note says why
        assert "figures' time budget" in drawn_map["projection_note"]


def test_under_a_budget_a_figure_starts_only_when_the_time_left_covers_one(tmp_path: Path) -> None:
    def slow(context: fig.FigureContext) -> fig.FigureResult:
        time.sleep(0.05)
        return fig.FigureResult([], {})

    figures = [Figure(name, slow, "", "tests") for name in ("first", "second", "third")]
    unlimited = fig.FigureContext(out_dir=tmp_path / "all")
    assert list(fig.draw_figures(figures, unlimited)) == ["first", "second", "third"] and unlimited.skipped == []
    budgeted = fig.FigureContext(out_dir=tmp_path / "budget", deadline=time.perf_counter() + 0.08)
    assert list(fig.draw_figures(figures, budgeted)) == ["first"]  # 0.03 s or less left: a figure takes 0.05 s
    assert budgeted.skipped == ["second", "third"] and budgeted.drawn_seconds[0] >= 0.05
    assert not (tmp_path / "budget" / "second.json").exists()
    (tmp_path / "all" / "third.png").write_bytes(b"")  # a file of an earlier drawing, listed in its JSON
    record = json.loads((tmp_path / "all" / "third.json").read_text())
    (tmp_path / "all" / "third.json").write_text(json.dumps({**record, "files": ["third.png"]}))
    fig.draw_figures(figures, fig.FigureContext(out_dir=tmp_path / "all", deadline=time.perf_counter() + 0.08))
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["first.json"]  # nothing stale is left


def test_analyze_logs_the_figures_as_images_into_an_offline_wandb_run(
    fitted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    ckpt = str(fitted_run / "checkpoints" / "last.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["analyze", "per_class_recall", "--ckpt", ckpt, "--out", str(tmp_path / "figs"), "--logger", "wandb",
                     "--trainer.enable_progress_bar", "false"]) == 0
    images = sorted((fitted_run / "wandb").glob("offline-run-*/files/media/images/figures/*.png"))
    assert [p.name.split("_")[:3] for p in images] == [["per", "class", "recall"]]


def test_analyze_help_lists_every_figure_with_its_owner(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--help"]) == 0
    out = capsys.readouterr().out
    for name, owner in (("retrieval_grid", "benchmark.engine.figures.retrieval_grid"),
                        ("training_curves", "benchmark.engine.figures.training_curves"),
                        ("context_refine_drift", "companions.context_refine_analysis"),
                        ("intra_batch_attention", "companions.intra_batch_analysis"),
                        ("dmcac_view_similarity", "companions.dmcac_analysis"),
                        ("cross_image_attention_maps", "companions.cross_image_attention_analysis"),
                        ("figures", "benchmark.app.analysis"), ("cross_image_attention", "companions.cross_image_attention_analysis")):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert f"[{owner}]" in line
    assert isinstance(registry.ANALYSES["embedding_map"].run, registry.FigureCommand)


def test_the_figures_flag_and_options_reach_the_callback(
    cub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["--method", "ms", "--data", "cub", "--data.root", str(cub_root), "--recipe", "none", *TINY, "--logger", "none"]

    def writers(*args: str) -> list[fig.FigureWriter]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = build_cli("fit", [*base, "--run_dir", str(tmp_path / str(len(list(tmp_path.iterdir())))), *args], run=False)
        return [c for c in cli.trainer.callbacks if isinstance(c, fig.FigureWriter)]

    monkeypatch.delenv("DML_BENCHMARK_FIGURES", raising=False)
    assert len(writers()) == 1  # on by default
    found = writers("--figures.top_k", "3")
    assert len(found) == 1 and found[0].settings.top_k == 3 and found[0].run_dir is not None
    assert writers("--figures", "false") == [] and writers("--figures.enabled", "false") == []
    monkeypatch.setenv("DML_BENCHMARK_FIGURES", "false")  # off unless asked for on the command line
    assert writers() == [] and len(writers("--figures", "true")) == 1
    assert main(["fit", *base, "--figures", "maybe"]) == 2


@pytest.mark.parametrize(
    ("method", "figure", "extra", "files"),
    [
        ("context_refine", "figures", ["--model.refiner.num_blocks", "3", "--model.refiner.num_neighbours", "4"],
         ["context_refine_drift.png", "context_refine_levels.png", "retrieval_grid_refined.png", "embedding_map.png"]),
        ("intra_batch", "intra_batch_attention", [], ["intra_batch_attention.png"]),
        ("dmcac", "dmcac_view_similarity", ["--model.views.count", "2"], ["dmcac_view_similarity.png"]),
        ("cross_image_attention", "cross_image_attention_maps", ["--model.num_blocks", "2"], None),
    ],
)
def test_each_methods_own_figures_are_drawn_by_analyze(
    method: str, figure: str, extra: list[str], files: list[str] | None, cub_root: Path, tmp_path: Path
) -> None:
    """From the model a fit starts from (no --ckpt): the figures' plumbing, on any weights."""
    out = tmp_path / "out"
    args = ["analyze", figure, "--method", method, "--data", "cub", "--data.root", str(cub_root), "--recipe", "none",
            *TINY, *extra, "--out", str(out), "--queries", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    for name in files or []:
        assert name in written
    if files is None:  # the attention maps: one figure per seeded triple
        assert len([n for n in written if n.startswith("cia_attention_test_")]) == 3
    assert all(min(png_size(out / name)) > 100 for name in written)
    if method == "context_refine":
        levels = json.loads((out / "context_refine_levels.json").read_text())
        assert levels["levels"] == ["e0", "e1", "e2", "e3", "output"]
        drift = json.loads((out / "context_refine_drift.json").read_text())
        assert list(drift["sets"]) == ["e0 (initial)", "e2", "e3 (last level)"] and drift["shared_projection"]
    if method == "dmcac":
        data = json.loads((out / "dmcac_view_similarity.json").read_text())
        for state in data["states"].values():
            for query in state:
                p = np.asarray(query["probabilities"])
                assert p.shape[0] == 2 and np.allclose(p.sum(axis=1), 1.0, atol=1e-4)
