"""Cross-Image-Attention: the all-pairs conditional embeddings, the loss, gradients, evaluation.

References are naive float64 loops written from the equations (one pair, one head, one
location at a time), independent of the batched implementation.

The tiny test ResNet (``resnet_tiny_test``) has output stride 32: at 16 or 32 px its token
grid is 1x1, every attention weight is exactly 1 and the attention logits get no gradient.
Every test about attention therefore uses at least a 3x3 grid (``GRID_PX`` = 96 px, or a
96 x 128 image for a 3x4 grid) or random (A, N, C) token tensors with N >= 4, and randomised
block parameters (:func:`randomise_blocks`) so that the attention is far from uniform.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmark.core.errors import ConfigError
from benchmark.nn.backbones import BackboneConfig
from methods.cross_image_attention import (
    CrossImageAttention,
    CrossImageAttentionMethod,
    label_masks,
    multi_similarity_loss,
)
from methods.cross_image_attention import (
    ImageCrossAttentionBlock as CrossAttentionBlock,
)

TINY = dict(backbone=BackboneConfig("resnet_tiny_test", pretrained=False), embedding_dim=8, image_size=16)
GRID_PX = 96  # resnet_tiny_test has output stride 32: 96 px -> a 3x3 token grid (16 or 32 px -> 1x1)


def make(**kwargs) -> CrossImageAttentionMethod:
    torch.manual_seed(0)
    return CrossImageAttentionMethod(**{**TINY, "num_heads": 2, **kwargs})


def randomise_blocks(blocks: torch.nn.Module, seed: int = 0, logit_gain: float = 3.0) -> None:
    """Parameters away from the initialisation, so that the attention is far from uniform.

    timm's N(0, 0.02) init makes every logit ~1e-2 and the attention ~uniform, where a wrong
    scale or a missing normalisation changes little. Here the query/key projections get
    ``logit_gain / sqrt(fan_in)`` weights (logits of order 1..10), every other Linear
    ``1 / sqrt(fan_in)``, biases and LayerNorm affine parameters random.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in blocks.named_modules():
            if isinstance(m, torch.nn.Linear):
                gain = logit_gain if name.split(".")[-1] in ("q", "k") else 1.0
                w = torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) * gain / math.sqrt(m.in_features)
                m.weight.copy_(w)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64) * 0.1)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64) * 0.2)


# ---------------------------------------------------------------------------- naive references
def ref_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of ONE vector (C,) from its definition (biased variance)."""
    mean = x.sum() / len(x)
    var = ((x - mean) ** 2).sum() / len(x)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


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
@pytest.mark.usefixtures("one_thread")
def test_batched_conditional_embeddings_equal_a_per_pair_loop_float64() -> None:
    """All-pairs z[a, i] and every block's (A, H, Q, N) attention equal the per-pair float64 loop.

    9 locations (a 3x3 grid) and randomised blocks: the attention is far from uniform, so a
    wrong scale, a softmax over the wrong axis or a head mix-up changes the numbers.
    """
    model = make().double()  # 6 blocks, 2 heads, D = 8; tokens of the tiny ResNet are 64-d
    randomise_blocks(model.cross_attention)
    assert model.num_blocks == 6
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(5, 8, generator=g, dtype=torch.float64)  # B_1 = 5
    tokens = torch.randn(4, 9, 64, generator=g, dtype=torch.float64)  # B_a = 4 images, N = 9 locations (3x3)
    z, maps = model.conditional_embeddings(emb, tokens, return_attention=True)
    ref_z, ref_maps = ref_conditional(model, emb, tokens)
    assert z.shape == (4, 5, 8) and len(maps) == 6 and maps[0].shape == (4, 2, 5, 9)
    for ref in ref_maps:  # the reference attention is far from uniform (1/9 = 0.11)
        assert float(ref.amax()) > 0.5 and float(ref.amin()) < 0.05
    torch.testing.assert_close(z, ref_z, rtol=1e-10, atol=1e-10)
    for got, ref in zip(maps, ref_maps):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # Only the listed pairs (re-ranking path) give the same numbers.
    a_idx, i_idx = torch.tensor([0, 3, 2]), torch.tensor([4, 1, 2])
    torch.testing.assert_close(model.paired_conditional_embeddings(emb[i_idx], tokens[a_idx]), ref_z[a_idx, i_idx])


def ref_block_matrix(
    block: CrossAttentionBlock, z: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's equations in matrix form, float64: (A, Q, D) queries, (A, N, C) tokens.

    ``z + proj(concat_h softmax(Q_h K_h^T / sqrt(D/H)) V_h)``, then ``+ MLP(LN(z))`` (exact
    GELU), with ``Q = LN_q(z) W_q^T + b_q``, ``K, V = LN_t(tokens) W^T + b``; the softmax is
    written out as ``exp(s - max) / sum``. Returns the (A, Q, D) output and (A, H, Q, N) weights.
    """
    p = {k: v.detach().double() for k, v in block.state_dict().items()}

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
        return (x - mean) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    heads, d = block.num_heads, z.shape[-1]
    dh = d // heads
    q = layer_norm(z, "query_norm") @ p["q.weight"].T + p["q.bias"]  # (A, Q, D)
    t = layer_norm(tokens, "token_norm")  # (A, N, C)
    k = t @ p["k.weight"].T + p["k.bias"]  # (A, N, D)
    v = t @ p["v.weight"].T + p["v.bias"]  # (A, N, D)
    outs, weights = [], []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)  # (A, Q, N)
        e = torch.exp(logits - logits.amax(-1, keepdim=True))
        w = e / e.sum(-1, keepdim=True)  # (A, Q, N): a distribution over the N locations
        weights.append(w)
        outs.append(w @ v[..., sl])  # (A, Q, N) @ (A, N, dh) -> (A, Q, dh)
    z = z + torch.cat(outs, -1) @ p["proj.weight"].T + p["proj.bias"]
    if block.mlp is not None:
        hidden = layer_norm(z, "mlp_norm") @ p["mlp.0.weight"].T + p["mlp.0.bias"]
        hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
        z = z + hidden @ p["mlp.3.weight"].T + p["mlp.3.bias"]
    return z, torch.stack(weights, 1)  # (A, Q, D), (A, H, Q, N)


