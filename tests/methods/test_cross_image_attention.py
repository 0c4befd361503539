"""Cross-Image-Attention: the all-pairs conditional embeddings, the loss, gradients, evaluation.

References are naive float64 loops written from the equations (one pair, one head, one
location at a time), independent of the batched implementation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmark.backbones import BackboneConfig
from methods.cross_image_attention import CrossImageAttentionMethod, label_masks, multi_similarity_loss

TINY = dict(backbone=BackboneConfig("resnet_tiny_test", pretrained=False), embedding_dim=8, image_size=16)


def make(**kwargs) -> CrossImageAttentionMethod:
    torch.manual_seed(0)
    return CrossImageAttentionMethod(**{**TINY, "num_heads": 2, **kwargs})


# ---------------------------------------------------------------------------- naive references
def ref_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = sum(float(v) for v in x) / len(x)
    var = sum((float(v) - mean) ** 2 for v in x) / len(x)
    return torch.stack([(x[j] - mean) / math.sqrt(var + eps) * weight[j] + bias[j] for j in range(len(x))])


def ref_block(z: torch.Tensor, tokens: torch.Tensor, p: dict[str, torch.Tensor], heads: int):
    """One cross-attention block for ONE query vector z (D,) over ONE image's tokens (N, C)."""
    d = z.shape[0]
    dh = d // heads
    q = p["q.weight"] @ ref_layer_norm(z, p["query_norm.weight"], p["query_norm.bias"]) + p["q.bias"]
    keys, values = [], []
    for t in tokens:
        tn = ref_layer_norm(t, p["token_norm.weight"], p["token_norm.bias"])
        keys.append(p["k.weight"] @ tn + p["k.bias"])
        values.append(p["v.weight"] @ tn + p["v.bias"])
    out = torch.zeros(d, dtype=z.dtype)
    attn = torch.zeros(heads, len(tokens), dtype=z.dtype)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        logits = [float(q[sl] @ k[sl]) / math.sqrt(dh) for k in keys]
        top = max(logits)
        weights = [math.exp(s - top) for s in logits]
        total = sum(weights)
        for n, (w, v) in enumerate(zip(weights, values)):
            attn[h, n] = w / total
            out[sl] += w / total * v[sl]
    z = z + p["proj.weight"] @ out + p["proj.bias"]
    hidden = p["mlp.0.weight"] @ ref_layer_norm(z, p["mlp_norm.weight"], p["mlp_norm.bias"]) + p["mlp.0.bias"]
    hidden = torch.stack([0.5 * x * (1.0 + math.erf(float(x) / math.sqrt(2.0))) for x in hidden])  # exact GELU
    return z + p["mlp.3.weight"] @ hidden + p["mlp.3.bias"], attn


def ref_conditional(model: CrossImageAttentionMethod, emb: torch.Tensor, tokens: torch.Tensor):
    """z[a][i] = phi^N(E(I_i | I_a)) and the per-block attention, one pair at a time."""
    params = [{k: v.detach() for k, v in b.state_dict().items()} for b in model.cross_attention.blocks]
    heads = model.cross_attention.blocks[0].num_heads
    z = torch.zeros(len(tokens), len(emb), emb.shape[1], dtype=torch.float64)
    maps = [torch.zeros(len(tokens), heads, len(emb), tokens.shape[1], dtype=torch.float64) for _ in params]
    for a in range(len(tokens)):
        for i in range(len(emb)):
            cur = emb[i]
            for n, p in enumerate(params):
                cur, attn = ref_block(cur, tokens[a], p, heads)
                maps[n][a, :, i] = attn
            z[a, i] = cur
    return z, maps


