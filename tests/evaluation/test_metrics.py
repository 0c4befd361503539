"""Metrics against independent references: naive float64 loops and pytorch-metric-learning."""

from __future__ import annotations

import math
import threading
from collections import Counter

import numpy as np
import pytest
import torch

import benchmark.engine.evaluation.search as search_module
from benchmark.core.contracts import RankedLists
from benchmark.engine.evaluation import nmi, ranked_list_metrics, retrieval_metrics
from benchmark.engine.evaluation.metrics import nmi_from_assignments


# ---------------------------------------------------------------------------- naive references
def _naive_from_relevance(rel: list[bool], num_pos: int, recall_ks, map_at_k: int) -> dict[str, float]:
    """Metric values of one query from its ranked relevance list (plain Python)."""
    out = {f"R@{k}": float(any(rel[:k])) for k in recall_ks}
    hits, ap_r, ap_k = 0, 0.0, 0.0
    for i, r in enumerate(rel):
        if r:
            hits += 1
            if i < num_pos:
                ap_r += hits / (i + 1)
            if i < map_at_k:
                ap_k += hits / (i + 1)
    out["MAP@R"] = ap_r / num_pos
    out["R-Precision"] = sum(rel[:num_pos]) / num_pos
    out[f"mAP@{map_at_k}"] = ap_k / min(num_pos, map_at_k)
    return out


def _average(per_query: list[dict[str, float]], without: int, num_gallery: int) -> dict[str, float]:
    keys = per_query[0].keys()
    out = {k: sum(q[k] for q in per_query) / len(per_query) for k in keys}
    out.update(num_queries=len(per_query), queries_without_positive=without, num_gallery=num_gallery)
    return out


