"""benchmark.nn.neighbours: both backends against a naive float64 loop (ties by the lower row)."""

from __future__ import annotations

import pytest
import torch

from benchmark.nn.neighbours import ExactIndex, drop_self, exact_knn, faiss_available, self_rows

BACKENDS = ["torch", "faiss"] if faiss_available() else ["torch"]


def naive(queries, database, k, query_ids=None, database_ids=None):
    """Row by row in float64: sort the database by (score descending, row ascending), skip the query's own id."""
    q, db = queries.double(), database.double()
    ids = list(range(len(db))) if database_ids is None else database_ids.tolist()
    out = []
    for i in range(len(q)):
        scores = [float(q[i] @ db[j]) for j in range(len(db))]
        order = sorted(range(len(db)), key=lambda j: (-scores[j], j))
        if query_ids is not None:
            order = [j for j in order if ids[j] != int(query_ids[i])]
        out.append(order[:k])
    return torch.tensor(out, dtype=torch.long).view(len(q), k)


def integer_rows(n, d, seed, high=3):
    """Small-integer features: exact float32 products, so many exact ties."""
    return torch.randint(0, high, (n, d), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("q", "m", "k"), [(13, 40, 5), (30, 700, 9), (25, 1500, 40)])
def test_matches_the_naive_loop_with_ties(backend: str, q: int, m: int, k: int) -> None:
    # The larger databases group columns into blocks and super-blocks (the pruned path).
    queries, database = integer_rows(q, 4, q), integer_rows(m, 4, m)
    for chunk in (None, 4):  # 4 queries per product: several chunks
        rows, scores = exact_knn(queries, database, k, backend=backend, chunk_size=chunk)
        assert torch.equal(rows, naive(queries, database, k)), chunk
        torch.testing.assert_close(scores, (queries @ database.T).gather(1, rows))


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_features_and_float64(backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    queries, database = torch.randn(20, 6, generator=g), torch.randn(900, 6, generator=g)
    rows, _ = exact_knn(queries, database, 12, backend=backend, chunk_size=7)
    assert torch.equal(rows, naive(queries, database, 12))
    rows64, scores64 = exact_knn(queries.double(), database.double(), 12, chunk_size=7)
    assert scores64.dtype == torch.float64 and torch.equal(rows64, naive(queries, database, 12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_exclusion_by_dataset_index_with_duplicate_rows(backend: str) -> None:
    x = integer_rows(60, 3, 7)
    x[10:13] = 3.0  # three equal rows, each other's best (largest) scores: ties
    ids = torch.randperm(60, generator=torch.Generator().manual_seed(3)) + 100  # dataset indices, not positions
    queries = x[[10, 11, 12, 30]]
    query_ids = ids[[10, 11, 12, 30]]
    for chunk in (None, 2):
        rows, _ = exact_knn(queries, x, 5, query_ids=query_ids, database_ids=ids, backend=backend, chunk_size=chunk)
        assert not (ids[rows] == query_ids[:, None]).any()
        assert torch.equal(rows, naive(queries, x, 5, query_ids, ids))
        assert rows[0, :2].tolist() == [11, 12] and rows[1, :2].tolist() == [10, 12]  # the duplicates, lower row first
    # A query whose id is not in the database loses nothing.
    rows, _ = exact_knn(queries, x, 5, query_ids=torch.tensor([1, 2, 3, 4]), database_ids=ids, backend=backend)
    assert torch.equal(rows, naive(queries, x, 5))


def test_ties_go_to_the_lower_row() -> None:
    database = torch.ones(50, 2)  # every score ties
    for backend in BACKENDS:
        rows, _ = exact_knn(torch.ones(3, 2), database, 4, backend=backend)
        assert rows.tolist() == [[0, 1, 2, 3]] * 3, backend
        rows, _ = exact_knn(torch.ones(3, 2), database, 4, query_ids=torch.tensor([0, 2, 9]), backend=backend)
        assert rows.tolist() == [[1, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 3]], backend


def test_index_is_reusable_and_checks_its_input() -> None:
    database = integer_rows(30, 4, 5)
    index = ExactIndex(database, torch.arange(30) * 2)
    queries = integer_rows(6, 4, 6)
    for _ in range(2):
        rows, _ = index.search(queries, 3, query_ids=torch.arange(6) * 2)
        assert torch.equal(rows, naive(queries, database, 3, torch.arange(6) * 2, torch.arange(30) * 2))
    with pytest.raises(ValueError, match="Cannot find 30 neighbours"):
        index.search(queries, 30, query_ids=torch.arange(6))
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(queries.clone().fill_(float("nan")), 3)
    with pytest.raises(ValueError, match="Unknown neighbour search backend"):
        ExactIndex(database, backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        exact_knn(queries, database, 3, query_ids=torch.arange(6), database_ids=torch.zeros(30, dtype=torch.long))
    assert exact_knn(queries, database, 0)[0].shape == (6, 0)


def test_helpers() -> None:
    assert self_rows(torch.tensor([5, 7, 9]), torch.tensor([9, 5, 6])).tolist() == [1, -1, 0]
    neighbours = torch.tensor([[3, 1, 2], [4, 0, 5], [6, 7, 8]])
    assert drop_self(neighbours, torch.tensor([3, 0, -1]), 2).tolist() == [[1, 2], [4, 5], [6, 7]]
