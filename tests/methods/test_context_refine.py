"""Context-Refine CA: the blocks against a float64 reference of Eq. 2-3, the set paths, the
neighbour search, the embedding cache, the ablations, and a refinement that helps where
neighbourhoods carry information."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from benchmark.engine.evaluation import RetrievalEvaluator, retrieval_metrics
from benchmark.engine.evaluation.metrics import nmi
from benchmark.nn import fused
from benchmark.nn.backbones import BackboneConfig
from benchmark.nn.embedding_cache import EmbeddingCache, embedding_cache_key
from benchmark.nn.knn_context import knn_search
from datamodules.cub import CUB200
from methods import context_refine
from methods.baselines import MultiSimilarity
from methods.context_refine import (
    ContextAttentionBlock as CrossAttentionBlock,
)
from methods.context_refine import (
    ContextRefine,
    ContextRefiner,
    InferenceConfig,
    RefinerConfig,
)
from tests.datamodules.fixtures import make_cub

TINY = BackboneConfig("resnet_tiny_test", pretrained=False)


def plain_model(dim: int = 16, **kwargs) -> ContextRefine:
    """A Context-Refine whose refiner works on ``dim``-d embeddings (backbone unused)."""
    return ContextRefine(backbone=TINY, embedding_dim=dim, image_size=16, **kwargs)


def unit_rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1).to(dtype)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- Eq. 2-3 reference
def _silu(z: torch.Tensor) -> torch.Tensor:
    return z / (1.0 + torch.exp(-z))


def _mlp(x: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor:
    """Linear -> SiLU -> Linear of one vector, written out."""
    w1, b1, w2, b2 = (
        t.detach().double() for t in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    )
    hidden = torch.stack([_silu(w1[j] @ x + b1[j]) for j in range(w1.shape[0])])
    return torch.stack([w2[i] @ hidden + b2[i] for i in range(w2.shape[0])])


def reference_block(block: CrossAttentionBlock, e: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """e^1 = normalize(e + CA(e, C, C)), one sample and one neighbour at a time, float64."""
    out = []
    d = e.shape[1]
    heads = block.num_heads
    dh = d // heads
    for b in range(e.shape[0]):
        q = e[b] + _mlp(e[b], block.query)  # skip connection around the query projection
        keys = [_mlp(c, block.key) for c in context[b]]
        values = [_mlp(c, block.value) for c in context[b]]
        update = torch.zeros(d, dtype=torch.float64)
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            logits = torch.stack([q[sl] @ k[sl] / math.sqrt(dh) for k in keys])
            weights = torch.exp(logits - logits.max())
            weights = weights / weights.sum()
            for w, v in zip(weights, values):
                update[sl] += w * v[sl]
        x = e[b] + update
        out.append(x / torch.sqrt((x * x).sum()))
    return torch.stack(out)


@pytest.mark.parametrize("heads", [1, 2])
def test_one_block_matches_float64_reference(heads: int) -> None:
    torch.manual_seed(0)
    refiner = ContextRefiner(dim=6, num_blocks=1, hidden_dim=5, num_heads=heads).double()
    e, context = unit_rows(3, 6, 1, torch.float64), unit_rows(12, 6, 2, torch.float64).view(3, 4, 6)
    levels, out = refiner(e, context)
    expected = reference_block(refiner.blocks[0], e, context)
    torch.testing.assert_close(levels[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_blocks_chain_and_output_layer_match_reference() -> None:
    torch.manual_seed(1)
    refiner = ContextRefiner(dim=6, num_blocks=3, hidden_dim=4, output_dim=3).double()
    e, context = unit_rows(2, 6, 3, torch.float64), unit_rows(10, 6, 4, torch.float64).view(2, 5, 6)
    levels, out = refiner(e, context)
    expected = e
    for block, level in zip(refiner.blocks, levels):
        expected = reference_block(block, expected, context)  # the context stays e0 (Eq. 3)
        torch.testing.assert_close(level, expected, rtol=1e-12, atol=1e-12)
    w, b = refiner.output.weight.detach(), refiner.output.bias.detach()
    projected = expected @ w.T + b
    torch.testing.assert_close(out, projected / projected.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-12)


def eq4_multi_similarity(
    e: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 40.0, lam: float = 0.5
) -> float:
    """The paper's Eq. 4 on (b, D) output embeddings e^T, one anchor and one pair at a time.

    ``L = 1/b sum_q [ 1/alpha log(1 + sum_{k in P_q} exp(-alpha (s_qk - lambda)))
                    + 1/beta  log(1 + sum_{k in N_q} exp( beta  (s_qk - lambda))) ]``,
    ``s_qk = (e_q^T)^T e_k^T`` (the embeddings are unit vectors), P_q / N_q the other samples of
    q's class / of other classes, every pair used (Eq. 4 has no miner). The "1 +" inside the
    logs is the Multi-Similarity loss the paper says it uses (supplement: "the Multi-Similarity
    loss ... in Eq. 4"; Wang et al. 2019); the extracted main text prints the logs without it,
    which would make the loss -inf for an anchor without positives.
    """
    b = e.shape[0]
    total = 0.0
    for q in range(b):
        pos = [k for k in range(b) if k != q and labels[k] == labels[q]]
        neg = [k for k in range(b) if labels[k] != labels[q]]
        sim = {k: float(sum(float(e[q, j]) * float(e[k, j]) for j in range(e.shape[1]))) for k in pos + neg}
        total += math.log(1.0 + sum(math.exp(-alpha * (sim[k] - lam)) for k in pos)) / alpha
        total += math.log(1.0 + sum(math.exp(beta * (sim[k] - lam)) for k in neg)) / beta
    return total / b


@pytest.mark.usefixtures("one_thread")
def test_training_loss_is_eq4_on_the_refined_embeddings() -> None:
    """``training_loss`` = Eq. 4 (by hand, float64) on e^T refined from the k nearest bank rows by hand.

    A tiny batch of 7 from a 20-row training bank: 3 classes of 2 and one sample without a
    positive (its positive term is log(1) = 0 and it still counts in the 1/b average). The
    contexts are the 3 most similar *other* bank rows (brute force), e^T comes from the
    float64 block reference (Eq. 2-3), and the loss from the equation: a wrong sign, a wrong
    lambda / alpha / beta, a per-positive-pair average or a loss on e^0 all fail.
    """
    torch.manual_seed(4)
    model = plain_model(dim=6, refiner=RefinerConfig(num_blocks=2, hidden_dim=5, num_neighbours=3))
    bank = unit_rows(20, 6, 21)  # (M, D) training-split e0
    model.set_training_bank(bank)
    index = torch.tensor([3, 11, 0, 7, 15, 19, 8])  # (b,) dataset indices of the batch
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # class 3 has a single sample: no positive
    loss = model.training_loss({"index": index, "label": labels})["loss"].detach()

    bank64 = bank.double()
    sims = bank64 @ bank64.T  # (M, M)
    sims.fill_diagonal_(-math.inf)  # a sample is not its own neighbour
    neighbours = sims.topk(3, dim=1).indices  # (M, 3)
    e = bank64[index]  # (b, D) e^0
    context = bank64[neighbours[index]]  # (b, 3, D): the context stays e^0 in every block
    for block in model.refiner.blocks:
        e = reference_block(block, e, context)
    expected = eq4_multi_similarity(e, labels)
    assert abs(float(loss) - expected) < 1e-5 * max(1.0, abs(expected))
    # The check can fail: Eq. 4 on the unrefined e^0 is a different number.
    assert abs(eq4_multi_similarity(bank64[index], labels) - expected) > 1e-3


def test_default_model_has_about_12m_parameters() -> None:
    # 8 blocks x (Q, K, V) x two 512 x 512 linear layers with bias = 12.6 M; the paper: "12M".
    refiner = ContextRefiner(dim=512)
    count = sum(p.numel() for p in refiner.parameters())
    assert count == 8 * 3 * 2 * (512 * 512 + 512) == 12_607_488
    assert abs(count - 12e6) / 12e6 < 0.06
    model = plain_model(dim=512)
    assert model.num_refiner_parameters() == count
    assert model.describe()["refiner_parameters"] == count
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count  # the stage-1 model (backbone + head) is frozen


# ---------------------------------------------------------------------------- set paths, order
@pytest.mark.parametrize("fused_cpu_linear", [True, False], ids=["onednn-fused", "plain-ops"])
def test_set_paths_equal_the_batch_path(monkeypatch: pytest.MonkeyPatch, fused_cpu_linear: bool) -> None:
    """Also on a CPU without oneDNN's fused linear (``plain-ops``): the fallback gives the same numbers."""
    monkeypatch.setattr(context_refine, "CPU_CHUNK", 16)  # several chunks on the CPU path
    monkeypatch.setattr(fused, "FUSED_LINEAR", fused_cpu_linear and fused.FUSED_LINEAR)
    torch.manual_seed(2)
    refiner = ContextRefiner(dim=16, num_blocks=3, hidden_dim=24, output_dim=8).eval()
    bank, e0 = unit_rows(60, 16, 5), unit_rows(40, 16, 6)
    neighbours = knn_search(e0, bank, 5)  # (40, 5)
    with torch.no_grad():
        levels, out = refiner(e0, bank[neighbours])
    for fast in (True, False):
        set_levels, set_out = refiner.refine_set(e0, bank, neighbours, fast=fast, chunk_size=7)
        for a, b in zip(levels + [out], set_levels + [set_out]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # bfloat16 products: the same embeddings up to bf16 rounding
    _, bf16 = refiner.refine_set(e0, bank, neighbours, dtype=torch.bfloat16)
    assert (bf16 * out).sum(dim=1).min() > 0.999
    # with the sample itself in its context (gather path)
    with torch.no_grad():
        _, out_self = refiner(e0, torch.cat([e0[:, None], bank[neighbours]], dim=1))
    _, set_self = refiner.refine_set(e0, bank, neighbours, self_context=True)
    torch.testing.assert_close(out_self, set_self, rtol=1e-5, atol=1e-6)


def test_output_is_invariant_to_the_order_of_the_neighbours() -> None:
    torch.manual_seed(3)
    refiner = ContextRefiner(dim=12, num_blocks=2, num_heads=2).eval()
    bank, e0 = unit_rows(50, 12, 7), unit_rows(20, 12, 8)
    neighbours = knn_search(e0, bank, 6)
    shuffled = neighbours.gather(
        1, torch.rand(20, 6, generator=torch.Generator().manual_seed(9)).argsort(dim=1)
    )
    assert not torch.equal(shuffled, neighbours)
    with torch.no_grad():
        _, a = refiner(e0, bank[neighbours])
        _, b = refiner(e0, bank[shuffled])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    single = ContextRefiner(dim=12, num_blocks=2).eval()
    for fast in (True, False):
        torch.testing.assert_close(
            single.refine_set(e0, bank, neighbours, fast=fast)[1],
            single.refine_set(e0, bank, shuffled, fast=fast)[1],
            rtol=1e-5,
            atol=1e-6,
        )


# ---------------------------------------------------------------------------- neighbours
def test_knn_excludes_the_query_by_index_even_with_duplicates() -> None:
    x = unit_rows(30, 8, 10)
    x[5] = x[4]  # an exact duplicate: rows 4 and 5 tie for the first place of each other
    rows = torch.arange(30)
    for backend in ("torch", "faiss"):
        found = knn_search(x, x, 3, exclude=rows, backend=backend)
        assert not (found == rows[:, None]).any(), backend
        assert found[4, 0] == 5 and found[5, 0] == 4, backend
        # ties (rows 4 and 5 are equal) go to the lower row, as in the evaluation: a stable sort
        brute = (x @ x.T).fill_diagonal_(-2).argsort(dim=1, descending=True, stable=True)[:, :3]
        assert torch.equal(found.sort(1).values, brute.sort(1).values), backend
    with pytest.raises(ValueError, match="Cannot find 30 neighbours"):
        knn_search(x, x, 30, exclude=rows)


def test_refine_takes_context_from_the_gallery_only_and_never_the_sample_itself() -> None:
    # Mean aggregation is parameter-free: its output is checked against a brute-force mean.
    model = plain_model(dim=8, refiner=RefinerConfig(aggregation="mean", num_neighbours=3))
    e0 = unit_rows(25, 8, 11)
    is_gallery = torch.arange(25) % 3 != 0  # In-Shop style: some samples are queries only
    is_query = ~is_gallery | (torch.arange(25) % 2 == 0)
    out = model.refine(e0, is_query, is_gallery)[""]
    sims = (e0 @ e0.T).double()
    sims[:, ~is_gallery] = -math.inf
    sims.fill_diagonal_(-math.inf)
    nn = sims.topk(3, dim=1).indices
    expected = F.normalize((e0 + e0[nn].sum(dim=1)) / 4, dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_refine_returns_output_and_every_level() -> None:
    model = plain_model(dim=8, refiner=RefinerConfig(num_blocks=3, num_neighbours=4, output_dim=5))
    e0 = unit_rows(30, 8, 12)
    flags = torch.ones(30, dtype=torch.bool)
    out = model.refine(e0, flags, flags)
    assert sorted(out) == ["", "level1", "level2", "level3"]
    assert out[""].shape == (30, 5) and out["level3"].shape == (30, 8)
    for value in out.values():
        torch.testing.assert_close(value.norm(dim=1), torch.ones(30))
    assert sorted(plain_model(dim=8, inference=InferenceConfig(report_levels=False)).refine(e0, flags, flags)) == [""]


def test_ca_without_neighbours_attends_to_itself() -> None:
    with pytest.raises(ValueError, match="include_self true"):
        plain_model(refiner=RefinerConfig(num_neighbours=0))
    model = plain_model(dim=8, refiner=RefinerConfig(num_blocks=1, num_neighbours=0, include_self=True))
    e0 = unit_rows(10, 8, 13)
    flags = torch.ones(10, dtype=torch.bool)
    out = model.refine(e0, flags, flags)[""]
    block = model.refiner.blocks[0]
    with torch.no_grad():
        expected = F.normalize(e0 + block.value(e0), dim=-1)  # softmax over one element is 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- embedding cache
def test_cache_round_trip_and_stale_entries_are_rejected(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    emb = unit_rows(7, 4, 14)
    cache.save("abc", emb, {"split": "train"})
    torch.testing.assert_close(cache.load("abc", rows=7, dim=4), emb)
    with pytest.warns(UserWarning, match="stale or mismatched"):
        assert cache.load("abc", rows=8) is None  # another split size
    with pytest.warns(UserWarning, match="stale or mismatched"):
        assert cache.load("abc", rows=7, dim=5) is None
    os.replace(cache.path("abc"), cache.path("xyz"))  # a file under a key it was not written for
    with pytest.warns(UserWarning, match="another key"):
        assert cache.load("xyz", rows=7) is None
    cache.path("bad").write_bytes(cache.path("xyz").read_bytes()[:50])  # truncated by someone else
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.load("bad", rows=7) is None


def test_interrupted_cache_write_leaves_no_usable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = EmbeddingCache(tmp_path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # writes half a file, then the process "dies"
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.save("key", unit_rows(5, 4, 15))
    monkeypatch.setattr(torch, "save", real_save)
    assert not cache.path("key").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed too
    (tmp_path / ".key.pt.123.deadbeef.tmp").write_bytes(b"left by a killed process")
    assert cache.load("key", rows=5) is None  # a leftover temporary file is never read


def test_cache_key_changes_with_what_the_embeddings_depend_on() -> None:
    base = dict(
        source={"checkpoint": {"path": "/a.ckpt", "size": 1, "mtime_ns": 2}},
        dataset="cub",
        root="/d",
        paths=["x.jpg", "y.jpg"],
        transform="Resize(256) CenterCrop(224)",
        precision="32-true",
    )
    key = embedding_cache_key(**base)
    assert key == embedding_cache_key(**base)
    for field, value in [
        ("source", {"checkpoint": {"path": "/a.ckpt", "size": 1, "mtime_ns": 3}}),
        ("paths", ["x.jpg", "z.jpg"]),
        ("paths", ["y.jpg", "x.jpg"]),
        ("transform", "Resize(292) CenterCrop(256)"),
        ("precision", "bf16-mixed"),
    ]:
        assert embedding_cache_key(**{**base, field: value}) != key, field


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=2).parent


def cub(root: Path, **kwargs) -> CUB200:
    dm = CUB200(root=str(root), image_size=16, num_workers=0, eval_batch_size=64, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fixture's sizes differ from the real CUB
        dm.setup("fit")
    return dm


def write_source_checkpoint(path: Path, seed: int) -> MultiSimilarity:
    """A stage-1 ``ms`` checkpoint as Lightning writes it (hyper-parameters, weights, name)."""
    torch.manual_seed(seed)
    model = MultiSimilarity(backbone=TINY, embedding_dim=8, image_size=16)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "method_name": "ms",
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return model


def test_cache_is_reused_and_invalidated_by_checkpoint_or_transform(
    cub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    ckpt = tmp_path / "ms.ckpt"
    source = write_source_checkpoint(ckpt, seed=0)
    model = ContextRefine(source=str(ckpt), inference=InferenceConfig(cache_dir=str(tmp_path / "cache")), image_size=16)
    images = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(model.embed(images), source.eval().embed(images))  # e0 = the source's
    calls = []
    real = ContextRefine.embed_loader

    def counting(self, loader, desc="embedding"):
        calls.append(desc)
        return real(self, loader, desc)

    monkeypatch.setattr(ContextRefine, "embed_loader", counting)
    dm = cub(cub_root)
    first = model.split_embeddings(dm, "train")
    assert first.shape == (len(dm.train_records), 8) and calls == ["source_train"]
    again = ContextRefine(source=str(ckpt), inference=InferenceConfig(cache_dir=str(tmp_path / "cache")), image_size=16)
    torch.testing.assert_close(again.split_embeddings(dm, "train"), first)
    assert len(calls) == 1  # read from the cache, not re-embedded
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1

    # another evaluation transform: another key, embedded again
    assert model.split_embeddings(cub(cub_root, eval_crop_pct=0.5), "train").shape == first.shape
    assert len(calls) == 2

    # a retrained (rewritten) checkpoint: its file identity changes, so does the key
    write_source_checkpoint(ckpt, seed=1)
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = ContextRefine(source=str(ckpt), inference=InferenceConfig(cache_dir=str(tmp_path / "cache")), image_size=16)
    assert not torch.allclose(changed.split_embeddings(dm, "train"), first)
    assert len(calls) == 3

    # a file at the right key holding something else is detected, not reused
    key = changed.cache_key(dm, "train")
    EmbeddingCache(tmp_path / "cache").save(key, torch.zeros(3, 8))
    fresh = ContextRefine(source=str(ckpt), inference=InferenceConfig(cache_dir=str(tmp_path / "cache")), image_size=16)
    with pytest.warns(UserWarning, match="stale or mismatched"):
        fresh.split_embeddings(dm, "train")
    assert len(calls) == 4


# ---------------------------------------------------------------------------- training helps
def clustered(num_classes: int, per_class: int, dim: int, noise: float, gen: torch.Generator):
    """Unit vectors around random class centres: a sample's neighbours mostly share its class."""
    centres = F.normalize(torch.randn(num_classes, dim, generator=gen), dim=-1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=gen) / math.sqrt(dim)
    return F.normalize(x, dim=-1), labels


def test_refinement_beats_initial_recall_where_neighbourhoods_carry_information(one_thread: None) -> None:
    gen = torch.Generator().manual_seed(0)
    classes, per_class, dim = 500, 10, 64
    train, train_labels = clustered(classes, per_class, dim, 1.5, gen)
    test, test_labels = clustered(classes, per_class, dim, 1.5, gen)  # other, unseen classes
    torch.manual_seed(0)
    model = plain_model(dim=dim, refiner=RefinerConfig(num_blocks=2))
    model.set_training_bank(train)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(300):  # batches of 64 classes x 2 samples, as in the paper
        chosen = torch.randperm(classes, generator=gen)[:64]
        within = torch.rand(64, per_class, generator=gen).argsort(dim=1)[:, :2]
        index = (chosen[:, None] * per_class + within).reshape(-1)
        loss = model.training_loss({"index": index, "label": train_labels[index]})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flags = torch.ones(len(test), dtype=torch.bool)
    initial = retrieval_metrics(test, test_labels)["R@1"]
    refined = retrieval_metrics(model.refine(test, flags, flags)[""], test_labels)["R@1"]
    print(f"synthetic clustered embeddings: R@1 {initial:.4f} -> {refined:.4f}")
    assert 0.45 < initial < 0.65
    assert refined > initial + 0.01


# ---------------------------------------------------------------------------- end to end
class EvaluationSpy:
    """Records every :meth:`ContextRefine.refine` call and every evaluator input during a CLI run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.refine_calls: list[tuple[ContextRefine, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        self.evaluated: list[dict[str, torch.Tensor]] = []
        real_refine, real_metrics = ContextRefine.refine, RetrievalEvaluator.compute_metrics

        def refine(model: ContextRefine, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor):
            out = real_refine(model, embeddings, is_query, is_gallery)
            self.refine_calls.append(
                (model, embeddings.clone(), torch.as_tensor(is_gallery).clone(), {k: v.clone() for k, v in out.items()})
            )
            return out

        def compute_metrics(evaluator: RetrievalEvaluator, data: dict[str, torch.Tensor], *args: Any, **kwargs: Any):
            self.evaluated.append({k: v.clone() for k, v in data.items()})
            return real_metrics(evaluator, data, *args, **kwargs)

        monkeypatch.setattr(ContextRefine, "refine", refine)
        monkeypatch.setattr(RetrievalEvaluator, "compute_metrics", compute_metrics)


def expected_metrics(emb: torch.Tensor, data: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, float]:
    """``retrieval_metrics`` (+ NMI with seed 0 when the record has it) of ``emb`` on the evaluated split."""
    out = retrieval_metrics(
        emb, data["labels"], data["is_query"], data["is_gallery"], recall_ks=record["recall_ks"],
        map_at_k=record["map_at_k"], device="cpu",
    )
    if record["nmi"]:
        out["NMI"] = nmi(emb, data["labels"], seed=0)
    return out


def check_reported_test_metrics(spy: EvaluationSpy, record: dict[str, Any], num_blocks: int, k: int) -> None:
    """The numbers of ``metrics_test.json`` against the recorded test evaluation, recomputed by hand.

    * the refined output and every level equal the refiner's batch path on contexts found by
      brute force (the k most similar *other* gallery samples of the evaluated e0): the fit's
      evaluation uses the CPU sparse set path and the exact neighbour search, this recomputes
      both another way;
    * the plain metrics are ``retrieval_metrics`` (+ NMI) of e0, the refined ones (output and
      each level) those of the recorded refined embeddings.
    """
    model, e0_in, is_gallery, out = spy.refine_calls[-1]  # the test evaluation comes last
    data = spy.evaluated[-1]
    assert torch.equal(data["embeddings"], e0_in)
    assert sorted(out) == ["", *[f"level{t}" for t in range(1, num_blocks + 1)]]
    e0 = F.normalize(e0_in.float(), dim=-1)  # (N, D)
    gallery = is_gallery.nonzero().flatten()  # (G,)
    sims = e0.double() @ e0[gallery].double().T  # (N, G)
    sims[gallery, torch.arange(len(gallery))] = -math.inf  # never the sample itself
    neighbours = sims.topk(k, dim=1).indices  # (N, k) rows of the gallery bank
    with torch.no_grad():
        levels, final = model.refiner.eval()(e0, e0[gallery][neighbours])  # batch path, (N, k, D) contexts
    torch.testing.assert_close(out[""], final, rtol=1e-4, atol=1e-5)
    for t, level in enumerate(levels, start=1):
        torch.testing.assert_close(out[f"level{t}"], level, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(final, e0, atol=1e-3)  # the refiner moved the embeddings
    tol = dict(rel=1e-9, abs=1e-12)
    assert record["metrics"] == pytest.approx(expected_metrics(e0_in, data, record), **tol)
    assert record["refined"]["refined"] == pytest.approx(expected_metrics(out[""], data, record), **tol)
    for t in range(1, num_blocks + 1):
        reported = record["refined"][f"refined/level{t}"]
        assert reported == pytest.approx(expected_metrics(out[f"level{t}"], data, record), **tol)


def test_fit_reports_initial_refined_and_every_level(
    cub_root: Path, tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CLI fit on the CUB fixture: every reported number is recomputed from the recorded test evaluation."""
    from benchmark.app.cli import main

    ckpt = tmp_path / "ms.ckpt"
    write_source_checkpoint(ckpt, seed=0)
    run = tmp_path / "run"
    # fmt: off
    args = [
        "fit", "--method", "context_refine", "--data", "cub", "--data.root", str(cub_root), "--recipe", "none",
        "--model.source", str(ckpt), "--model.refiner.num_blocks", "2", "--model.refiner.num_neighbours", "3",
        "--model.inference.cache_dir", str(tmp_path / "cache"), "--data.image_size", "16", "--data.classes_per_batch", "8",
        "--data.samples_per_class", "2", "--data.batches_per_epoch", "2", "--data.num_workers", "0",
        "--data.eval_batch_size", "128", "--trainer.max_epochs", "1", "--logger", "none", "--run_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
    ]
    # fmt: on
    spy = EvaluationSpy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    test = json.loads((run / "metrics_test.json").read_text())
    check_reported_test_metrics(spy, test, num_blocks=2, k=3)
    assert test["refiner_parameters"] > 0 and test["source"] == str(ckpt)
    val = json.loads((run / "metrics_val.json").read_text())
    assert val["evaluations"][0]["metrics"]["R@1"] == test["metrics"]["R@1"]  # e0 is frozen


@pytest.mark.slow
def test_embedded_default_two_stage_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short ``ms`` training on the embedded synthetic default, then Context-Refine on it.

    Numbers, not key names: stage 2's e0 equals stage 1's own test embeddings (the spy records
    both evaluations in this process) and its metrics; every refined number reported by
    stage 2 is recomputed from the recorded embeddings (:func:`check_reported_test_metrics`);
    the printed R@1-by-level line shows the reported values.
    """
    from benchmark.app.cli import main

    common = ["--logger", "none", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0",
              "--trainer.precision", "32-true"]
    # fmt: off
    stage1 = [
        "fit", "--method", "ms", "--backbone", "resnet_tiny_test", "--backbone.pretrained", "false",
        "--model.embedding_dim", "64", "--model.lr", "1e-3", "--data.batches_per_epoch", "10",
        "--trainer.max_epochs", "1", "--run_dir", str(tmp_path / "ms"), *common,
    ]
    stage2 = [
        "fit", "--method", "context_refine", "--model.source", str(tmp_path / "ms" / "checkpoints" / "last.ckpt"),
        "--model.inference.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "2", "--run_dir", str(tmp_path / "cr"),
        *common,
    ]
    # fmt: on
    spy = EvaluationSpy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(stage1) == 0
        stage1_test = spy.evaluated[-1]  # the ms model's own test embeddings
        assert main(stage2) == 0
    test = json.loads((tmp_path / "cr" / "metrics_test.json").read_text())
    ms_test = json.loads((tmp_path / "ms" / "metrics_test.json").read_text())
    e0 = spy.evaluated[-1]
    assert torch.equal(e0["labels"], stage1_test["labels"]) and len(e0["labels"]) == 3000
    torch.testing.assert_close(e0["embeddings"], F.normalize(stage1_test["embeddings"], dim=-1), rtol=1e-5, atol=1e-6)
    assert test["metrics"] == pytest.approx(ms_test["metrics"], abs=1e-6)  # e0 is the source's embedding
    check_reported_test_metrics(spy, test, num_blocks=8, k=8)
    printed = capsys.readouterr().out
    curve = [test["metrics"]["R@1"]] + [test["refined"][f"refined/level{t}"]["R@1"] for t in range(1, 9)]
    curve.append(test["refined"]["refined"]["R@1"])
    expected_line = "context_refine test R@1 by level: " + " | ".join(
        f"{name} {100 * value:.2f}" for name, value in zip([f"e{t}" for t in range(9)] + ["output"], curve)
    )
    assert expected_line in printed


def test_reference_names_tell_the_papers_rows_apart() -> None:
    """Table 2's model (8 blocks over 8 neighbours), Table 4's ablations and the supplement's grid map to
    different paper numbers (or none): a no-neighbour run is never compared with the 73.2 of the full model."""
    base = {"source_method": "ms", "num_blocks": 8, "num_neighbours": 8, "include_self": False, "aggregation": "attention"}
    names = ContextRefine.reference_names
    assert names(base, True) == ["context_refine(ms)"] and names(base, False) == ["ms_baseline"]
    assert names({**base, "num_neighbours": 0, "include_self": True}, True) == ["context_refine(ms, no neighbours)"]
    assert names({**base, "aggregation": "mean"}, True) == ["context_refine(ms, neighbour mean)"]
    assert names({**base, "num_blocks": 4}, True) == [] and names({**base, "num_neighbours": 16}, True) == []
    assert names({**base, "source_method": None}, True) == []