@pytest.mark.parametrize(("heads", "mlp_ratio"), [(1, 4.0), (2, 0.0), (4, 2.0)])
@pytest.mark.usefixtures("one_thread")
def test_cross_attention_block_on_random_tokens_equals_the_matrix_reference(heads: int, mlp_ratio: float) -> None:
    """One block on random (A, N, C) tokens: output and attention equal softmax(QK^T/sqrt(d_h)) V, float64.

    N = 12 locations (a 3x4 grid) and logits of order 1..10: a missing or wrong scale, an
    unnormalised or wrongly-normalised softmax, or heads mixed up fail by far more than 1e-10.
    """
    torch.manual_seed(heads)
    block = CrossAttentionBlock(dim=8, token_dim=5, num_heads=heads, mlp_ratio=mlp_ratio).double().eval()
    randomise_blocks(block, seed=heads)
    g = torch.Generator().manual_seed(10 + heads)
    z = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)  # (A, Q, D)
    tokens = torch.randn(3, 12, 5, generator=g, dtype=torch.float64)  # (A, N, C)
    out, attn = block(z, tokens, return_attention=True)
    ref_out, ref_attn = ref_block_matrix(block, z, tokens)
    assert attn.shape == (3, heads, 2, 12)
    assert float(ref_attn.amax()) > 0.5  # far from uniform (1/12): the logits matter
    torch.testing.assert_close(attn, ref_attn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    # The per-location loop reference (another formulation) agrees on one (query, image) pair.
    if mlp_ratio == 4.0:
        loop_z, loop_attn = ref_block(z[1, 0], tokens[1], {k: v.detach() for k, v in block.state_dict().items()}, heads)
        torch.testing.assert_close(out[1, 0], loop_z, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(attn[1, :, 0], loop_attn, rtol=1e-10, atol=1e-12)


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


@pytest.mark.usefixtures("one_thread")
def test_training_loss_terms_and_weights() -> None:
    """Each loss term equals its float64 reference on the model's own encoder output (3x3 grid).

    ``ms_conditional`` = the MS loss (naive loop) on cosine similarities of the per-pair
    conditional embeddings (naive loop over pairs, blocks, heads, locations); ``ms_unconditional``
    = the MS loss on the unconditional cosines; ``loss`` = their weighted sum.
    """
    model = make(num_blocks=2, conditional_weight=0.7, unconditional_weight=1.3).double()
    randomise_blocks(model.cross_attention)
    g = torch.Generator().manual_seed(6)
    images = torch.randn(6, 3, GRID_PX, GRID_PX, generator=g, dtype=torch.float64)  # (B, 3, 96, 96)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    terms = {k: v.detach() for k, v in model.training_loss({"image": images, "label": labels}).items()}
    assert {"loss", "ms_unconditional", "ms_conditional", "cond_sim_pos", "cond_sim_neg"} <= set(terms)
    with torch.no_grad():  # the same forward (train-mode BatchNorm: batch statistics, deterministic)
        out = model.encode(images)
        emb = model.project(out.pooled)  # (B, D)
    assert out.hw == (3, 3) and out.tokens.shape == (6, 9, 64)
    ref_z, _ = ref_conditional(model, emb, out.tokens)  # (B_a, B_1, D)
    ref_sim = torch.zeros(6, 6, dtype=torch.float64)
    for a in range(6):
        for i in range(6):  # mutual: cos(z(i|a), z(a|i))
            ref_sim[a, i] = F.cosine_similarity(ref_z[a, i], ref_z[i, a], dim=0)
    pos, neg = label_masks(labels)
    ref_cond = ref_multi_similarity(ref_sim, pos, neg, 2.0, 40.0, 0.5, 0.1)
    unit = F.normalize(emb, dim=1)
    ref_uncond = ref_multi_similarity(unit @ unit.T, pos, neg, 2.0, 40.0, 0.5, 0.1)
    assert abs(float(terms["ms_conditional"]) - ref_cond) < 1e-9
    assert abs(float(terms["ms_unconditional"]) - ref_uncond) < 1e-9
    assert abs(ref_cond - ref_uncond) > 1e-3  # the blocks change the similarities: the terms differ
    assert abs(float(terms["loss"]) - (0.7 * ref_cond + 1.3 * ref_uncond)) < 1e-9
    # (the logged similarity means are cast to float32)
    assert abs(float(terms["cond_sim_pos"]) - float(ref_sim[pos].mean())) < 1e-6
    assert abs(float(terms["cond_sim_neg"]) - float(ref_sim[neg].mean())) < 1e-6
    baseline = make(num_blocks=0).training_loss({"image": images.float(), "label": labels})
    assert set(baseline) == {"loss", "ms_unconditional"}
    with pytest.raises(ValueError, match="single view"):
        model.training_loss({"image": torch.randn(8, 2, 3, 16, 16), "label": labels})


def test_bad_configuration_names_the_fix() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        make(num_heads=3)
    with pytest.raises(ValueError, match="pair_similarity"):
        make(pair_similarity="shared")
    with pytest.raises(ConfigError, match="needs --model.num_blocks > 0"):
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


def _attention_logit_grads(block: CrossAttentionBlock) -> float:
    """|grad| of the query and key projections: nonzero only if the attention logits matter."""
    grads = [block.q.weight.grad, block.k.weight.grad]
    return min(0.0 if g is None else float(g.abs().sum()) for g in grads)


@pytest.mark.usefixtures("one_thread")
def test_gradients_reach_the_encoder_through_every_block() -> None:
    """At 96 px (3x3 grid) the conditional loss reaches E(I_a) through each block and the logits.

    At 16 px the grid is 1x1: the softmax is constant and W_q, W_k get exactly zero gradient,
    so every block's query/key projections must receive a gradient here.
    """
    model = make(unconditional_weight=0.0)  # conditional loss only
    seen = _per_block_token_inputs(model)
    batch = {"image": torch.randn(8, 3, GRID_PX, GRID_PX), "label": torch.arange(4).repeat_interleave(2)}
    model.training_loss(batch)["loss"].backward()
    assert len(seen) == model.num_blocks == 6
    for n, x in enumerate(seen, start=1):
        assert x.shape[1] == 9, "the blocks must see a 3x3 token grid"
        assert x.grad is not None and x.grad.abs().sum() > 0, f"no gradient into E(I_a) through block {n}"
    for n, block in enumerate(model.cross_attention.blocks, start=1):
        assert _attention_logit_grads(block) > 0, f"no gradient into the attention logits of block {n}"
    assert _stem_gradient(model) > 0


@pytest.mark.usefixtures("one_thread")
def test_attention_logit_gradients_match_finite_differences_of_the_reference() -> None:
    """d/dW_q, d/db_q, d/dW_k of a scalar of the stack's output = central differences of the reference.

    Tiny float64 instance: 2 blocks, 2 heads, D = 4, 5 locations of 3 channels. The
    reference is the equations in matrix form (:func:`ref_block_matrix`, block after block),
    so this checks the gradient of the attention logits against the equations, not only
    autograd's self-consistency; gradcheck then checks the batched block's gradient w.r.t.
    its query, tokens and W_q, W_k.
    """
    torch.manual_seed(0)
    stack = CrossImageAttention(2, dim=4, token_dim=3, num_heads=2, mlp_ratio=2.0).double()
    randomise_blocks(stack, seed=3)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)  # (A, Q, D)
    tokens = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)  # (A, N, C)
    weight = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)  # a random linear read-out of the output

    def ref_scalar() -> float:
        cur = z
        for b in stack.blocks:
            cur, _ = ref_block_matrix(b, cur, tokens)  # (A, Q, D)
        return float((weight * cur).sum())

    out, _ = stack(z, tokens)
    (weight * out).sum().backward()
    eps = 1e-6
    for block in stack.blocks:
        for param in (block.q.weight, block.q.bias, block.k.weight):
            fd = torch.zeros_like(param)
            with torch.no_grad():
                for idx in range(param.numel()):
                    flat = param.view(-1)
                    old = float(flat[idx])
                    flat[idx] = old + eps
                    up = ref_scalar()
                    flat[idx] = old - eps
                    down = ref_scalar()
                    flat[idx] = old
                    fd.view(-1)[idx] = (up - down) / (2 * eps)
            assert float(fd.abs().sum()) > 1e-2  # the logits matter at this instance
            torch.testing.assert_close(param.grad, fd, rtol=1e-5, atol=1e-7)

    block = stack.blocks[0]
    names = ("q.weight", "k.weight")
    base = {k: v.detach() for k, v in block.named_parameters()}

    def block_output(zq: torch.Tensor, toks: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        params = {**base, **dict(zip(names, (wq, wk)))}
        return torch.func.functional_call(block, params, (zq, toks))[0]

    inputs = tuple(x.detach().clone().requires_grad_(True) for x in (z, tokens, base[names[0]], base[names[1]]))
    assert torch.autograd.gradcheck(block_output, inputs, eps=1e-6, atol=1e-6)


def test_gradients_reach_the_encoder_through_the_unconditional_loss() -> None:
    model = make(conditional_weight=0.0)
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(4).repeat_interleave(2)}
    model.training_loss(batch)["loss"].backward()
    assert _stem_gradient(model) > 0
    assert all(p.grad is None for p in model.cross_attention.parameters())  # blocks unused