def ref_multi_similarity(sim, pos, neg, alpha, beta, base, eps) -> float:
    total, anchors = 0.0, 0
    for r in range(sim.shape[0]):
        p_idx = [j for j in range(sim.shape[1]) if pos[r, j]]
        n_idx = [j for j in range(sim.shape[1]) if neg[r, j]]
        if not p_idx and not n_idx:
            continue
        anchors += 1
        if eps is not None:
            min_pos = min((float(sim[r, j]) for j in p_idx), default=math.inf)
            max_neg = max((float(sim[r, j]) for j in n_idx), default=-math.inf)
            p_idx = [j for j in p_idx if float(sim[r, j]) - eps < max_neg]
            n_idx = [j for j in n_idx if float(sim[r, j]) + eps > min_pos]
        loss = 0.0
        if p_idx:
            loss += math.log(1 + sum(math.exp(-alpha * (float(sim[r, j]) - base)) for j in p_idx)) / alpha
        if n_idx:
            loss += math.log(1 + sum(math.exp(beta * (float(sim[r, j]) - base)) for j in n_idx)) / beta
        total += loss
    return total / max(anchors, 1)


# ---------------------------------------------------------------------------- all pairs
def test_batched_conditional_embeddings_equal_a_per_pair_loop_float64() -> None:
    model = make().double()  # 6 blocks, 2 heads, D = 8; tokens of the tiny ResNet are 64-d
    assert model.num_blocks == 6
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(5, 8, generator=g, dtype=torch.float64)  # B_1 = 5
    tokens = torch.randn(4, 3, 64, generator=g, dtype=torch.float64)  # B_a = 4 images, N = 3 locations
    z, maps = model.conditional_embeddings(emb, tokens, return_attention=True)
    ref_z, ref_maps = ref_conditional(model, emb, tokens)
    assert z.shape == (4, 5, 8) and len(maps) == 6 and maps[0].shape == (4, 2, 5, 3)
    torch.testing.assert_close(z, ref_z, rtol=1e-10, atol=1e-10)
    for got, ref in zip(maps, ref_maps):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # Only the listed pairs (re-ranking path) give the same numbers.
    a_idx, i_idx = torch.tensor([0, 3, 2]), torch.tensor([4, 1, 2])
    torch.testing.assert_close(model.paired_conditional_embeddings(emb[i_idx], tokens[a_idx]), ref_z[a_idx, i_idx])


@pytest.mark.parametrize("mode", ["mutual", "anchor"])
def test_conditional_similarity_and_pair_scores_follow_the_definition(mode: str) -> None:
    model = make(pair_similarity=mode, num_blocks=2).double()
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(4, 8, generator=g, dtype=torch.float64)
    tokens = torch.randn(4, 3, 64, generator=g, dtype=torch.float64)
    ref_z, _ = ref_conditional(model, emb, tokens)
    ref = torch.zeros(4, 4, dtype=torch.float64)
    for a in range(4):
        for i in range(4):
            other = ref_z[i, a] if mode == "mutual" else emb[a]  # z(a|i) or phi(a)
            ref[a, i] = F.cosine_similarity(ref_z[a, i], other, dim=0)
    sim = model.conditional_similarity(emb, tokens)
    torch.testing.assert_close(sim, ref)
    if mode == "mutual":
        torch.testing.assert_close(sim, sim.T)
    q, c = torch.tensor([0, 0, 3]), torch.tensor([1, 2, 0])
    torch.testing.assert_close(model.pair_scores(emb[q], tokens[q], emb[c], tokens[c]), ref[q, c])


# ---------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("eps", [0.1, None])
def test_multi_similarity_on_a_similarity_matrix_matches_a_naive_loop(eps: float | None) -> None:
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(9, 9, generator=g, dtype=torch.float64) * 2 - 1  # asymmetric, like the anchor mode
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pos, neg = label_masks(labels)
    got = multi_similarity_loss(sim, pos, neg, alpha=2.0, beta=40.0, base=0.5, miner_epsilon=eps)
    ref = ref_multi_similarity(sim, pos, neg, 2.0, 40.0, 0.5, eps)
    assert abs(float(got) - ref) < 1e-12


def test_multi_similarity_on_cosine_matches_pytorch_metric_learning() -> None:
    """On plain cosine similarities the loss is the library's MS loss + MS miner (the `ms` baseline)."""
    from pytorch_metric_learning import losses, miners

    g = torch.Generator().manual_seed(4)
    emb = F.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(4).repeat_interleave(4)
    pos, neg = label_masks(labels)
    ours = multi_similarity_loss(emb @ emb.T, pos, neg, 2.0, 40.0, 0.5, 0.1)
    pml = losses.MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.5)(
        emb, labels, miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    )
    torch.testing.assert_close(ours, pml)


