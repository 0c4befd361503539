"""Tied scores (issue #19): exact ranks against a naive reference, cost relative to untied input,
the collapse check and warning, and ``perf eval --ties``."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

import benchmark.engine.evaluation.search as search_module
from benchmark.engine.evaluation import RetrievalEvaluator, retrieval_metrics
from benchmark.engine.evaluation.metrics import count_duplicate_rows
from tests.evaluation.test_metrics import _naive, assert_metrics_equal


# ---------------------------------------------------------------------------- tied inputs
def _exact_quantised(m: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """(m, dim) rows of -1, 0 and 1 with 1 or 4 non-zero entries.

    Their L2-normalised entries are 0, +-1/2 or +-1 and every cosine a multiple of 1/4, exact
    in float32 and float64 alike, so the float32 suite and the float64 reference see the same
    ties (random reals would tie in one precision and not the other).
    """
    k = torch.where(torch.rand(m, generator=g) < 0.3, 1, 4)  # (m,) non-zeros per row
    support = torch.rand(m, dim, generator=g).argsort(dim=1)  # (m, dim) random positions
    signs = torch.randint(0, 2, (m, dim), generator=g) * 2 - 1
    on = torch.arange(dim)[None, :] < k[:, None]  # (m, dim) the first k positions
    return torch.zeros(m, dim).scatter_(1, support, (signs * on).float())


def tied_split(kind: str, n: int, num_classes: int, seed: int, roles: str) -> dict:
    """A split whose scores tie heavily, with shuffled dataset indices (ties by index, not row).

    ``kind``: ``all-equal`` (one embedding), ``half-duplicated`` (the second half of the rows
    repeats the first), ``quantised`` (rows of -1, 0, 1: a few distinct scores, large tie
    groups), ``few-rows`` (6 distinct rows: a collapsed model with a little life left).
    ``roles``: ``all`` (every sample is a query and a gallery item) or ``separate``
    (mostly disjoint query and gallery sets that overlap a little). Three samples have a
    class of their own (queries without a positive).
    """
    g = torch.Generator().manual_seed(seed)
    dim = 8
    if kind == "all-equal":
        emb = _exact_quantised(1, dim, g).expand(n, dim).clone()
    elif kind == "half-duplicated":
        emb = _exact_quantised(n, dim, g)
        emb[n // 2 :] = emb[: n - n // 2].clone()
    elif kind == "quantised":
        emb = _exact_quantised(n, dim, g)
    elif kind == "few-rows":
        emb = _exact_quantised(6, dim, g)[torch.randint(0, 6, (n,), generator=g)]
    else:
        raise ValueError(kind)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[:3] = torch.arange(num_classes, num_classes + 3)  # classes of size one
    is_query = torch.ones(n, dtype=torch.bool)
    is_gallery = torch.ones(n, dtype=torch.bool)
    if roles == "separate":
        is_query = torch.rand(n, generator=g) < 0.4
        is_gallery = ~is_query | (torch.rand(n, generator=g) < 0.2)
        is_query[:3] = True
    indices = torch.randperm(3 * n, generator=g)[:n]
    return {"embeddings": emb, "labels": labels, "is_query": is_query, "is_gallery": is_gallery, "indices": indices}


# ---------------------------------------------------------------------------- against the naive reference
@pytest.mark.parametrize("roles", ["all", "separate"])
@pytest.mark.parametrize("kind", ["all-equal", "half-duplicated", "quantised", "few-rows"])
@pytest.mark.parametrize(("num_classes", "seed"), [(2, 0), (7, 1), (30, 2)])
def test_heavy_ties_match_naive_reference(kind: str, roles: str, num_classes: int, seed: int) -> None:
    """Ranks equal those of a stable sort by (-score, dataset index), with or without pruning.

    The reference sums in a different order, so the metrics are compared to 1e-12; a single
    rank that differed would move them by more than 1 / (queries * R) > 1e-5.
    """
    split = tied_split(kind, 120, num_classes, seed, roles)
    # shallow (pruning of deep positives), medium, and deeper than the gallery (no pruning)
    for ks, map_at_k, layouts in [((1, 2, 4), 3, [(None, None), (7, 8)]), ((1, 2, 5, 20), 10, [(13, 16)]),
                                  ((1, 500), 1000, [(None, None)])]:
        expected = _naive(split, ks, map_at_k)
        assert expected["queries_without_positive"] > 0
        for chunk, block in layouts:
            got = retrieval_metrics(**split, recall_ks=ks, map_at_k=map_at_k, chunk_size=chunk, block_size=block)
            assert_metrics_equal(got, expected)


def test_blocks_of_ties_prune_positives_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pruning that counts a block of tied items in full runs, drops positives, stays exact."""
    split = tied_split("all-equal", 300, 40, 3, "all")
    weights, drops = [], []
    original_weights, original_prefix = search_module._tie_weights, search_module._kept_prefix

    def weights_spy(*args):
        w = original_weights(*args)
        weights.append(float(w.max()))
        return w

    def prefix_spy(*args):
        kept = original_prefix(*args)
        drops.append(bool((kept < args[2]).any()))
        return kept

    monkeypatch.setattr(search_module, "_tie_weights", weights_spy)
    monkeypatch.setattr(search_module, "_kept_prefix", prefix_spy)
    ks, map_at_k = (1, 2, 4), 3
    got = retrieval_metrics(**split, recall_ks=ks, map_at_k=map_at_k, chunk_size=50, block_size=8)
    assert weights and max(weights) == 8.0, "no block was counted as a block of ties"
    assert any(drops), "no positive was dropped"
    assert_metrics_equal(got, _naive(split, ks, map_at_k))