@pytest.mark.usefixtures("one_thread")
def test_checkpointed_blocks_give_the_same_gradients() -> None:
    """Block checkpointing recomputes the blocks in backward: identical float64 gradients.

    At 96 px (3x3 grid), so the attention's query/key projections get a nonzero gradient
    that both paths must reproduce (at 1x1 it is exactly zero in both).
    """
    images = torch.randn(8, 3, GRID_PX, GRID_PX, dtype=torch.float64)
    batch = {"image": images, "label": torch.arange(4).repeat_interleave(2)}
    grads = []
    for flag in (False, True):
        model = make(num_blocks=2, checkpoint_blocks=flag).double()
        randomise_blocks(model.cross_attention)
        model.training_loss(batch)["loss"].backward()
        assert all(_attention_logit_grads(b) > 0 for b in model.cross_attention.blocks)
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
    evaluation = pytest.importorskip("benchmark.engine.evaluation")
    if not hasattr(evaluation, "RetrievalEvaluator"):
        pytest.skip("benchmark.engine.evaluation has no RetrievalEvaluator yet")
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


@pytest.mark.slow  # 42 s on 2 cores; the float64 references above check the numbers, this the learning
def test_cpu_fit_on_the_embedded_default_improves_recall(tmp_path: Path) -> None:
    """`fit` through the CLI on the synthetic default (its recipe, 64 px): R@1 after training > before.

    The tiny CNN needs the recipe's 64 px (a 2x2 feature map); at 32 px its 1x1 map barely learns.
    """
    from benchmark.app.cli import main

    run = tmp_path / "run"
    args = [
        "fit", "--method", "cross_image_attention", "--backbone", "resnet_tiny_test", "--backbone.pretrained", "false",
        "--model.embedding_dim", "64", "--model.lr", "1e-3", "--trainer.max_epochs", "2",
        "--data.batches_per_epoch", "40", "--data.num_workers", "0", "--trainer.check_val_every_n_epoch", "10",
        "--logger", "csv", "--run_dir", str(run), "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true",
    ]  # validation before training and the test after it; none in between (3,000 images each)
    assert main(args) == 0
    val = json.loads((run / "metrics_val.json").read_text())["evaluations"]
    test = json.loads((run / "metrics_test.json").read_text())["evaluations"][-1]["metrics"]
    untrained = val[0]["metrics"]["R@1"]
    assert test["R@1"] > untrained + 0.03, (untrained, test["R@1"])