def test_training_loss_terms_and_weights() -> None:
    model = make(num_blocks=2)
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(4).repeat_interleave(2)}
    terms = model.training_loss(batch)
    assert {"loss", "ms_unconditional", "ms_conditional", "cond_sim_pos", "cond_sim_neg"} <= set(terms)
    torch.testing.assert_close(terms["loss"], terms["ms_unconditional"] + terms["ms_conditional"])
    baseline = make(num_blocks=0).training_loss(batch)
    assert set(baseline) == {"loss", "ms_unconditional"}
    with pytest.raises(ValueError, match="single view"):
        model.training_loss({"image": torch.randn(8, 2, 3, 16, 16), "label": batch["label"]})


def test_bad_configuration_names_the_fix() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        make(num_heads=3)
    with pytest.raises(ValueError, match="pair_similarity"):
        make(pair_similarity="shared")
    with pytest.raises(ValueError, match="needs num_blocks > 0"):
        make(num_blocks=0, rerank_k=5)


# ---------------------------------------------------------------------------- gradients
def _per_block_token_inputs(model: CrossImageAttentionMethod) -> list[torch.Tensor]:
    """Make each block read its own copy of E(I_a), so its gradient share can be read."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        x = args[0].clone()
        x.retain_grad()
        seen.append(x)
        return (x,)

    for block in model.cross_attention.blocks:
        block.token_norm.register_forward_pre_hook(hook)
    return seen


def _stem_gradient(model: CrossImageAttentionMethod) -> float:
    """|grad| of the encoder's first convolution: the gradient crossed the whole encoder.

    (timm zero-initialises the last BatchNorm of each residual branch, so some inner
    weights legitimately get a zero gradient at the first step.)
    """
    grad = model.encoder.model.conv1.weight.grad
    return 0.0 if grad is None else float(grad.abs().sum())


def test_gradients_reach_the_encoder_through_every_block() -> None:
    model = make(unconditional_weight=0.0)  # conditional loss only
    seen = _per_block_token_inputs(model)
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(4).repeat_interleave(2)}
    model.training_loss(batch)["loss"].backward()
    assert len(seen) == model.num_blocks == 6
    for n, x in enumerate(seen, start=1):
        assert x.grad is not None and x.grad.abs().sum() > 0, f"no gradient into E(I_a) through block {n}"
    assert _stem_gradient(model) > 0


def test_gradients_reach_the_encoder_through_the_unconditional_loss() -> None:
    model = make(conditional_weight=0.0)
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(4).repeat_interleave(2)}
    model.training_loss(batch)["loss"].backward()
    assert _stem_gradient(model) > 0
    assert all(p.grad is None for p in model.cross_attention.parameters())  # blocks unused


def test_checkpointed_blocks_give_the_same_gradients() -> None:
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(4).repeat_interleave(2)}
    grads = []
    for flag in (False, True):
        model = make(num_blocks=2, checkpoint_blocks=flag).double()
        model.training_loss({**batch, "image": batch["image"].double()})["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------- evaluation
def test_test_embeddings_are_unconditional_and_ignore_the_blocks() -> None:
    model = make().eval()
    images = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        before = model.embed(images)
        expected = F.normalize(model.project(model.encode(images).pooled), dim=-1)
        for p in model.cross_attention.parameters():
            p.add_(torch.randn_like(p))
        after = model.embed(images)
    torch.testing.assert_close(before, expected)
    torch.testing.assert_close(after, before)
    # Same encoder and head without any block: identical test embeddings (no extra compute at test).
    plain = make(num_blocks=0).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("cross_attention.")})
    with torch.no_grad():
        torch.testing.assert_close(plain.embed(images), before)
        out = model.validation_step({"image": images, "label": torch.zeros(6), "index": torch.arange(6),
                                     "is_query": torch.ones(6, dtype=torch.bool),
                                     "is_gallery": torch.ones(6, dtype=torch.bool)}, 0)
    torch.testing.assert_close(out["embeddings"], before)


def test_refine_is_off_by_default() -> None:
    model = make()
    emb = F.normalize(torch.randn(6, 8), dim=1)
    flags = torch.ones(6, dtype=torch.bool)
    assert model.refine(emb, flags, flags) is None


def test_rerank_orders_the_top_k_by_conditional_similarity() -> None:
    model = make(pair_similarity="anchor", rerank_k=3, rerank_list_length=5, rerank_batch_size=4).double().eval()
    g = torch.Generator().manual_seed(5)
    n = 9
    emb = torch.randn(n, 8, generator=g, dtype=torch.float64)
    tokens = torch.randn(n, 3, 64, generator=g, dtype=torch.float64)
    is_query = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    is_gallery = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    lists = model.neighbour_lists(emb, is_query, is_gallery)  # (5, 5)
    unit = F.normalize(emb, dim=1)
    queries = is_query.nonzero().squeeze(1)
    for row, q in enumerate(queries.tolist()):
        candidates = [j for j in range(n) if is_gallery[j] and j != q]
        ranked = sorted(candidates, key=lambda j: -float(unit[q] @ unit[j]))[:5]
        assert lists[row].tolist() == ranked
    with torch.no_grad():
        full = model.conditional_similarity(emb, tokens)  # (N, N), row = anchor (query)
        reranked = model.rerank(emb, tokens, queries, lists)
    for row, q in enumerate(queries.tolist()):
        top = sorted(lists[row, :3].tolist(), key=lambda j: -float(full[q, j]))
        assert reranked[row].tolist() == top + lists[row, 3:].tolist()


# ---------------------------------------------------------------------------- with the evaluation callback
@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.datamodules.fixtures import make_cub

    return make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


@pytest.mark.parametrize("rerank_k", [0, 4])
def test_refined_metrics_appear_only_with_reranking(rerank_k: int, cub_root: Path, tmp_path: Path) -> None:
    evaluation = pytest.importorskip("benchmark.evaluation")
    if not hasattr(evaluation, "RetrievalEvaluator"):
        pytest.skip("benchmark.evaluation has no RetrievalEvaluator yet")
    import lightning as L

    from datamodules.cub import CUB200

    dm = CUB200(root=str(cub_root), image_size=16, num_workers=0, eval_batch_size=128)
    with pytest.warns(UserWarning):
        dm.setup("test")
    model = make(rerank_k=rerank_k, rerank_list_length=20, num_classes=dm.num_train_classes)
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
        callbacks=[evaluation.RetrievalEvaluator()], default_root_dir=tmp_path, use_distributed_sampler=False,
    )
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    assert "test/R@1" in metrics
    refined = [k for k in metrics if k.startswith("test/refined/")]
    if rerank_k:
        assert "test/refined/R@1" in refined
    else:
        assert refined == []


def test_cpu_fit_on_the_embedded_default_improves_recall(tmp_path: Path) -> None:
    """`fit` through the CLI on the synthetic default (its recipe, 64 px): R@1 after training > before.

    The tiny CNN needs the recipe's 64 px (a 2x2 feature map); at 32 px its 1x1 map barely learns.
    """
    from benchmark.cli import main

    run = tmp_path / "run"
    args = [
        "fit", "--method", "cross_image_attention", "--backbone", "resnet_tiny_test", "--backbone.pretrained", "false",
        "--model.embedding_dim", "64", "--model.lr", "1e-3", "--trainer.max_epochs", "2",
        "--data.batches_per_epoch", "40", "--data.num_workers", "0",
        "--logger", "csv", "--run_dir", str(run), "--trainer.enable_progress_bar", "false",
    ]
    assert main(args) == 0
    val = json.loads((run / "metrics_val.json").read_text())["evaluations"]
    test = json.loads((run / "metrics_test.json").read_text())["evaluations"][-1]["metrics"]
    untrained = val[0]["metrics"]["R@1"]
    assert test["R@1"] > untrained + 0.03, (untrained, test["R@1"])


# ---------------------------------------------------------------------------- analysis figures
def test_gradient_recorder_logs_the_encoder_output_gradient(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from benchmark.analysis.cross_image_attention import FeatureGradientRecorder, plot_gradient_histograms

    model = make(num_blocks=2)
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):  # ResNet's forward_features ends with layer4
        output.retain_grad()
        captured.append(output)

    model.encoder.model.layer4.register_forward_hook(keep)
    recorder = FeatureGradientRecorder([3], max_values=10**9)
    recorder.on_train_epoch_start(SimpleNamespace(current_epoch=3, num_training_batches=1), model)
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(4).repeat_interleave(2)}
    model.training_loss(batch)["loss"].backward()
    recorder.on_train_epoch_end(SimpleNamespace(current_epoch=3), model)
    assert "forward_features" not in vars(model.encoder.model)  # unwrapped after the epoch
    expected = captured[0].grad.abs().flatten()
    expected = expected[expected > 0].log10().sort().values
    got = torch.from_numpy(recorder.log10_magnitudes(3)).sort().values
    torch.testing.assert_close(got, expected)
    assert recorder.total[3] == captured[0].numel()
    summary = plot_gradient_histograms(recorder, recorder, [3], tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0 and summary["3"]["baseline"]["values"] == len(got)


def test_attention_maps_and_triple_figure(tmp_path: Path) -> None:
    import numpy as np

    from benchmark.analysis.cross_image_attention import attention_maps, choose_triples, plot_triple

    model = make(num_blocks=4)
    images = torch.randn(3, 3, 32, 32)  # (I_a, I_1, I_2); the tiny ResNet gives a 1x1 map at 32 px
    maps, hw, sims = attention_maps(model, images, [2, 4])
    assert maps.shape == (2, 2, *hw) and sims.shape == (2,)
    np.testing.assert_allclose(maps.reshape(2, 2, -1).sum(-1), 1.0, rtol=1e-5)  # a distribution over E(I_a)
    with torch.no_grad():
        out = model.encode(images)
        emb = model.project(out.pooled)
        _, ref = model.conditional_embeddings(emb, out.tokens, return_attention=True)
    np.testing.assert_allclose(maps[1, 0].ravel(), ref[3][0, :, 1].mean(0).numpy(), rtol=1e-5)  # block 4, z(1|a)
    shown = np.random.default_rng(0).random((3, 32, 32, 3))
    plot_triple(shown, maps, [2, 4], tmp_path / "t.png", (0, 0, 1), sims)
    assert (tmp_path / "t.png").stat().st_size > 0
    labels = np.array([0, 0, 1, 1, 2])
    for a, i1, i2 in choose_triples(labels, 3, seed=1):
        assert labels[a] == labels[i1] and a != i1 and labels[a] != labels[i2]


def _analysis_fit_args(cub_root: Path) -> list[str]:
    return [
        "--data", "cub", "--data.root", str(cub_root), "--recipe", "none", "--backbone", "resnet_tiny_test",
        "--backbone.pretrained", "false", "--model.embedding_dim", "8", "--model.num_heads", "2",
        "--model.miner_epsilon", "null",  # same-class fixture images are identical: mining would find no pair
        "--data.image_size", "32", "--data.classes_per_batch", "4", "--data.samples_per_class", "2",
        "--data.batches_per_epoch", "2", "--data.num_workers", "0", "--logger", "none",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]


@pytest.mark.slow
def test_gradients_command_writes_its_figure(cub_root: Path, tmp_path: Path) -> None:
    from benchmark.analysis.cross_image_attention import main

    assert main(["gradients", "--epochs", "0,1", "--out", str(tmp_path), *_analysis_fit_args(cub_root)]) == 0
    assert (tmp_path / "cia_gradients.png").stat().st_size > 0
    summary = json.loads((tmp_path / "cia_gradients.json").read_text())
    assert set(summary) == {"0", "1"} and summary["1"]["cross_image_attention"]["values"] > 0


@pytest.mark.slow
def test_attention_command_writes_its_figures(cub_root: Path, tmp_path: Path) -> None:
    from benchmark.analysis.cross_image_attention import main

    fit_args = [*_analysis_fit_args(cub_root), "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"]
    with pytest.raises(SystemExit, match="outside 1..6"):  # checked before any training
        main(["attention", "--blocks", "2,7", "--out", str(tmp_path), *fit_args])
    assert main(["attention", "--num-triples", "2", "--blocks", "2,6", "--out", str(tmp_path), *fit_args]) == 0
    assert len(list(tmp_path.glob("cia_attention_test_*.png"))) == 2