# ---------------------------------------------------------------------------- cost relative to untied input
def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _tied_over_random(kinds: list[str], n: int = 3000, dim: int = 16, repeats: int = 2) -> dict[str, float]:
    """Best-of time ratios tied / random on the same labels, measured interleaved in this test.

    20 classes (R = 150): the old search walked every run of tied positives once per tied
    item and took 14x the random time here (35x with 4 classes).
    """
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 20
    random = torch.randn(n, dim, generator=g)
    sets = {"random": random, "all-equal": torch.ones(n, dim), "half-duplicated": torch.cat([random[: n // 2]] * 2),
            "quantised": (random * 0.7).round().clamp(-1, 1)}
    best = {kind: float("inf") for kind in ["random", *kinds]}
    for _ in range(repeats):  # interleaved, so that every input sees the same machine state
        for kind in best:
            seconds = _best_seconds(lambda kind=kind: retrieval_metrics(sets[kind], labels), 1)
            best[kind] = min(best[kind], seconds)
    return {kind: best[kind] / best["random"] for kind in kinds}


@pytest.mark.slow  # a timing ratio (~5 s); `perf eval --ties` measures it at SOP scale
def test_all_equal_embeddings_cost_about_as_much_as_random_ones() -> None:
    ratio = _tied_over_random(["all-equal"])["all-equal"]
    assert ratio <= 4.0, f"all-equal embeddings took {ratio:.1f}x the time of random ones"


@pytest.mark.slow
def test_half_duplicated_and_quantised_embeddings_cost_about_as_much_as_random_ones() -> None:
    ratios = _tied_over_random(["half-duplicated", "quantised"])
    assert max(ratios.values()) <= 4.0, ratios


# ---------------------------------------------------------------------------- collapse check and warning
def test_count_duplicate_rows() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    assert count_duplicate_rows(x) == 0
    assert count_duplicate_rows(torch.ones(50, 6)) == 49
    assert count_duplicate_rows(torch.cat([x, x[:20], x[:5]])) == 25  # 5 rows thrice, 15 twice
    assert count_duplicate_rows(torch.tensor([[0.0, 1.0], [-0.0, 1.0]])) == 1  # -0.0 == +0.0
    assert count_duplicate_rows(x.double()) == 0
    assert count_duplicate_rows(torch.ones(1, 3)) == 0
    with pytest.raises(ValueError, match="2-D"):
        count_duplicate_rows(torch.ones(5))


def _eval_data(embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    n = embeddings.shape[0]
    return {"embeddings": embeddings, "labels": torch.arange(n) % 5, "indices": torch.arange(n),
            "is_query": torch.ones(n, dtype=torch.bool), "is_gallery": torch.ones(n, dtype=torch.bool)}


def _collapse_warnings(evaluator: RetrievalEvaluator, embeddings: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluator.compute_metrics(_eval_data(embeddings), {}, (1, 2), False, torch.device("cpu"))
    return [str(w.message) for w in caught if "collapsed" in str(w.message)]


def test_collapsed_embeddings_warn_once_per_evaluator() -> None:
    evaluator = RetrievalEvaluator(print_table=False)
    with pytest.warns(UserWarning, match=r"the embeddings have collapsed: 199 of 200 rows .* training failure"):
        evaluator.compute_metrics(_eval_data(torch.ones(200, 8)), {}, (1, 2), False, torch.device("cpu"))
    assert _collapse_warnings(evaluator, torch.ones(200, 8)) == []  # the second evaluation is quiet
    assert len(_collapse_warnings(RetrievalEvaluator(print_table=False), torch.ones(200, 8))) == 1  # a new one warns


def test_random_embeddings_and_a_few_duplicates_do_not_warn() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g)
    assert _collapse_warnings(RetrievalEvaluator(print_table=False), x) == []
    x[:10] = x[10:20]  # 1 % duplicate images: not more than the fraction
    assert _collapse_warnings(RetrievalEvaluator(print_table=False), x) == []
    x[:11] = x[11:22]
    assert len(_collapse_warnings(RetrievalEvaluator(print_table=False), x)) == 1
    lenient = RetrievalEvaluator(print_table=False)
    lenient.collapse_fraction = 0.5
    assert _collapse_warnings(lenient, torch.cat([x[:600], x[:400]])) == []  # 40 % < 50 %


# ---------------------------------------------------------------------------- perf eval --ties
def test_perf_eval_ties_runs_at_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmark.app.perf.eval import main

    assert main(["--ties", "--sizes", "300", "--dim", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for kind in ("SOP-like", "all-equal", "half-duplicated", "quantised"):
        assert kind in out
    assert "300 rows: all-equal / SOP-like = " in out


def test_perf_eval_ties_refuses_classes_it_would_ignore(capsys: pytest.CaptureFixture[str]) -> None:
    """--classes was silently ignored with --ties (each size uses SOP's class size): refused now."""
    from benchmark.app.cli import main

    assert main(["perf", "eval", "--ties", "--sizes", "300", "--classes", "50", "--device", "cpu"]) == 2
    assert "--classes does not apply with --ties" in capsys.readouterr().err


def test_perf_eval_compares_the_suite_with_its_peers_only(capsys: pytest.CaptureFixture[str]) -> None:
    """The verdict compared the suite with the rows after floor and suite by position: with --no-pml
    that was NMI's row (another metric), reported as a peer the suite is 'faster than'."""
    from benchmark.app.cli import main

    assert main(["perf", "eval", "--n", "2000", "--dim", "16", "--no-pml", "--map-at-k", "100", "--k", "100",
                 "--device", "cpu", "--nmi-iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "faster than faiss IndexFlatIP search" in out and "NMI (faiss k-means" in out
    assert "faster than NMI" not in out