def naive_metrics(emb, labels, is_query, is_gallery, indices, recall_ks, map_at_k) -> dict[str, float]:
    """Float64 loops: sort every query's gallery by (-cosine, dataset index), self excluded."""
    x = np.asarray(emb, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    order = sorted(range(n), key=lambda i: indices[i])
    per_query, without = [], 0
    for q in order:
        if not is_query[q]:
            continue
        gallery = [g for g in order if is_gallery[g] and g != q]
        sim = {g: float(np.dot(x[q], x[g])) for g in gallery}
        ranked = sorted(gallery, key=lambda g: (-sim[g], indices[g]))
        rel = [labels[g] == labels[q] for g in ranked]
        if not any(rel):
            without += 1
            continue
        per_query.append(_naive_from_relevance(rel, sum(rel), recall_ks, map_at_k))
    return _average(per_query, without, sum(bool(v) for v in is_gallery))


def naive_list_metrics(lists, labels, is_query, is_gallery, recall_ks, map_at_k) -> dict[str, float]:
    """Rows sorted by index already; R from all gallery samples; entries beyond a list miss."""
    queries = [i for i in range(len(labels)) if is_query[i]]
    per_query, without = [], 0
    for row, q in zip(lists, queries):
        num_pos = sum(1 for g in range(len(labels)) if is_gallery[g] and g != q and labels[g] == labels[q])
        if num_pos == 0:
            without += 1
            continue
        rel = [labels[g] == labels[q] for g in row if g >= 0]
        per_query.append(_naive_from_relevance(rel, num_pos, recall_ks, map_at_k))
    return _average(per_query, without, sum(bool(v) for v in is_gallery))


def naive_nmi(a, b) -> float:
    """2 I(A; B) / (H(A) + H(B)) from counts, in plain Python."""
    n = len(a)
    ca, cb, cab = Counter(a), Counter(b), Counter(zip(a, b))
    mi = sum(c / n * math.log(n * c / (ca[x] * cb[y])) for (x, y), c in cab.items())
    ha = -sum(c / n * math.log(c / n) for c in ca.values())
    hb = -sum(c / n * math.log(c / n) for c in cb.values())
    return 1.0 if ha + hb == 0 else 2 * mi / (ha + hb)


# ---------------------------------------------------------------------------- test data
def _well_separated(x: np.ndarray, tol: float = 1e-6) -> bool:
    """No two different cosine scores of a query closer than tol (exact duplicates tie).

    float32 scores of these small vectors are within ~1e-7 of the float64 ones.
    """
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = np.sort(x @ x.T, axis=1)
    gaps = np.diff(s, axis=1)
    return bool(((gaps == 0) | (gaps > tol)).all())


def make_split(n: int, dim: int, num_classes: int, seed: int, separate_gallery: bool) -> dict:
    """Clustered data with exact duplicates (ties), classes of size one, shuffled indices.

    The seed is advanced until no two distinct scores are within 1e-6 of each other, so that
    float32 and float64 rank alike except on exact ties (which both treat identically).
    """
    for _ in range(100):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        labels[:3] = torch.tensor([num_classes, num_classes + 1, num_classes + 2])  # classes of size one
        centers = torch.randn(num_classes + 3, dim, generator=g)
        emb = centers[labels] + 1.2 * torch.randn(n, dim, generator=g)
        src = torch.randint(0, n, (n // 6,), generator=g)
        dst = torch.randint(0, n, (n // 6,), generator=g)
        emb[dst] = emb[src].clone()  # exact duplicates, within and across classes
        emb[7] = emb[8].clone()
        labels[7] = labels[8]  # a duplicated positive pair
        if separate_gallery:
            is_query = torch.rand(n, generator=g) < 0.5
            is_gallery = ~is_query
            is_query[:3] = True  # the classes of size one are queries without positive
            is_gallery[:4] = True  # a few samples are both
        else:
            is_query = torch.ones(n, dtype=torch.bool)
            is_gallery = torch.ones(n, dtype=torch.bool)
        indices = torch.randperm(4 * n, generator=g)[:n]  # not row order, not contiguous
        if _well_separated(emb.numpy()):
            return {"embeddings": emb, "labels": labels, "is_query": is_query, "is_gallery": is_gallery, "indices": indices}
        seed += 1000
    raise RuntimeError("no well-separated sample found; use fewer samples or more dimensions")


def make_tied_split(n: int, num_classes: int, seed: int, separate_gallery: bool) -> dict:
    """Unit vectors with four entries of +-1/2 in 8 dimensions: every cosine is a multiple of
    1/4, exact in float32 and float64 alike, so ties are everywhere and ranks must agree."""
    g = torch.Generator().manual_seed(seed)

    def random_vectors(m: int) -> torch.Tensor:
        support = torch.rand(m, 8, generator=g).argsort(dim=1)[:, :4]  # (m, 4) distinct positions
        signs = torch.randint(0, 2, (m, 4), generator=g) * 2 - 1
        return torch.zeros(m, 8).scatter_(1, support, 0.5 * signs)

    labels = torch.randint(0, num_classes, (n,), generator=g)
    prototypes = random_vectors(num_classes)
    emb = torch.where(torch.rand(n, 1, generator=g) < 0.5, prototypes[labels], random_vectors(n))
    is_query = torch.ones(n, dtype=torch.bool)
    is_gallery = torch.ones(n, dtype=torch.bool)
    if separate_gallery:
        is_query = torch.rand(n, generator=g) < 0.4
        is_gallery = ~is_query | (torch.rand(n, generator=g) < 0.2)
    indices = torch.randperm(3 * n, generator=g)[:n]
    return {"embeddings": emb, "labels": labels, "is_query": is_query, "is_gallery": is_gallery, "indices": indices}


def _naive(split: dict, recall_ks, map_at_k) -> dict[str, float]:
    return naive_metrics(
        split["embeddings"].numpy(), split["labels"].tolist(), split["is_query"].tolist(),
        split["is_gallery"].tolist(), split["indices"].tolist(), recall_ks, map_at_k,
    )


def assert_metrics_equal(got: dict, expected: dict, tol: float = 1e-12) -> None:
    for key, value in expected.items():
        assert key in got, key
        assert got[key] == pytest.approx(value, abs=tol), key


# ---------------------------------------------------------------------------- against naive loops
@pytest.mark.parametrize("separate_gallery", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference(seed: int, separate_gallery: bool) -> None:
    split = make_split(90 + 17 * seed, 5, 9, seed, separate_gallery)
    ks, map_at_k = (1, 2, 3, 7, 50), 6
    expected = _naive(split, ks, map_at_k)
    assert expected["queries_without_positive"] > 0  # the classes of size one
    for chunk, block in [(None, None), (1, 8), (13, 16)]:
        got = retrieval_metrics(**split, recall_ks=ks, map_at_k=map_at_k, chunk_size=chunk, block_size=block)
        assert_metrics_equal(got, expected)


@pytest.mark.parametrize("separate_gallery", [False, True])
def test_matches_naive_reference_with_ties_everywhere(separate_gallery: bool) -> None:
    split = make_tied_split(150, 12, 7, separate_gallery)
    ks, map_at_k = (1, 2, 5, 20), 10
    expected = _naive(split, ks, map_at_k)
    assert 0.0 < expected["R@1"] < 1.0 and 0.0 < expected["MAP@R"] < 1.0
    for chunk, block in [(None, None), (7, 8)]:
        got = retrieval_metrics(**split, recall_ks=ks, map_at_k=map_at_k, chunk_size=chunk, block_size=block)
        assert_metrics_equal(got, expected)


def test_pruning_of_deep_positives_matches_naive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small classes, shallow K: positives that provably rank >= cap are dropped exactly."""
    split = make_tied_split(300, 40, 11, separate_gallery=False)
    calls = []
    original = search_module._kept_prefix

    def spy(*args):
        kept = original(*args)
        calls.append(bool((kept < args[2]).any()))  # some positive was actually dropped
        return kept

    monkeypatch.setattr(search_module, "_kept_prefix", spy)
    ks, map_at_k = (1, 2, 4), 3
    got = retrieval_metrics(**split, recall_ks=ks, map_at_k=map_at_k, chunk_size=64, block_size=8)
    assert any(calls), "the pruning path was not exercised"
    assert_metrics_equal(got, _naive(split, ks, map_at_k))


@pytest.mark.parametrize("separate_gallery", [False, True])
def test_parallel_row_slices_match_naive(monkeypatch: pytest.MonkeyPatch, separate_gallery: bool) -> None:
    """On CPU a chunk's rows are searched in slices on several threads; the metrics stay exact.

    Three intra-op threads: chunks of ~600 queries go in three slices (two on the pool),
    chunks of 300 in two; the slices' ranks have different widths and are padded to a common
    one.
    """
    split = make_tied_split(1500 if separate_gallery else 600, 12, 5, separate_gallery)
    calls = []
    original = search_module._ranks_from_blocks

    def spy(scores, *args):
        calls.append((threading.current_thread().name, scores.shape[0], torch.get_num_threads()))
        return original(scores, *args)

    monkeypatch.setattr(search_module, "_ranks_from_blocks", spy)
    ks, map_at_k = (1, 2, 5, 20), 10
    expected = _naive(split, ks, map_at_k)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for chunk, parts in [(600, 3), (300, 2)]:
            calls.clear()
            got = retrieval_metrics(**split, recall_ks=ks, map_at_k=map_at_k, chunk_size=chunk)
            assert_metrics_equal(got, expected)
            q = int(split["is_query"].sum())
            assert sum(rows for _, rows, _ in calls) == q
            assert len(calls) >= parts and len({name for name, _, _ in calls}) == parts
            assert {n for _, _, n in calls} == {1}, "each slice must run on a single thread"
        assert torch.get_num_threads() == 3, "the caller's thread count must be restored"
    finally:
        torch.set_num_threads(threads)


def test_default_map_at_k_key_and_recall_beyond_gallery() -> None:
    split = make_split(60, 4, 5, 3, separate_gallery=False)
    got = retrieval_metrics(**split, recall_ks=(1, 1000))
    assert set(got) == {"R@1", "R@1000", "MAP@R", "R-Precision", "mAP@1000", "num_queries", "num_gallery",
                        "queries_without_positive"}
    assert got["R@1000"] == 1.0  # every query with a positive finds it somewhere
    assert_metrics_equal(got, _naive(split, (1, 1000), 1000))


# ---------------------------------------------------------------------------- tie policy
def _tie_case(positive_index: int, duplicate_index: int) -> dict:
    """A query, its positive and an exact duplicate of that positive from another class."""
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [-1.0, 0.0]])
    return {
        "embeddings": emb,
        "labels": torch.tensor([0, 0, 1, 0]),
        "is_query": torch.tensor([True, False, False, False]),
        "is_gallery": torch.tensor([False, True, True, True]),
        "indices": torch.tensor([10, positive_index, duplicate_index, 50]),
    }


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_ties_rank_the_lower_dataset_index_first(device: str) -> None:
    # the duplicate negative has the lower index: it ranks first, the positive second
    got = retrieval_metrics(**_tie_case(positive_index=30, duplicate_index=20), recall_ks=(1, 2), device=device)
    assert (got["R@1"], got["R@2"]) == (0.0, 1.0)
    assert got["MAP@R"] == pytest.approx(0.25)  # R = 2: hits at ranks 2 and 3 -> (1/2) / 2
    # swap the indices: the positive comes first
    got = retrieval_metrics(**_tie_case(positive_index=20, duplicate_index=30), recall_ks=(1, 2), device=device)
    assert (got["R@1"], got["R@2"]) == (1.0, 1.0)
    assert got["MAP@R"] == pytest.approx(0.5)


def test_all_duplicates_are_ordered_by_index_and_independent_of_chunking() -> None:
    """Every embedding identical: ranking is pure index order; chunking must not matter."""
    n = 37
    labels = torch.arange(n) % 3
    split = {"embeddings": torch.ones(n, 8), "labels": labels, "indices": torch.randperm(n) * 2}
    expected = naive_metrics(np.ones((n, 8)), labels.tolist(), [True] * n, [True] * n,
                             split["indices"].tolist(), (1, 2, 5), 4)
    for chunk in (1, 5, None):
        got = retrieval_metrics(**split, recall_ks=(1, 2, 5), map_at_k=4, chunk_size=chunk)
        assert_metrics_equal(got, expected)


# ---------------------------------------------------------------------------- edge cases and errors
def test_queries_without_positive_are_left_out_and_counted() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.2]])
    labels = torch.tensor([0, 0, 1, 1, 2])  # sample 4 has no positive
    got = retrieval_metrics(emb, labels, recall_ks=(1,))
    assert got["queries_without_positive"] == 1
    assert got["num_queries"] == 4
    assert got["R@1"] == 1.0 and got["MAP@R"] == 1.0


def test_single_class_gallery_is_perfect() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 4, generator=g)
    got = retrieval_metrics(emb, torch.zeros(12, dtype=torch.long), recall_ks=(1, 4), map_at_k=5)
    for key in ("R@1", "R@4", "MAP@R", "R-Precision", "mAP@5"):
        assert got[key] == pytest.approx(1.0)


def test_no_query_with_a_positive_is_an_error() -> None:
    with pytest.raises(ValueError, match="None of the 3 queries has a positive"):
        retrieval_metrics(torch.randn(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"embeddings": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}, ValueError, "split is empty"),
        ({"labels": torch.zeros(9, dtype=torch.long)}, ValueError, "labels has shape"),
        ({"is_query": torch.zeros(10, dtype=torch.bool)}, ValueError, "No sample is flagged as a query"),
        ({"is_gallery": torch.zeros(10, dtype=torch.bool)}, ValueError, "No sample is flagged as a gallery"),
        ({"is_query": torch.ones(10)}, TypeError, "is_query must be a bool"),
        ({"indices": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 8])}, ValueError, "indices are not unique"),
        ({"embeddings": torch.randn(10)}, ValueError, "2-D"),
        ({"recall_ks": (0, 1)}, ValueError, "recall_ks must be positive"),
        ({"chunk_size": -1}, ValueError, "chunk_size"),
        ({"block_size": 12}, ValueError, "power of two"),
    ],
)
def test_bad_input_gives_a_clear_error(kwargs: dict, error: type, match: str) -> None:
    base = {"embeddings": torch.randn(10, 4), "labels": torch.arange(10) % 2}
    with pytest.raises(error, match=match):
        retrieval_metrics(**{**base, **kwargs})


def test_nan_embeddings_name_the_row() -> None:
    emb = torch.randn(6, 3)
    emb[4, 1] = float("nan")
    with pytest.raises(ValueError, match="first at row 4"):
        retrieval_metrics(emb, torch.arange(6) % 2)


# ---------------------------------------------------------------------------- pytorch-metric-learning
@pytest.mark.parametrize("separate_gallery", [False, True])
def test_agrees_with_pytorch_metric_learning(separate_gallery: bool) -> None:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    g = torch.Generator().manual_seed(5)
    n = 300
    labels = torch.randint(0, 25, (n,), generator=g)
    emb = torch.randn(25, 16, generator=g)[labels] + 0.8 * torch.randn(n, 16, generator=g)
    emb = torch.nn.functional.normalize(emb, dim=1)
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count",
        device=torch.device("cpu"),
    )
    if separate_gallery:
        is_query = torch.arange(n) < 100
        pml = calc.get_accuracy(emb[:100], labels[:100], emb[100:], labels[100:], ref_includes_query=False)
        ours = retrieval_metrics(emb, labels, is_query=is_query, is_gallery=~is_query, recall_ks=(1,))
    else:
        pml = calc.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)
        ours = retrieval_metrics(emb, labels, recall_ks=(1,))
    assert ours["R@1"] == pytest.approx(pml["precision_at_1"], abs=1e-9)
    assert ours["R-Precision"] == pytest.approx(pml["r_precision"], abs=1e-9)
    assert ours["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-9)


# ---------------------------------------------------------------------------- ranked lists
def test_ranked_lists_match_naive_reference_and_full_ranking() -> None:
    split = make_split(70, 4, 6, 4, separate_gallery=True)
    order = torch.argsort(split["indices"])
    emb, labels = split["embeddings"][order], split["labels"][order]
    isq, isg = split["is_query"][order], split["is_gallery"][order]
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    full = []
    for q in isq.nonzero().flatten().tolist():  # full ranking with the tie rule, by hand
        gal = [j for j in isg.nonzero().flatten().tolist() if j != q]
        full.append(sorted(gal, key=lambda j: (-float(x[q] @ x[j]), j)))
    width = max(len(r) for r in full)
    lists = torch.tensor([r + [-1] * (width - len(r)) for r in full])
    ks = (1, 3, 10)
    complete = ranked_list_metrics(RankedLists(lists), labels, isq, isg, recall_ks=ks, map_at_k=8)
    assert_metrics_equal(complete, retrieval_metrics(emb, labels, isq, isg, recall_ks=ks, map_at_k=8))
    truncated = RankedLists(lists[:, :3])  # positives beyond k = 3 count as misses
    got = ranked_list_metrics(truncated, labels, isq, isg, recall_ks=ks, map_at_k=8)
    expected = naive_list_metrics(lists[:, :3].tolist(), labels.tolist(), isq.tolist(), isg.tolist(), ks, 8)
    assert_metrics_equal(got, expected)
    assert got["R@10"] == got["R@3"] < complete["R@10"]


@pytest.mark.parametrize(
    ("lists", "match"),
    [
        ([[1, 2], [0, 2]], "one row per query"),
        ([[1, 2], [0, 2], [0, 9]], r"positions in \[0, 4\)"),
        ([[1, 1], [0, 2], [0, 1]], "twice"),
        ([[0, 1], [0, 2], [0, 1]], "the query itself"),
        ([[1, 3], [0, 2], [0, 1]], "not in the gallery"),
    ],
)
def test_bad_ranked_lists_give_a_clear_error(lists: list, match: str) -> None:
    labels = torch.tensor([0, 0, 1, 1])
    isq = torch.tensor([True, True, True, False])
    isg = torch.tensor([True, True, True, False])
    with pytest.raises(ValueError, match=match):
        ranked_list_metrics(RankedLists(torch.tensor(lists)), labels, isq, isg)


# ---------------------------------------------------------------------------- NMI
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_from_assignments_matches_naive(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, 200)
    b = np.where(rng.random(200) < 0.6, a, rng.integers(0, 7, 200)) + 100  # label values need not be 0..k
    assert nmi_from_assignments(a, b) == pytest.approx(naive_nmi(a.tolist(), b.tolist()), abs=1e-12)
    assert nmi_from_assignments(a, a + 3) == pytest.approx(1.0)
    assert nmi_from_assignments(np.zeros(5), np.zeros(5)) == 1.0


def test_nmi_of_kmeans_is_one_on_separated_clusters_and_low_on_noise() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 6
    centers = torch.eye(6, 12) * 10
    tight = centers[labels] + 0.01 * torch.randn(300, 12, generator=g)
    assert nmi(tight, labels) == pytest.approx(1.0)
    noise = torch.randn(300, 12, generator=g)
    value = nmi(noise, labels, seed=3)
    assert 0.0 <= value < 0.15
    assert nmi(noise, labels, seed=3) == value  # a fixed seed reproduces the value
