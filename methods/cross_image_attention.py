"""Cross-Image-Attention: conditional embeddings for training, unconditional at test.

Kotovenko, Ma, Milbich, Ommer, "Cross-Image-Attention for Conditional Embeddings in Deep
Metric Learning", CVPR 2023. During training the embedding of an image I_1 is *conditioned*
on the image I_a it is compared with: starting from the unconditional embedding
``phi(E(I_1))``, a stack of cross-attention blocks lets it query the spatial features
``E(I_a)`` (keys and values) and adds a residual update per block,
``phi^n(E(I_1 | I_a))``. Every block reads ``E(I_a)``, so the encoder receives gradients
from every block instead of only through the lossy global pooling. At test time the blocks
are dropped: retrieval uses the unconditional ``phi(E(I))`` (no extra parameters or compute).

The main paper's block design, loss and pairing are not public (see
docs/methods/cross_image_attention.md for every choice made here); they are configuration:

* a pre-LayerNorm cross-attention block (multi-head attention of the query over the
  LayerNorm-ed spatial tokens, then an MLP, both residual);
* conditional embeddings for all ordered pairs ``(i | a)`` of the batch at once, shaped as
  ``(B_a, B_1, D)`` queries over ``(B_a, N, C)`` keys/values: one attention call per block;
* a Multi-Similarity loss on the conditional pair similarities
  (``pair_similarity="mutual"``: ``cos(z(i|a), z(a|i))``; ``"anchor"``: ``cos(z(i|a), phi(a))``)
  plus a Multi-Similarity loss on the unconditional embeddings;
* optional test-time re-ranking of each query's top-k with the conditional similarity
  (``rerank_k > 0``), reported by the evaluation callback as refined metrics.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmark.core.contracts import RankedLists, register_method
from benchmark.core.errors import ConfigError
from benchmark.core.validation import check_choice
from benchmark.nn.attention import attend, merge_heads, split_heads
from benchmark.nn.neighbours import exact_knn
from methods.base import RetrievalMethod

PairSimilarity = Literal["mutual", "anchor"]


# ---------------------------------------------------------------------------- the blocks
class ImageCrossAttentionBlock(nn.Module):
    """One conditioning step: queries (embeddings) attend over another image's spatial tokens.

    ``z <- z + Attn(LN(z), LN(tokens))`` then ``z <- z + MLP(LN(z))`` (pre-LN, as in ViTs,
    so the residual stream starts exactly at the unconditional embedding).

    Args:
        dim: embedding size D (queries and the residual stream).
        token_dim: channel size C of the encoder's spatial tokens (keys and values).
        num_heads: attention heads; ``dim`` must be divisible by it.
        mlp_ratio: hidden size of the MLP as a multiple of ``dim``; 0 drops the MLP.
        dropout: dropout on the attention weights and the residual branches.
    """

    def __init__(self, dim: int, token_dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(
                f"Cross-attention width {dim} is not divisible by num_heads={num_heads}; "
                "pick num_heads dividing the embedding size (e.g. --model.num_heads 1)."
            )
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.query_norm = nn.LayerNorm(dim)
        self.token_norm = nn.LayerNorm(token_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(token_dim, dim)
        self.v = nn.Linear(token_dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.drop = nn.Dropout(dropout)
        hidden = int(round(dim * mlp_ratio))
        self.mlp: nn.Module | None = None
        if hidden > 0:
            self.mlp_norm = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's transformer initialisation: N(0, 0.02) truncated weights, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, N, C) tokens of the conditioning images -> keys, values (A, H, N, D/H)."""
        t = self.token_norm(tokens)
        return split_heads(self.k(t), self.num_heads), split_heads(self.v(t), self.num_heads)  # (A, H, N, dh) each

    def forward(
        self, z: torch.Tensor, tokens: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Condition (A, Q, D) queries on the (A, N, C) tokens of their A conditioning images.

        Row ``a`` of ``z`` holds the Q embeddings conditioned on image ``a``; keys and values
        are computed once per conditioning image, not once per pair. Returns the updated
        (A, Q, D) embeddings and, if asked, the (A, H, Q, N) attention weights.
        """
        k, v = self.keys_values(tokens)  # (A, H, N, dh) each
        q = split_heads(self.q(self.query_norm(z)), self.num_heads)  # (A, H, Q, dh)
        # softmax over the N spatial locations of the conditioning image (SDPA unless the maps are asked for)
        dropout = self.attn_drop.p if self.training else 0.0
        out, attn = attend(q, k, v, dropout_p=dropout, return_weights=return_attention)  # (A, H, Q, dh)
        z = z + self.drop(self.proj(merge_heads(out)))  # (A, Q, D)
        if self.mlp is not None:
            z = z + self.drop(self.mlp(self.mlp_norm(z)))
        return z, (attn if return_attention else None)


class CrossImageAttention(nn.Module):
    """A stack of :class:`ImageCrossAttentionBlock`, each fed the conditioning image's tokens.

    Args:
        num_blocks: blocks N in the stack.
        checkpoint_blocks: recompute each block in backward (trades compute for the
            O(B^2 D) activation memory of the all-pairs computation).
        **block_kwargs: :class:`ImageCrossAttentionBlock` arguments.
    """

    def __init__(self, num_blocks: int, dim: int, token_dim: int, checkpoint_blocks: bool = False, **block_kwargs: Any):
        super().__init__()
        self.blocks = nn.ModuleList(ImageCrossAttentionBlock(dim, token_dim, **block_kwargs) for _ in range(num_blocks))
        self.checkpoint_blocks = checkpoint_blocks

    def forward(
        self, z: torch.Tensor, tokens: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(A, Q, D) starting embeddings conditioned on (A, N, C) tokens -> (A, Q, D), maps.

        ``maps`` holds one (A, H, Q, N) attention tensor per block when ``return_attention``.
        """
        maps: list[torch.Tensor] = []
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled() and not return_attention:
                z = checkpoint(lambda x, t, b=block: b(x, t)[0], z, tokens, use_reentrant=False)
            else:
                z, attn = block(z, tokens, return_attention)
                if attn is not None:
                    maps.append(attn)
        return z, maps


def pair_similarity_matrix(z: torch.Tensor, embeddings: torch.Tensor, mode: PairSimilarity) -> torch.Tensor:
    """(B, B, D) all-pairs conditional embeddings ``z[a, i] = z(i|a)`` -> (B, B) similarities ``S[a, i]``.

    ``mutual``: ``cos(z(i|a), z(a|i))``; ``anchor``: ``cos(z(i|a), phi(a))`` with the (B, D)
    unconditional ``embeddings`` phi.
    """
    z = F.normalize(z, dim=-1)
    if mode == "mutual":
        return (z * z.transpose(0, 1)).sum(-1)  # <z[a, i], z[i, a]> -> (B, B)
    anchors = F.normalize(embeddings, dim=-1)  # (B, D)
    return torch.einsum("aid,ad->ai", z, anchors)  # (B_a, B_1, D) x (B_a, D) -> (B_a, B_1)


# ---------------------------------------------------------------------------- the loss
def label_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) x (K,) labels -> positive and negative (R, K) masks; the diagonal is no pair."""
    ref_labels = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref_labels[None, :]  # (R, K)
    not_self = ~torch.eye(len(labels), len(ref_labels), dtype=torch.bool, device=labels.device)
    return same & not_self, ~same & not_self


def multi_similarity_loss(
    sim: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 40.0,
    base: float = 0.5,
    miner_epsilon: float | None = 0.1,
) -> torch.Tensor:
    """Multi-Similarity loss (Wang et al. 2019) on an arbitrary (R, K) similarity matrix.

    Row r is an anchor, columns are its candidates; ``pos_mask`` / ``neg_mask`` (R, K) say
    which are positives and negatives (neither: ignored). Conditional similarities are not
    inner products of one embedding table, so the loss takes the matrix itself. With
    ``miner_epsilon`` the MS miner keeps, per anchor, the negatives with
    ``s_n + eps > min s_p`` and the positives with ``s_p - eps < max s_n`` (the semantics of
    pytorch-metric-learning's ``MultiSimilarityMiner``, so ``ms`` and this method agree on
    plain cosine similarities). The loss is averaged over anchors that have a candidate.
    """
    if sim.shape != pos_mask.shape or sim.shape != neg_mask.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and masks {tuple(pos_mask.shape)}/{tuple(neg_mask.shape)} differ.")
    pos_mask, neg_mask = pos_mask.bool(), neg_mask.bool()
    if miner_epsilon is not None:
        s = sim.detach()
        inf = torch.finfo(s.dtype).max
        min_pos = s.masked_fill(~pos_mask, inf).amin(dim=1, keepdim=True)  # (R, 1); +max if no positive
        max_neg = s.masked_fill(~neg_mask, -inf).amax(dim=1, keepdim=True)  # (R, 1); -max if no negative
        hard_pos = pos_mask & (s - miner_epsilon < max_neg)
        hard_neg = neg_mask & (s + miner_epsilon > min_pos)
    else:
        hard_pos, hard_neg = pos_mask, neg_mask

    def soft_count(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # log(1 + sum_{keep} exp(logits)) per row, 0 for rows with nothing kept.
        logits = logits.masked_fill(~keep, float("-inf"))
        zero = logits.new_zeros(logits.shape[0], 1)
        return torch.logsumexp(torch.cat([logits, zero], dim=1), dim=1)  # (R,)

    pos_loss = soft_count(-alpha * (sim - base), hard_pos) / alpha
    neg_loss = soft_count(beta * (sim - base), hard_neg) / beta
    valid = (pos_mask | neg_mask).any(dim=1)  # (R,) anchors with any candidate
    return ((pos_loss + neg_loss) * valid).sum() / valid.sum().clamp_min(1)


# ---------------------------------------------------------------------------- the method
@register_method("cross_image_attention")
class CrossImageAttentionMethod(RetrievalMethod):
    """Cross-Image-Attention (Kotovenko et al., CVPR 2023): conditional embeddings in training.

    Args:
        num_blocks: cross-attention blocks N (the supplement shows blocks 2, 4, 6; 0 trains
            the same backbone without them, the baseline of supplement Fig. S1).
        num_heads: attention heads per block (the embedding size must be divisible by it).
        mlp_ratio: MLP width of a block as a multiple of the embedding size (0: no MLP).
        block_dropout: dropout inside the blocks.
        checkpoint_blocks: recompute the blocks in backward to save activation memory.
        pair_similarity: conditional similarity of an ordered pair (i | a): ``mutual``
            ``cos(z(i|a), z(a|i))`` (both images conditioned on each other, symmetric) or
            ``anchor`` ``cos(z(i|a), phi(a))`` (the candidate conditioned on the anchor,
            compared with the anchor's unconditional embedding).
        conditional_weight: weight of the Multi-Similarity loss on conditional similarities.
        unconditional_weight: weight of the Multi-Similarity loss on unconditional embeddings.
        alpha, beta, base: Multi-Similarity loss parameters (both losses).
        miner_epsilon: Multi-Similarity miner margin (both losses); ``None`` uses every pair.
        rerank_k: re-rank each query's top-k (unconditional cosine) with the conditional
            similarity at evaluation, reported as ``<stage>/refined/...``; 0 switches it off.
        rerank_list_length: length of the returned ranked lists: the re-ranked top-k, then
            the unconditional order up to this rank (positives beyond it count as misses, so
            keep it >= the largest Recall@K and the largest class size).
        rerank_batch_size: images encoded at once, and query-candidate pairs scored at once,
            when re-ranking.
        **kwargs: :class:`~methods.base.RetrievalMethod` arguments (backbone, embedding_dim, ...).
    """

    description = "Cross-Image-Attention: conditional embeddings in training, unconditional at test (Kotovenko et al. 2023)"
    min_samples_per_class = 2  # the multi-similarity loss on conditional similarities needs positive pairs

    def __init__(
        self,
        num_blocks: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        block_dropout: float = 0.0,
        checkpoint_blocks: bool = False,
        pair_similarity: PairSimilarity = "mutual",
        conditional_weight: float = 1.0,
        unconditional_weight: float = 1.0,
        alpha: float = 2.0,
        beta: float = 40.0,
        base: float = 0.5,
        miner_epsilon: float | None = 0.1,
        rerank_k: int = 0,
        rerank_list_length: int = 1000,
        rerank_batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_blocks < 0:
            raise ConfigError(f"--model.num_blocks must be >= 0 (0 = the baseline without cross-attention); got {num_blocks}.")
        check_choice("model.pair_similarity", pair_similarity, PairSimilarity)
        if rerank_k < 0 or rerank_batch_size < 1 or rerank_list_length < rerank_k:
            raise ConfigError(
                "Need --model.rerank_k >= 0, --model.rerank_list_length >= rerank_k and --model.rerank_batch_size >= 1; got "
                f"{rerank_k}, {rerank_list_length}, {rerank_batch_size}."
            )
        if rerank_k and not num_blocks:
            raise ConfigError("--model.rerank_k > 0 re-ranks with the cross-attention blocks; it needs --model.num_blocks > 0.")
        self.pair_similarity: PairSimilarity = pair_similarity
        self.conditional_weight, self.unconditional_weight = conditional_weight, unconditional_weight
        self.alpha, self.beta, self.base, self.miner_epsilon = alpha, beta, base, miner_epsilon
        self.rerank_k, self.rerank_list_length, self.rerank_batch_size = rerank_k, rerank_list_length, rerank_batch_size
        self.cross_attention = CrossImageAttention(
            num_blocks,
            self.embedding_dim,
            self.encoder.token_dim,
            checkpoint_blocks=checkpoint_blocks,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dropout=block_dropout,
        )

    @property
    def num_blocks(self) -> int:
        return len(self.cross_attention.blocks)

    # ------------------------------------------------------------------ conditional embeddings
    def conditional_embeddings(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All ordered pairs at once: ``z[a, i] = phi^N(E(I_i | I_a))``.

        Args:
            embeddings: (B_1, D) unconditional embeddings ``phi(E(I_i))`` (unnormalised).
            tokens: (B_a, N, C) spatial features ``E(I_a)`` of the conditioning images.
            return_attention: also return one (B_a, H, B_1, N) attention map per block.

        Returns:
            (B_a, B_1, D) conditional embeddings (unnormalised) and the attention maps.
        """
        z = embeddings.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B_a, B_1, D)
        return self.cross_attention(z, tokens, return_attention)

    def paired_conditional_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Only the listed pairs: (P, D) embeddings each conditioned on its (P, N, C) tokens -> (P, D)."""
        z, _ = self.cross_attention(embeddings.unsqueeze(1), tokens)  # (P, 1, D)
        return z.squeeze(1)

    def conditional_similarity(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, B) conditional similarity ``S[a, i]`` of every ordered pair in a batch.

        ``mutual``: ``cos(z(i|a), z(a|i))`` (symmetric); ``anchor``: ``cos(z(i|a), phi(a))``,
        row a being the anchor. The diagonal (an image conditioned on itself) is computed
        but is no pair of the loss.
        """
        z, _ = self.conditional_embeddings(embeddings, tokens)  # (B_a, B_1, D)
        return pair_similarity_matrix(z, embeddings, self.pair_similarity)

    def pair_scores(
        self, emb_q: torch.Tensor, tokens_q: torch.Tensor, emb_c: torch.Tensor, tokens_c: torch.Tensor
    ) -> torch.Tensor:
        """Conditional similarity of P listed pairs (query q as anchor, candidate c) -> (P,).

        The same quantity as :meth:`conditional_similarity` ``S[q, c]`` without the other
        B^2 - P pairs: (P, D) embeddings and (P, N, C) tokens of both sides.
        """
        z_cq = F.normalize(self.paired_conditional_embeddings(emb_c, tokens_q), dim=-1)  # z(c|q) (P, D)
        if self.pair_similarity == "mutual":
            z_qc = F.normalize(self.paired_conditional_embeddings(emb_q, tokens_c), dim=-1)  # z(q|c)
            return (z_cq * z_qc).sum(-1)
        return (z_cq * F.normalize(emb_q, dim=-1)).sum(-1)

    # ------------------------------------------------------------------ training
    def _ms(self, sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        if sim.dtype in (torch.float16, torch.bfloat16):  # exp(beta * s) needs more than 8 mantissa bits
            sim = sim.float()
        return multi_similarity_loss(sim, pos, neg, self.alpha, self.beta, self.base, self.miner_epsilon)

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        if images.ndim != 4:
            raise ValueError(
                f"cross_image_attention trains on (B, C, H, W) images, got shape {tuple(images.shape)}; "
                "it requests a single view per sample (do not override its DataRequest views)."
            )
        out = self.encode(images)
        emb = self.project(out.pooled)  # (B, D) unconditional, unnormalised
        unit = F.normalize(emb, dim=-1)
        pos, neg = label_masks(labels)  # (B, B) each, diagonal excluded
        terms: dict[str, torch.Tensor] = {"ms_unconditional": self._ms(unit @ unit.T, pos, neg)}
        loss = self.unconditional_weight * terms["ms_unconditional"]
        if self.num_blocks and self.conditional_weight:
            sim = self.conditional_similarity(emb, out.tokens)  # (B, B) over all ordered pairs
            terms["ms_conditional"] = self._ms(sim, pos, neg)
            loss = loss + self.conditional_weight * terms["ms_conditional"]
            with torch.no_grad():
                terms["cond_sim_pos"] = sim[pos].float().mean() if pos.any() else sim.new_zeros(())
                terms["cond_sim_neg"] = sim[neg].float().mean() if neg.any() else sim.new_zeros(())
        return {"loss": loss, **terms}

    # ------------------------------------------------------------------ optional re-ranking
    def refine(
        self, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor
    ) -> dict[str, Any] | None:
        """With ``rerank_k > 0``: each query's top-k gallery items re-ordered by conditional similarity.

        The candidates come from the unconditional embeddings (what the plain metrics rank
        with); the k pair scores need both images' spatial features, so the evaluated split
        is encoded once more (its loader is taken from the trainer's datamodule). Off by
        default: the paper evaluates the unconditional embeddings only.
        """
        if not self.rerank_k:
            return None

        lists = self.neighbour_lists(embeddings, is_query, is_gallery)  # (Q, L) positions
        emb, tokens = self._encode_evaluated_split(len(embeddings))
        queries = is_query.nonzero().squeeze(1)  # (Q,)
        reranked = self.rerank(emb, tokens, queries.to(emb.device), lists.to(emb.device))
        return {"": RankedLists(indices=reranked.to(embeddings.device))}

    def neighbour_lists(self, embeddings: torch.Tensor, is_query: torch.Tensor, is_gallery: torch.Tensor) -> torch.Tensor:
        """(Q, L) positions of each query's ``rerank_list_length`` nearest gallery items, self excluded.

        Rows follow the queries in ascending position; cosine similarity of the
        unconditional embeddings, best first.
        """
        queries = is_query.nonzero().squeeze(1)  # (Q,)
        gallery = is_gallery.nonzero().squeeze(1)  # (G,)
        length = min(self.rerank_list_length, len(gallery) - int(bool((is_query & is_gallery).any())))
        if length < 1:
            raise ValueError("Re-ranking needs a gallery of at least two samples.")
        unit = F.normalize(embeddings.float(), dim=-1)
        in_gallery = bool((is_query & is_gallery).any())
        rows, _ = exact_knn(  # the query itself excluded by its position; ties by the lower position
            unit[queries], unit[gallery], length, query_ids=queries if in_gallery else None, database_ids=gallery
        )
        return gallery[rows]  # (Q, L)

    @torch.no_grad()
    def rerank(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, queries: torch.Tensor, lists: torch.Tensor
    ) -> torch.Tensor:
        """Re-order the first ``rerank_k`` entries of (Q, L) neighbour lists by conditional similarity.

        Args:
            embeddings: (N, D) unnormalised unconditional embeddings of the evaluated split.
            tokens: (N, T, C) its spatial features (any device / dtype; moved per batch).
            queries: (Q,) positions of the queries, one per row of ``lists``.
            lists: (Q, L) positions of their neighbours, best first.

        Returns:
            (Q, L) lists: the top-k by descending conditional similarity (stable: ties keep
            the unconditional order), then entries k+1..L unchanged.
        """
        k = min(self.rerank_k, lists.shape[1])
        device = next(self.parameters()).device
        head = lists[:, :k]  # (Q, k)
        out = []
        per = max(1, self.rerank_batch_size // k)  # queries per batch of pairs
        for start in range(0, len(queries), per):
            q, c = queries[start : start + per], head[start : start + per]  # (q,), (q, k)
            q_rep, c_flat = q[:, None].expand_as(c).reshape(-1), c.reshape(-1)  # (q*k,)
            scores = self.pair_scores(
                embeddings[q_rep].to(device), tokens[q_rep].to(device, embeddings.dtype),
                embeddings[c_flat].to(device), tokens[c_flat].to(device, embeddings.dtype),
            ).view(len(q), k)  # (q, k)
            order = scores.argsort(dim=1, descending=True, stable=True)
            out.append(torch.gather(c.to(device), 1, order))
        return torch.cat([torch.cat(out), lists[:, k:].to(device)], dim=1)

    @torch.no_grad()
    def _encode_evaluated_split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised embeddings (N, D) and float16 CPU tokens (N, T, C) of the split being evaluated."""
        from torch.utils.data import DataLoader


        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None:
            raise RuntimeError(
                "Re-ranking (rerank_k > 0) re-encodes the evaluated split through the trainer's datamodule; "
                "call rerank(...) directly when evaluating without a Trainer."
            )
        records = datamodule.test_records if trainer.testing else datamodule.val_records
        if len(records) != n:
            raise RuntimeError(f"Re-ranking got {n} embeddings but the evaluated split has {len(records)} images.")
        loader = DataLoader(
            datamodule.image_dataset(records, datamodule.eval_transform()), batch_size=self.rerank_batch_size, shuffle=False,
            num_workers=datamodule.num_workers,
        )
        was_training = self.training
        self.eval()
        embeddings, tokens = [], []
        with trainer.precision_plugin.forward_context():
            for batch in loader:
                out = self.encode(batch["image"].to(self.device))
                embeddings.append(self.project(out.pooled).float())  # (b, D)
                tokens.append(out.tokens.to("cpu", torch.float16))  # (b, T, C): 2 bytes per value on the host
        self.train(was_training)
        return torch.cat(embeddings), torch.cat(tokens)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "num_blocks": self.num_blocks,
            "pair_similarity": self.pair_similarity,
            "rerank_k": self.rerank_k,
        }
