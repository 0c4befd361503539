"""Intra-Batch MPN: the MPN against Eq. 2-6, the reciprocal k-NN batches against Supp. C.3.

References are written independently of the implementation: the MPN layer and its attention
weights are checked against float64 loops over nodes and heads, the neighbour graph against a
full stable sort, and the reciprocal k-NN batches against :class:`ReferenceReciprocalBatches`,
a literal per-query transcription (in ``companions/intra_batch_perf.py``, which times the
vectorised construction against it: one copy, tested here). The training loss is checked to
couple the samples of a batch (a per-sample loss fails those tests), and the refined metrics
of a fit against ``retrieval_metrics`` of the MPN applied by hand.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from benchmark.engine.evaluation import RetrievalEvaluator
from benchmark.engine.evaluation.metrics import nmi, retrieval_metrics
from benchmark.nn.backbones import BackboneConfig
from benchmark.nn.reciprocal_neighbours import knn_graph, reciprocal_knn_batches
from companions.intra_batch_perf import ReferenceReciprocalBatches, synthetic_sop_embeddings
from methods.base import load_method
from methods.intra_batch import (
    IntraBatchMPN,
    LossConfig,
    MessagePassingLayer,
    MessagePassingNetwork,
    MPNConfig,
    ReciprocalConfig,
)


# ---------------------------------------------------------------------------- MPN layer
def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return torch.stack([(x[i] - mean) / math.sqrt(var + ln.eps) * ln.weight[i] + ln.bias[i] for i in range(len(x))])


@torch.no_grad()
def _reference_layer(layer: MessagePassingLayer, h: torch.Tensor) -> torch.Tensor:
    """Eq. 2-6 for one batch (B, d), written out node by node and head by head in float64."""
    b, d = h.shape
    heads, dh = layer.heads, d // layer.heads
    wq, bq = layer.q.weight, layer.q.bias
    wk, bk = layer.k.weight, layer.k.bias
    wv, bv = layer.v.weight, layer.v.bias
    out = []
    for i in range(b):
        message = []
        for m in range(heads):
            rows = slice(m * dh, (m + 1) * dh)  # W^{l,m}: the head's block of the projections
            q_i = wq[rows] @ h[i] + bq[rows]
            scores = [float((q_i @ (wk[rows] @ h[j] + bk[rows])) / math.sqrt(dh)) for j in range(b)]  # Eq. 3
            denom = sum(math.exp(s) for s in scores) + (1.0 if layer.null_logit else 0.0)
            alpha = [math.exp(s) / denom for s in scores]
            message.append(sum(alpha[j] * (wv[rows] @ h[j] + bv[rows]) for j in range(b)))  # Eq. 2
        h_new = layer.out.weight @ torch.cat(message) + layer.out.bias  # Eq. 4: heads concatenated
        f = _layer_norm(h_new + h[i], layer.norm1)  # Eq. 5
        lin1, lin2 = layer.ff[0], layer.ff[2]
        ff = lin2.weight @ torch.relu(lin1.weight @ f + lin1.bias) + lin2.bias
        out.append(_layer_norm(ff + f, layer.norm2))  # Eq. 6
    return torch.stack(out)


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """float64, and LayerNorm affine parameters away from their (1, 0) initialisation."""
    module = module.double()
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.LayerNorm):
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.uniform_(-0.5, 0.5)
    return module.eval()


@pytest.mark.parametrize("null_logit", [False, True])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_mpn_layer_matches_the_equations(heads: int, null_logit: bool) -> None:
    torch.manual_seed(heads)
    layer = _randomised(MessagePassingLayer(8, heads, ff_dim=12, dropout=0.3, null_logit=null_logit))
    h = torch.randn(5, 8, dtype=torch.float64)
    expected = _reference_layer(layer, h)
    torch.testing.assert_close(layer(h), expected, rtol=1e-10, atol=1e-10)
    # Several batches at once, and updating only the first node of each.
    hs = torch.randn(3, 5, 8, dtype=torch.float64)
    batched = layer(hs)
    for g in range(3):
        torch.testing.assert_close(batched[g], _reference_layer(layer, hs[g]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(hs, num_receivers=1), batched[:, :1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("null_logit", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_weights_match_a_float64_reference(heads: int, null_logit: bool) -> None:
    """alpha^m_ij = exp(s^m_ij) / (sum_j exp(s^m_ij) [+ 1 with the null logit]), s = q^m_i.k^m_j / sqrt(d/M).

    Written as a loop over batches, heads, receivers and senders in float64, on two batches
    at once with 3 receivers of 6 nodes; the logits are of order 1 (the weights are far from
    uniform), so a wrong scale, a softmax over the wrong axis, a missing or extra null logit
    or mixed-up heads fail.
    """
    torch.manual_seed(heads)
    layer = _randomised(MessagePassingLayer(8, heads, 16, null_logit=null_logit))
    h = 2.0 * torch.randn(2, 6, 8, dtype=torch.float64)  # (G, B, d)
    with torch.no_grad():
        q, k = layer.q(h[:, :3]), layer.k(h)  # (G, R, d), (G, B, d)
        attn = layer.attention_weights(q, k)  # (G, M, R, B)
    assert attn.shape == (2, heads, 3, 6)
    dh = 8 // heads
    ref = torch.zeros(2, heads, 3, 6, dtype=torch.float64)
    for g in range(2):
        for m in range(heads):
            sl = slice(m * dh, (m + 1) * dh)
            for i in range(3):
                scores = [float(q[g, i, sl] @ k[g, j, sl]) / math.sqrt(dh) for j in range(6)]
                denom = sum(math.exp(x) for x in scores) + (1.0 if null_logit else 0.0)
                for j in range(6):
                    ref[g, m, i, j] = math.exp(scores[j]) / denom
    assert float(ref.amax()) > 0.5  # far from uniform (1/6)
    torch.testing.assert_close(attn, ref, rtol=1e-12, atol=1e-14)


def test_bad_head_count_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"not divisible by heads=3 \(--model\.mpn\.heads\)"):
        MessagePassingLayer(8, 3, 16)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_mpn_is_permutation_equivariant(layers: int) -> None:
    torch.manual_seed(layers)
    mpn = _randomised(MessagePassingNetwork(16, layers, heads=4, dropout=0.0))
    x = torch.randn(9, 16, dtype=torch.float64)
    perm = torch.randperm(9)
    for out, out_perm in zip(mpn(x), mpn(x[perm])):
        torch.testing.assert_close(out_perm, out[perm], rtol=1e-10, atol=1e-10)
    # And it is not a per-node map: changing one node changes the others.
    y = x.clone()
    y[0] += 1.0
    assert not torch.allclose(mpn(y)[-1][1:], mpn(x)[-1][1:])


@pytest.mark.parametrize("layers", [1, 2])
def test_forward_batches_equals_forward_on_gathered_batches(layers: int) -> None:
    torch.manual_seed(0)
    mpn = _randomised(MessagePassingNetwork(16, layers, heads=2))
    nodes = torch.randn(30, 16, dtype=torch.float64)
    batches = torch.stack([torch.cat([torch.tensor([i]), torch.randperm(30)[:6]]) for i in range(30)])
    fast = mpn.forward_batches(nodes, batches, chunk_size=7)
    slow = mpn(nodes[batches])  # (G, B, d) per layer
    assert len(fast) == layers
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s[:, 0], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- neighbour graph
def _brute_force_knn(emb: torch.Tensor, database: torch.Tensor, k: int) -> torch.Tensor:
    e = emb.double()
    sq = (e * e).sum(1)
    d = sq[:, None] + sq[None] - 2 * e @ e.T  # float64: exact for the small-integer features
    d[:, ~database] = math.inf
    d.fill_diagonal_(math.inf)
    order = d.sort(dim=1, stable=True).indices  # ties: lower index first
    return torch.cat([torch.arange(len(emb))[:, None], order[:, :k]], 1)


@pytest.mark.parametrize(
    ("n", "k", "integer", "with_database"),
    # The larger sizes group columns into blocks and super-blocks (the fast path of knn_graph).
    [(300, 7, True, False), (300, 12, False, True), (1500, 30, True, True), (1600, 2, True, False),
     (1200, 6, False, False)],
)
def test_knn_graph_is_exact_with_ties(n: int, k: int, integer: bool, with_database: bool) -> None:
    gen = torch.Generator().manual_seed(n + k)
    emb = torch.randint(0, 3, (n, 4), generator=gen).float() if integer else torch.randn(n, 6, generator=gen)
    database = torch.rand(n, generator=gen) < 0.6 if with_database else torch.ones(n, dtype=torch.bool)
    indices, distances = knn_graph(emb, database, k, chunk_size=256)
    assert torch.equal(indices, _brute_force_knn(emb, database, k))
    expected = ((emb[indices] - emb[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(distances, expected, rtol=1e-5, atol=1e-4)


def test_knn_graph_rejects_bad_input() -> None:
    emb = torch.randn(10, 4)
    with pytest.raises(ValueError, match="1 <= k <= "):
        knn_graph(emb, torch.ones(10, dtype=torch.bool), 10)
    emb[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        knn_graph(emb, torch.ones(10, dtype=torch.bool), 3)


# ---------------------------------------------------------------------------- reciprocal batches
def _scenario(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Small-integer features (exact distances: ties and duplicates) or continuous ones."""
    if kind == "ties":  # 3^3 = 27 distinct points among n: many duplicates and tied distances
        return torch.randint(0, 3, (n, 3), generator=gen).float()
    if kind == "clusters":  # integer cluster centres + small integer offsets: large reciprocal sets
        centres = torch.randint(-6, 7, (n // 5 + 1, 4), generator=gen)
        return (centres[torch.randint(len(centres), (n,), generator=gen)] + torch.randint(0, 2, (n, 4), generator=gen)).float()
    return torch.randn(n, 8, generator=gen)


CASES = [
    # (features, n, k1, batch_size, alpha, strict, database: all | random | disjoint)
    ("ties", 80, 6, 5, 2 / 3, False, "all"),
    ("ties", 120, 10, 7, 2 / 3, True, "all"),
    ("clusters", 150, 8, 7, 2 / 3, False, "all"),
    ("clusters", 150, 8, 4, 0.5, False, "random"),
    ("clusters", 140, 5, 9, 1.0, False, "disjoint"),  # In-Shop: queries outside the gallery
    ("continuous", 100, 4, 8, 2 / 3, False, "all"),  # small reciprocal sets: fill-up
    ("continuous", 130, 3, 6, 0.0, False, "disjoint"),
    ("ties", 90, 2, 7, 2 / 3, False, "disjoint"),  # k1 + 1 < batch_size: the lists grow to fit
    ("clusters", 110, 11, 3, 1.0, True, "random"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[6]}-k{c[2]}-b{c[3]}" for c in CASES])
def test_reciprocal_batches_equal_the_per_query_reference(case: tuple) -> None:
    kind, n, k1, batch_size, alpha, strict, db = case
    gen = torch.Generator().manual_seed(n * 31 + k1)
    emb = _scenario(kind, n, gen)
    database = {
        "all": None,
        "random": torch.rand(n, generator=gen) < 0.7,
        "disjoint": torch.arange(n) % 3 != 0,  # every third sample is a query only
    }[db]
    fast = reciprocal_knn_batches(emb, database, k1, batch_size, alpha, strict, chunk_size=17)
    reference = ReferenceReciprocalBatches(emb, database, k1, batch_size, alpha, strict)
    expected = reference.all_batches()
    assert fast.shape == (n, batch_size)
    mismatched = (fast != expected).any(1).nonzero().flatten().tolist()
    assert not mismatched, f"rows {mismatched[:5]}: {fast[mismatched[:3]].tolist()} != {expected[mismatched[:3]].tolist()}"
    assert torch.equal(fast[:, 0], torch.arange(n))
    if database is not None:  # batches draw only from the gallery (besides the sample itself)
        assert database[fast[:, 1:]].all()


def test_reference_cases_exercise_every_branch() -> None:
    """The cases above reach expansion, non-expansion, fill-up, members beyond the list and queries attaching."""
    stats: Counter[str] = Counter()
    for kind, n, k1, batch_size, alpha, strict, db in CASES:
        gen = torch.Generator().manual_seed(n * 31 + k1)
        emb = _scenario(kind, n, gen)
        database = {"all": None, "random": torch.rand(n, generator=gen) < 0.7, "disjoint": torch.arange(n) % 3 != 0}[db]
        reference = ReferenceReciprocalBatches(emb, database, k1, batch_size, alpha, strict)
        reference.all_batches()
        stats += reference.stats
    for branch in ("expanded", "not_expanded", "filled", "beyond_list", "query_attached"):
        assert stats[branch] > 0, f"no case takes the {branch!r} branch: {dict(stats)}"


@pytest.mark.slow
def test_reciprocal_batches_on_clustered_embeddings_at_scale() -> None:
    emb, _ = synthetic_sop_embeddings(3000, 560, 32, seed=1)
    fast = reciprocal_knn_batches(emb, None, 30, 7)
    queries = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:20]
    expected = ReferenceReciprocalBatches(emb, None, 30, 7).all_batches(queries.tolist())
    assert (fast[queries] == expected).all(1).float().mean() >= 0.95  # float32 vs float64 near-ties aside


def test_reciprocal_batches_validate_input() -> None:
    with pytest.raises(ValueError, match="at least 2 database"):
        reciprocal_knn_batches(torch.randn(5, 3), torch.tensor([True, False, False, False, False]))
    with pytest.raises(ValueError, match="database mask has 3 entries"):
        reciprocal_knn_batches(torch.randn(5, 3), torch.ones(3, dtype=torch.bool))
    # Small databases clamp k1 and the batch size instead of failing.
    assert reciprocal_knn_batches(torch.randn(4, 3), None, 30, 7).shape == (4, 4)


# ---------------------------------------------------------------------------- the method
def _model(mpn: dict[str, Any] | None = None, loss: dict[str, Any] | None = None,
           refine: dict[str, Any] | None = None, **kwargs: Any) -> IntraBatchMPN:
    """A tiny model; the option groups are given as the fields that differ from the defaults (4 heads)."""
    base = dict(backbone=BackboneConfig("resnet_tiny_test", pretrained=False), embedding_dim=16, num_classes=5,
                image_size=16)
    groups = dict(mpn=MPNConfig(**{"heads": 4, **(mpn or {})}), loss=LossConfig(**(loss or {})),
                  refine=ReciprocalConfig(**(refine or {})))
    return IntraBatchMPN(**{**base, **groups, **kwargs})


def _batch(n_classes: int = 4, per_class: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"image": torch.randn(n_classes * per_class, 3, 16, 16),
            "label": torch.arange(n_classes).repeat_interleave(per_class)}


def _backbone_grad(model: IntraBatchMPN, batch: dict[str, torch.Tensor]) -> float:
    model.zero_grad()
    model.training_loss(batch)["loss"].backward()
    return sum(float(p.grad.abs().sum()) for p in model.encoder.parameters() if p.grad is not None)


def test_gradients_reach_the_backbone_through_both_losses() -> None:
    batch = _batch()
    both = _model()
    terms = both.training_loss(batch)
    assert set(terms) == {"loss", "backbone_ce", "mpn_ce"}
    torch.testing.assert_close(terms["loss"], terms["backbone_ce"] + terms["mpn_ce"])
    only_mpn = _model(loss={"backbone_weight": 0.0})
    assert _backbone_grad(only_mpn, batch) > 0
    assert only_mpn.backbone_classifier.weight.grad is None
    assert all(p.grad is not None for p in only_mpn.mpn.parameters())
    only_backbone = _model(loss={"mpn_weight": 0.0})
    assert _backbone_grad(only_backbone, batch) > 0
    assert all(p.grad is None for p in only_backbone.mpn.parameters())


def test_the_head_of_a_zero_weight_loss_is_frozen_and_left_out_of_the_optimizer() -> None:
    """DDP fails on a trainable parameter without a gradient (the SOP recipe trains no MPN loss): the head
    a zero-weight loss never reaches is frozen and out of the optimizer; its weights stay in the state dict."""
    trained = {id(p) for g in _model().parameter_groups() for p in g["params"]}
    for loss, idle in (({"mpn_weight": 0.0}, ("mpn", "mpn_classifier")), ({"backbone_weight": 0.0}, ("backbone_classifier",))):
        model = _model(loss=loss)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {f"{head}.{n}" for head in idle for n, _ in getattr(model, head).named_parameters()}
        in_optimizer = {id(p) for g in model.parameter_groups() for p in g["params"]}
        assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
        assert len(in_optimizer) < len(trained) and set(model.state_dict()) == set(_model().state_dict())


def test_official_dropouts_act_where_the_public_code_puts_them() -> None:
    """Dropout 1 on the attention weights leaves only W_o's bias as the message; dropout 1 inside
    FF leaves only its second Linear's bias; neither acts in eval mode."""
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8)  # 3 batches of 5 nodes
    attn = MessagePassingLayer(8, 2, 16, dropout=0.0, null_logit=True, attention_dropout=1.0).train()
    x = attn.norm1(h + attn.out.bias)
    torch.testing.assert_close(attn(h), attn.norm2(x + attn.ff(x)))
    ff = MessagePassingLayer(8, 2, 16, dropout=0.0, ff_dropout=1.0).train()
    x = ff.norm1(h + ff.out(ff.attention(ff.q(h), ff.k(h), ff.v(h))[0]))
    torch.testing.assert_close(ff(h), ff.norm2(x + ff.ff[2].bias))
    plain = MessagePassingLayer(8, 2, 16, dropout=0.0)
    plain.load_state_dict(ff.state_dict())  # same names: the dropouts add no parameters
    torch.testing.assert_close(ff.eval()(h), plain.eval()(h))


def test_frozen_bn_bias_stays_zero_while_its_weight_trains() -> None:
    model = _model(mpn={"freeze_bn_bias": True})
    bn = model.mpn_classifier[0]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    weight = bn.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model.training_loss(_batch())["loss"].backward()
        opt.step()
    assert not bn.bias.requires_grad and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert not torch.equal(bn.weight, weight)


def _smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample label-smoothed cross-entropy, written out: (N, C) logits -> (N,) float64."""
    logp = logits.double().log_softmax(dim=1)  # (N, C)
    nll = -logp[torch.arange(len(labels)), labels]  # (N,)
    return (1 - eps) * nll - eps * logp.mean(dim=1)


def _mpn_ce_and_features(model: IntraBatchMPN, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """The fit's ``mpn_ce`` and the (B, d) features its MPN classifier received."""
    seen: list[torch.Tensor] = []
    handle = model.mpn_classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        ce = float(model.training_loss(batch)["mpn_ce"])
    handle.remove()
    return ce, seen[0]


@pytest.mark.usefixtures("one_thread")
def test_mpn_loss_is_computed_on_the_whole_batch_graph() -> None:
    """The MPN loss is not a per-sample loss: the batch is one graph, every node attends to all.

    In eval mode (no dropout, BatchNorm on running statistics) a per-sample loss would make a
    sample's MPN feature independent of the other samples and the batch loss the mean of the
    losses of any partition. Here: (1) the classifier's input equals the MPN applied by hand
    to the whole batch's normalised embeddings and ``mpn_ce`` the smoothed CE written out;
    (2) changing one image changes the MPN feature of every other sample; (3) permuting the
    batch permutes the features; (4) the loss of the batch is not the mean over its halves,
    while the backbone loss (per sample) is.
    """
    torch.manual_seed(0)
    model = _model(mpn={"dropout": 0.0}).eval()
    batch = _batch()  # 4 classes x 3 samples, (12, 3, 16, 16)
    ce, features = _mpn_ce_and_features(model, batch)  # (12, 16)
    with torch.no_grad():
        emb = model.project(model.encode(batch["image"]).pooled)  # (12, 16) unnormalised
        expected = model.mpn(F.normalize(emb, dim=-1))[-1]  # one graph of 12 nodes
        logits = model.mpn_classifier(expected) / model.loss_config.temperature  # (12, C)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    hand = _smoothed_cross_entropy(logits, batch["label"], 0.1)  # (12,)
    assert abs(ce - float(hand.mean())) < 1e-5
    # (2) one other sample changed -> every sample's feature changes.
    changed = {**batch, "image": batch["image"].clone()}
    changed["image"][0] = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    _, features_changed = _mpn_ce_and_features(model, changed)
    moved = (features_changed[1:] - features[1:]).abs().amax(dim=1)  # (11,) samples 1.. were not touched
    assert bool((moved > 1e-4).all()), moved
    # (3) permutation equivariance.
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    ce_perm, features_perm = _mpn_ce_and_features(model, {k: v[perm] for k, v in batch.items()})
    torch.testing.assert_close(features_perm, features[perm], rtol=1e-5, atol=1e-6)
    assert abs(ce_perm - ce) < 1e-5
    # (4) not additive over a partition of the batch, unlike the per-sample backbone loss.
    halves = [{k: v[idx] for k, v in batch.items()} for idx in (torch.arange(6), torch.arange(6, 12))]
    ce_halves = [_mpn_ce_and_features(model, half)[0] for half in halves]
    assert abs(ce - sum(ce_halves) / 2) > 1e-3
    with torch.no_grad():
        backbone = float(model.training_loss(batch)["backbone_ce"])
        backbone_halves = [float(model.training_loss(half)["backbone_ce"]) for half in halves]
        logits = model.backbone_classifier(emb) / model.loss_config.temperature
        expected_backbone = _smoothed_cross_entropy(logits, batch["label"], 0.1)
    assert abs(backbone - sum(backbone_halves) / 2) < 1e-5
    assert abs(backbone - float(expected_backbone.mean())) < 1e-5  # the head takes the raw embedding


def test_defaults_follow_the_reference_recipe() -> None:
    model = _model()
    assert model.encoder.pool == "max"  # CNNs are max-pooled unless backbone.pool says otherwise
    assert _model(backbone=BackboneConfig("resnet_tiny_test", pretrained=False, pool="avg")).encoder.pool == "avg"
    assert _model(backbone=BackboneConfig("vit_tiny_test", pretrained=False)).encoder.pool == "token"
    hp = model.hparams
    assert (hp.optimizer, hp.scheduler, list(hp.lr_milestones), hp.lr_gamma) == ("radam", "reload_best", [30, 50], 0.1)
    assert (hp.mpn, hp.loss, hp.refine) == (MPNConfig(heads=4), LossConfig(), ReciprocalConfig())
    assert (MPNConfig(), LossConfig(), ReciprocalConfig()) == (
        MPNConfig(1, 2, None, 0.1, False, True, "last"), LossConfig(0.2, 0.1, 1.0, 1.0),
        ReciprocalConfig("test", 30, 7, 2 / 3, False))
    concat = _model(mpn={"layers": 2, "classifier_input": "concat"})
    assert concat.mpn_classifier[1].in_features == 32
    # A group may be given as a mapping of its fields; it is stored as the dataclass.
    mapped = IntraBatchMPN(mpn={"heads": 2, "layers": 2}, loss={"temperature": 0.5},
                           backbone=BackboneConfig("resnet_tiny_test", pretrained=False), num_classes=5, image_size=16)
    assert mapped.hparams.mpn == MPNConfig(layers=2, heads=2) and len(mapped.mpn.layers) == 2
    assert mapped.hparams.loss == LossConfig(temperature=0.5) and mapped.describe()["temperature"] == 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": {"temperature": 0.0}}, r"--model\.loss\.temperature=0\.0 \(must be > 0\)"),
        ({"loss": {"label_smoothing": 1.5}}, r"--model\.loss\.label_smoothing=1\.5"),
        ({"loss": {"backbone_weight": 0.0, "mpn_weight": 0.0}}, r"--model\.loss\.backbone_weight and "
                                                               r"--model\.loss\.mpn_weight are both 0"),
        ({"loss": {"mpn_weight": -1.0}}, r"--model\.loss\.mpn_weight=-1\.0 \(must be >= 0\)"),
        ({"mpn": {"layers": 0, "dropout": 2.0}}, r"--model\.mpn\.layers=0 .*; --model\.mpn\.dropout=2\.0"),
        ({"mpn": {"heads": 3}}, r"--model\.mpn\.heads=3 does not divide --model\.embedding_dim=16"),
        ({"mpn": {"ff_dim": 0}}, r"--model\.mpn\.ff_dim=0"),
        ({"mpn": {"classifier_input": "first"}}, r"--model\.mpn\.classifier_input must be one of 'last', 'concat'"),
        ({"mpn": {"depth": 2}}, r"--model\.mpn has no field 'depth'"),
        ({"refine": {"stages": "val"}}, r"--model\.refine\.stages must be one of"),
        ({"refine": {"k1": 0, "batch_size": 0}}, r"--model\.refine\.k1=0 .*--model\.refine\.batch_size=0"),
        ({"refine": {"alpha": 1.5}}, r"--model\.refine\.alpha=1\.5 \(must be in \[0, 1\]\)"),
    ],
)
def test_bad_options_name_their_flag_before_the_encoder_is_built(
    options: dict[str, dict[str, Any]], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every group's fields are checked where the group is built, before any heavy work."""

    def no_encoder(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the encoder was built before the options were checked")

    monkeypatch.setattr("methods.base.Encoder", no_encoder)
    with pytest.raises(ValueError, match=message):
        IntraBatchMPN(**options, backbone=BackboneConfig("resnet_tiny_test", pretrained=False), embedding_dim=16,
                      num_classes=5, image_size=16)
    group, fields = next(iter(options.items()))
    if not {"heads", "depth"} & set(fields):  # the dataclass itself refuses the value (what the CLI builds)
        cls = {"mpn": MPNConfig, "loss": LossConfig, "refine": ReciprocalConfig}[group]
        with pytest.raises(ValueError, match=message):
            cls(**fields)


@pytest.mark.parametrize("layers", [1, 2])
def test_refine_runs_the_mpn_on_reciprocal_batches(layers: int) -> None:
    model = _model(mpn={"layers": layers, "classifier_input": "concat" if layers == 2 else "last"},
                   refine={"k1": 6, "batch_size": 4}).eval()
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(60, 16, generator=gen), dim=1)
    is_query = torch.ones(60, dtype=torch.bool)
    is_gallery = torch.arange(60) % 4 != 0  # In-Shop-like: every fourth sample is a query only
    is_query[1::4] = False
    out = model.refine(emb, is_query, is_gallery)
    refined = out[""]
    assert refined.shape == (60, 16 * layers)
    torch.testing.assert_close(refined.norm(dim=1), torch.ones(60))
    # Per sample: its reference batch through the MPN, keeping its own output.
    batches = ReferenceReciprocalBatches(emb, is_gallery, 6, 4).all_batches()
    with torch.no_grad():
        expected = F.normalize(model.mpn_features([o[:, 0] for o in model.mpn(emb[batches])]), dim=1)
    torch.testing.assert_close(refined, expected, rtol=1e-4, atol=1e-5)
    assert _model(refine={"stages": "never"}).refine(emb, is_query, is_gallery) is None


def _metrics_with_nmi(emb: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> dict[str, float]:
    """What the evaluator should report for ``emb``: ``retrieval_metrics`` plus NMI (seed 0)."""
    out = retrieval_metrics(emb, labels, device="cpu", **kwargs)
    out["NMI"] = nmi(emb, labels, seed=0)
    return out


@pytest.mark.usefixtures("one_thread")
def test_the_evaluator_reports_the_metrics_of_the_mpn_refined_embeddings() -> None:
    """``refined`` metrics = ``retrieval_metrics`` + NMI of the MPN applied by hand to the reference batches.

    The plain metrics are those of the input embeddings; the refined ones those of
    ``normalize(MPN(emb[batch])[node 0])`` over the per-query reference batches, and they
    differ from the plain ones (the MPN moved the embeddings).
    """
    torch.manual_seed(0)
    model = _model(refine={"k1": 5, "batch_size": 4}).eval()
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) // 4
    emb = F.normalize(torch.randn(10, 16, generator=gen)[labels] + 0.8 * torch.randn(40, 16, generator=gen), dim=1)
    flags = torch.ones(40, dtype=torch.bool)
    data = {"embeddings": emb, "labels": labels, "is_query": flags, "is_gallery": flags, "indices": torch.arange(40)}
    refined = model.refine(emb, flags, flags)
    results = RetrievalEvaluator().compute_metrics(data, refined, (1, 2), True, torch.device("cpu"))
    batches = ReferenceReciprocalBatches(emb, None, 5, 4).all_batches()  # (40, 4)
    with torch.no_grad():
        by_hand = F.normalize(model.mpn(emb[batches])[-1][:, 0], dim=1)  # (40, 16)
    torch.testing.assert_close(refined[""], by_hand, rtol=1e-5, atol=1e-6)
    assert set(results) == {"", "refined"}
    assert results[""] == pytest.approx(_metrics_with_nmi(emb, labels, recall_ks=(1, 2)), abs=1e-6)
    expected = _metrics_with_nmi(by_hand, labels, recall_ks=(1, 2))
    assert results["refined"] == pytest.approx(expected, abs=1e-6)
    assert results[""]["MAP@R"] < 0.9  # not a trivially separable set
    assert results["refined"]["MAP@R"] != pytest.approx(results[""]["MAP@R"], abs=1e-4)


# ---------------------------------------------------------------------------- the paper's rows and the recipes
RECIPES = Path(__file__).resolve().parents[2] / "configs" / "intra_batch"


def _names(dataset: str, refined: bool, **loss: float) -> list[str]:
    """The reference names of a run as the CLI records them: the model's describe() with the dataset."""
    return IntraBatchMPN.reference_names({**_model(loss=loss).describe(), "dataset": dataset}, refined)


def test_reference_names_tell_table_3_rows_apart() -> None:
    """Every method name of benchmark/core/reference/intra_batch.csv is what a run of its setting records, and
    the settings of Table 3 never share one: a cross-entropy-only CUB run is compared with 67.5, not 70.3."""
    from benchmark.core.papers import paper_numbers

    both, ce_only, mpn_only = {}, {"mpn_weight": 0.0}, {"backbone_weight": 0.0}
    assert _names("cub", False, **both) == ["intra_batch"]
    assert _names("cub", True, **both) == ["intra_batch(reciprocal_knn_test)"]
    assert _names("cars", False, **ce_only) == ["cross_entropy_only"] and _names("cars", True, **ce_only) == []
    assert _names("cub", False, **mpn_only) == ["mpn_loss_only"] and _names("cub", True, **mpn_only) == []
    # SOP: the published "Ours" numbers come from the public config's cross-entropy-only training.
    assert _names("sop", False, **ce_only) == ["intra_batch"] and _names("sop", True, **ce_only) == []
    assert _names("sop", False, **both) == ["intra_batch"]
    reachable = {name for dataset in ("cub", "sop") for setting in (both, ce_only, mpn_only)
                 for refined in (False, True) for name in _names(dataset, refined, **setting)}  # fmt: skip
    numbers = paper_numbers(papers=["intra_batch"])
    assert {n.method for n in numbers} == reachable
    rows = {n.method: (n.table, n.row) for n in numbers if n.table == "Table 3"}
    assert rows == {
        "cross_entropy_only": ("Table 3", "Cross-Entropy / Backbone Embeddings"),
        "mpn_loss_only": ("Table 3", "MPN Loss / Backbone Embeddings"),
        "intra_batch": ("Table 3", "MPN Loss + Auxiliary Loss / Backbone Embeddings"),
        "intra_batch(reciprocal_knn_test)": ("Table 3", "MPN Loss + Auxiliary Loss / MPN Embeddings"),
    }


@pytest.mark.parametrize("dataset", ["cub", "cars", "sop", "inshop"])
def test_real_dataset_recipes_follow_the_public_configs(dataset: str) -> None:
    """float32 as the public trainer (no apex); SOP trains the backbone's cross-entropy alone as the public SOP
    config that produced Table 1's 81.4 does, computes the NMI Table 1 reports and refines nothing (the MPN
    is untrained); the others train both losses."""
    recipe = yaml.safe_load((RECIPES / f"{dataset}.yaml").read_text())
    assert recipe["trainer"]["precision"] == "32-true"
    model = recipe["model"]["init_args"]
    loss = LossConfig(**model["loss"])
    assert loss.backbone_weight == 1.0 and loss.mpn_weight == (0.0 if dataset == "sop" else 1.0)
    assert IntraBatchMPN.reference_names({"backbone_loss_weight": loss.backbone_weight,
                                          "mpn_loss_weight": loss.mpn_weight, "dataset": dataset}, False) == ["intra_batch"]
    if dataset == "sop":
        assert model["refine"]["stages"] == "never" and recipe["evaluation"]["nmi"] is True


# ---------------------------------------------------------------------------- a CPU fit
@pytest.mark.slow  # ~1 min on 2 cores: 100 steps, then the reference batches of 800 test embeddings
def test_cpu_fit_improves_recall_and_reports_refined_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded default through the CLI and its recipe (a tiny encoder, 100 steps).

    Besides R@1 improving over the untrained encoder, the numbers the fit writes are checked:
    the test refine call is recorded, and its refined embeddings must equal the trained MPN
    applied by hand to the per-query reference batches of the test embeddings, and the plain
    and refined metrics in ``metrics_test.json`` must equal ``retrieval_metrics`` + NMI of the
    recorded embeddings.
    """
    from benchmark.app.cli import main

    refine_calls: list[tuple[IntraBatchMPN, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    evaluated: list[dict[str, torch.Tensor]] = []
    real_refine, real_metrics = IntraBatchMPN.refine, RetrievalEvaluator.compute_metrics

    def spy_refine(self: IntraBatchMPN, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor):
        out = real_refine(self, embeddings, is_query, is_gallery)
        if out is not None:
            refine_calls.append((self, embeddings.clone(), is_gallery.clone(), out[""].clone()))
        return out

    def spy_metrics(self: RetrievalEvaluator, data: dict[str, torch.Tensor], *args: Any, **kwargs: Any):
        evaluated.append({k: v.clone() for k, v in data.items()})
        return real_metrics(self, data, *args, **kwargs)

    monkeypatch.setattr(IntraBatchMPN, "refine", spy_refine)
    monkeypatch.setattr(RetrievalEvaluator, "compute_metrics", spy_metrics)
    run = tmp_path / "run"
    args = [
        "fit", "--method", "intra_batch", "--data", "synthetic", "--backbone", "resnet_tiny_test",
        "--backbone.pretrained", "false", "--data.images_per_class", "8", "--data.classes_per_batch", "8",
        "--data.samples_per_class", "4", "--data.batches_per_epoch", "25", "--data.num_workers", "0",
        "--model.embedding_dim", "64", "--model.lr", "1e-2", "--model.lr_milestones", "[100]",
        "--model.refine.k1", "10", "--trainer.max_epochs", "4", "--trainer.enable_progress_bar", "false",
        "--logger", "none", "--run_dir", str(run),
        "--trainer.precision", "32-true",  # the MPN is re-applied by hand in float32 below, on every CPU
    ]
    assert main(args) == 0
    val = json.loads((run / "metrics_val.json").read_text())["evaluations"]
    test = json.loads((run / "metrics_test.json").read_text())["evaluations"][-1]
    untrained, trained = val[0]["metrics"]["R@1"], test["metrics"]["R@1"]
    assert val[0]["global_step"] == 0
    assert trained > 1.5 * untrained and trained > untrained + 0.02, (untrained, trained)
    assert "refined" not in val[0]  # refinement runs at test time by default
    assert len(refine_calls) == 1  # the test evaluation only

    model, emb, is_gallery, refined = refine_calls[0]
    data = evaluated[-1]  # the test evaluation: labels in the same (dataset-index) order
    assert torch.equal(data["embeddings"], emb) and len(emb) == 800  # 100 test classes x 8 images
    nodes = F.normalize(emb.float(), dim=1)
    cfg = model.refine_config
    batches = reciprocal_knn_batches(nodes, is_gallery, 10, 7, cfg.alpha, cfg.strict_overlap)  # (800, 7): refine's
    # The literal transcription (float64 squared distances of the raw embeddings) gives the same
    # batches but where a distance ties within rounding: here 1 row of 800, whose batch differs
    # because another sample's 10th and 11th neighbours lie 1e-7 apart (0.0318599 vs 0.0318600).
    # The test applied the MPN to the transcription's batches and failed on that row; the exact
    # semantics are checked against it on untied embeddings (test_reciprocal_batches_equal_the_per_query_reference).
    reference = ReferenceReciprocalBatches(emb, is_gallery, 10, 7, cfg.alpha, cfg.strict_overlap).all_batches()
    same = (batches.sort(dim=1).values == reference.sort(dim=1).values).all(dim=1)
    assert int((~same).sum()) <= len(same) // 100, int((~same).sum())
    model.eval()
    with torch.no_grad():
        by_hand = F.normalize(model.mpn_features([o[:, 0] for o in model.mpn(nodes[batches])]), dim=1)
    torch.testing.assert_close(refined, by_hand, rtol=1e-4, atol=1e-5)
    labels, roles = data["labels"], {"is_query": data["is_query"], "is_gallery": data["is_gallery"]}
    assert test["metrics"] == pytest.approx(_metrics_with_nmi(emb, labels, **roles), rel=1e-9, abs=1e-12)
    reported = test["refined"]["refined"]
    assert reported == pytest.approx(_metrics_with_nmi(refined, labels, **roles), rel=1e-9, abs=1e-12)
    assert reported != pytest.approx(test["metrics"], abs=1e-6)  # the MPN changed the ranking

    # The run's last checkpoint (the tested weights) reloads with its option groups as dataclasses,
    # and the recorded config nests them under model.init_args.
    reloaded = load_method(str(run / "checkpoints" / "last.ckpt"))
    assert isinstance(reloaded, IntraBatchMPN)
    assert reloaded.hparams.refine == ReciprocalConfig(k1=10) and reloaded.refine_config.k1 == 10
    assert (reloaded.hparams.mpn, reloaded.hparams.loss) == (MPNConfig(), LossConfig())
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    torch.testing.assert_close(reloaded.eval().refine_embeddings(emb, is_gallery), refined, rtol=1e-5, atol=1e-6)
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert config["refine"]["k1"] == 10 and config["mpn"]["heads"] == 2 and config["loss"]["temperature"] == 0.2
