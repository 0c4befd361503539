"""benchmark.nn.attention against a float64 naive reference (explicit loops over heads/queries)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmark.nn.attention import Attention, attend, merge_heads, split_heads

B, L, S, H, E = 2, 5, 7, 3, 4  # batch, queries, keys, heads, per-head size


def naive(q, k, v, key_mask=None, attn_mask=None, zero_logit=False, scale=None):
    """(B, H, L, E), (B, H, S, E), (B, H, S, Ev) -> output (B, H, L, Ev), weights (B, H, L, S), float64 loops."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, lq, e = q.shape
    s = k.shape[2]
    scale = 1 / math.sqrt(e) if scale is None else scale
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(b, h, lq, s, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                allowed = [
                    j for j in range(s)
                    if (key_mask is None or key_mask[bi, j]) and (attn_mask is None or attn_mask[bi, hi, i, j])
                ]
                logits = {j: float(q[bi, hi, i] @ k[bi, hi, j]) * scale for j in allowed}
                top = max(list(logits.values()) + ([0.0] if zero_logit else []))
                denom = sum(math.exp(x - top) for x in logits.values()) + (math.exp(-top) if zero_logit else 0.0)
                for j, x in logits.items():
                    weights[bi, hi, i, j] = math.exp(x - top) / denom
                    out[bi, hi, i] += weights[bi, hi, i, j] * v[bi, hi, j]
    return out, weights


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(B, H, L, E, generator=g, dtype=torch.float64)  # logits of order 1..10
    k = torch.randn(B, H, S, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, S, 6, generator=g, dtype=torch.float64)
    key_mask = torch.rand(B, S, generator=g) < 0.7
    key_mask[:, 0] = True  # every query keeps a key
    attn_mask = torch.rand(B, H, L, S, generator=g) < 0.8
    attn_mask[..., 1] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), key_mask, attn_mask


@pytest.mark.parametrize("zero_logit", [False, True])
@pytest.mark.parametrize("masks", ["none", "key", "both"])
def test_both_paths_match_the_float64_reference(zero_logit: bool, masks: str) -> None:
    q, k, v, key_mask, attn_mask = inputs(torch.float64)
    key_mask = key_mask if masks != "none" else None
    attn_mask = attn_mask if masks == "both" else None
    ref_out, ref_w = naive(q, k, v, key_mask, attn_mask, zero_logit)
    assert float(ref_w.amax()) > 0.5  # far from uniform
    fast, none = attend(q, k, v, key_mask, attn_mask, zero_logit)
    assert none is None
    explicit, w = attend(q, k, v, key_mask, attn_mask, zero_logit, return_weights=True)
    torch.testing.assert_close(fast, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(explicit, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    if key_mask is not None:
        assert torch.all(w.masked_select(~key_mask[:, None, None, :].expand_as(w)) == 0)
    sums = w.sum(-1)
    if zero_logit:  # the null key takes some mass
        assert torch.all(sums < 1)
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("zero_logit", [False, True])
def test_sdpa_path_equals_explicit_path_in_float32_values_and_gradients(zero_logit: bool) -> None:
    q, k, v, key_mask, _ = inputs(torch.float32, seed=1)
    grads = []
    outs = []
    for return_weights in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, _ = attend(*leaves, key_mask=key_mask, zero_logit=zero_logit, return_weights=return_weights)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_zero_logit_equals_a_null_key_with_zero_value() -> None:
    """exp(s_j) / (1 + sum exp(s)) is plain attention over one more key whose logit is 0 and value 0."""
    q, k, v, _, _ = inputs(torch.float64, seed=2)
    out, w = attend(q, k, v, zero_logit=True, return_weights=True)
    k0 = torch.cat([k, torch.zeros(B, H, 1, E, dtype=k.dtype)], 2)
    v0 = torch.cat([v, torch.zeros(B, H, 1, v.shape[-1], dtype=v.dtype)], 2)
    ref_out, ref_w = naive(q, k0, v0)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, ref_w[..., :S], rtol=1e-10, atol=1e-12)
    scores = q @ k.transpose(-1, -2) / math.sqrt(E)
    torch.testing.assert_close(w, scores.exp() / (1 + scores.exp().sum(-1, keepdim=True)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("return_weights", [False, True])
def test_module_splits_and_merges_heads(return_weights: bool) -> None:
    q, k, v, key_mask, _ = inputs(torch.float64, seed=3)
    module = Attention(H).eval()
    out, w = module(merge_heads(q), merge_heads(k), merge_heads(v), key_mask=key_mask, return_weights=return_weights)
    ref_out, ref_w = naive(q, k, v, key_mask)
    assert out.shape == (B, L, H * 6)
    torch.testing.assert_close(split_heads(out, H), ref_out, rtol=1e-10, atol=1e-12)
    if return_weights:
        torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(module.weights(merge_heads(q), merge_heads(k), key_mask), ref_w)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        module(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


def test_keys_shared_by_every_batch_entry_broadcast() -> None:
    """One key/value set for the whole batch (DMCAC's full retrieval): (S, H*E) keys, (B, S) mask."""
    q, k, v, key_mask, _ = inputs(torch.float64, seed=4)
    k1, v1 = k[:1], v[:1]  # (1, H, S, E)
    module = Attention(H)
    for return_weights in (False, True):
        out, _ = module(merge_heads(q), merge_heads(k1)[0], merge_heads(v1)[0], key_mask, return_weights=return_weights)
        ref_out, _ = naive(q, k1.expand_as(k), v1.expand_as(v), key_mask)
        torch.testing.assert_close(split_heads(out, H), ref_out, rtol=1e-10, atol=1e-12)


def test_dropout_acts_only_in_training() -> None:
    q, k, v, _, _ = inputs(torch.float32, seed=5)
    module = Attention(H, dropout=0.5)
    args = (merge_heads(q), merge_heads(k), merge_heads(v))
    torch.testing.assert_close(module.eval()(*args)[0], Attention(H)(*args)[0])
    torch.manual_seed(0)
    assert not torch.allclose(module.train()(*args)[0], Attention(H)(*args)[0])