# ---------------------------------------------------------------------------- analysis figures
def test_gradient_recorder_logs_the_encoder_output_gradient(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from companions.cross_image_attention_analysis import FeatureGradientRecorder, plot_gradient_histograms

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


@pytest.mark.usefixtures("one_thread")
def test_attention_maps_and_triple_figure(tmp_path: Path) -> None:
    """The figure's maps equal a float64 reference built from the encoder's feature map itself.

    96 x 128 px images give a 3x4 token grid (at 16/32 px the grid is 1x1 and every map is 1).
    The reference flattens ``forward_features``' (C, 3, 4) map row-major by hand, runs the
    per-pair loop, averages the heads and puts location (y, x) at [y, x]: this checks the
    attention values, the head average, the block numbering and the grid layout (a transposed
    3x4 map would not even have the right shape). The two similarities are the method's
    mutual pair similarity with I_a as the anchor.
    """
    import numpy as np

    from companions.cross_image_attention_analysis import attention_maps, choose_triples, plot_triple

    model = make(num_blocks=4).double()
    randomise_blocks(model.cross_attention)
    g = torch.Generator().manual_seed(8)
    images = torch.randn(3, 3, 96, 128, generator=g, dtype=torch.float64)  # (I_a, I_1, I_2)
    maps, hw, sims = attention_maps(model, images, [2, 4])
    assert hw == (3, 4) and maps.shape == (2, 2, 3, 4) and sims.shape == (2,)
    with torch.no_grad():  # attention_maps put the model in eval mode
        fmap = model.encoder.model.forward_features(images)  # (3, 64, 3, 4)
        tokens = torch.stack([fmap[:, :, y, x] for y in range(3) for x in range(4)], 1)  # (3, 12, 64) row-major
        pooled = fmap.mean((2, 3))  # the preset's average pooling
        emb = model.project(pooled)  # (3, D)
    ref_z, ref_maps = ref_conditional(model, emb, tokens)  # z[a][i], maps[n] (A, H, B_1, N)
    for row, block in enumerate([2, 4]):
        for col, i in enumerate([1, 2]):  # z(1|a), z(2|a) over E(I_a), a = 0
            expected = ref_maps[block - 1][0, :, i].mean(0).view(3, 4)  # heads averaged, (y, x)
            np.testing.assert_allclose(maps[row, col], expected.numpy(), rtol=1e-5, atol=1e-7)
            assert float(expected.max() - expected.min()) > 0.05  # a map that varies over the grid
    expected_sims = [float(F.cosine_similarity(ref_z[0, i], ref_z[i, 0], dim=0)) for i in (1, 2)]
    np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-7)
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
    from companions.cross_image_attention_analysis import main

    assert main(["gradients", "--epochs", "0,1", "--out", str(tmp_path), *_analysis_fit_args(cub_root)]) == 0
    assert (tmp_path / "cia_gradients.png").stat().st_size > 0
    summary = json.loads((tmp_path / "cia_gradients.json").read_text())
    assert set(summary) == {"0", "1", "baseline"} and summary["1"]["cross_image_attention"]["values"] > 0
    assert summary["baseline"]["kind"] == "matched"


@pytest.mark.slow
def test_attention_command_writes_its_figures(cub_root: Path, tmp_path: Path) -> None:
    from companions.cross_image_attention_analysis import main

    fit_args = [*_analysis_fit_args(cub_root), "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"]
    with pytest.raises(SystemExit, match="outside 1..6"):  # checked before any training
        main(["attention", "--blocks", "2,7", "--out", str(tmp_path), *fit_args])
    assert main(["attention", "--num-triples", "2", "--blocks", "2,6", "--out", str(tmp_path), *fit_args]) == 0
    assert len(list(tmp_path.glob("cia_attention_test_*.png"))) == 2
