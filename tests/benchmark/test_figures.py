"""The figure layer: what the figures draw agrees with an independent computation, every figure
command writes its files, a run's figures are written after its test, and they are deterministic."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmark import figures as fig
from benchmark import registry
from benchmark.cli import build_cli, main
from benchmark.core import RankedLists
from benchmark.evaluation import Evaluation
from benchmark.evaluation.metrics import query_rankings, retrieval_metrics
from tests.benchmark.test_analysis import png_size
from tests.datamodules import fixtures

TINY = ["--backbone", "resnet_tiny_test", "--backbone.pretrained", "false", "--model.embedding_dim", "8",
        "--data.image_size", "16", "--data.num_workers", "0", "--data.eval_batch_size", "128",
        "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"]  # fmt: skip


# ---------------------------------------------------------------------------- a toy evaluation
def toy_evaluation(tmp_path: Path, classes: int = 6, per_class: int = 6, dim: int = 12, seed: int = 0,
                   refined: dict | None = None) -> tuple[Evaluation, SimpleNamespace]:
    """Overlapping classes (so the rankings have errors), every sample query and gallery, and
    records with one small image per sample (the colour of its class)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    emb = 1.2 * torch.randn(classes, dim, generator=g)[labels] + torch.randn(len(labels), dim, generator=g)
    n = len(labels)
    paths = []
    for i, lab in enumerate(labels.tolist()):
        path = tmp_path / "images" / f"{lab:03d}.Class_{lab}" / f"{i}.jpg"
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


def test_the_map_keeps_classes_apart_and_does_not_depend_on_the_thread_count() -> None:
    g = torch.Generator().manual_seed(3)
    labels = np.repeat(np.arange(8), 15)
    points = (3.0 * torch.randn(8, 32, generator=g)[labels] + torch.randn(len(labels), 32, generator=g)).numpy()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, name = fig.project_2d(points, seed=0)
        torch.set_num_threads(2)
        two, _ = fig.project_2d(points, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert name == "t-SNE (openTSNE)" and np.array_equal(one, two)
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
    """What a figure drew (its JSON without the time it took)."""
    data = json.loads(path.read_text())
    data.pop("seconds", None)
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
            "--figures.max_points", "60"]
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
    assert len(tests) == 2 and tests[0]["epoch"] == pytest.approx(2.0) and tests[1]["epoch"] == pytest.approx(2.0)


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
    for name, owner in (("retrieval_grid", "benchmark.figures"), ("training_curves", "benchmark.figures"),
                        ("context_refine_drift", "methods.context_refine_analysis"),
                        ("intra_batch_attention", "methods.intra_batch_analysis"),
                        ("dmcac_view_similarity", "methods.dmcac_analysis"),
                        ("cross_image_attention_maps", "methods.cross_image_attention_analysis"),
                        ("figures", "benchmark.analysis"), ("cross_image_attention", "methods.cross_image_attention_analysis")):
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
