"""Intra-Batch's own figure, on the shared figure layer (:mod:`benchmark.engine.figures`).

``intra_batch_attention``: which neighbours a node listens to at test time. Every test sample
gets the reciprocal k-NN batch the method refines it in (:func:`reciprocal_knn_batches` with the
model's ``refine`` settings, the sample first); the trained MPN runs on it and the attention
weights of the sample (node 0) over the batch are read at every layer
(:meth:`MessagePassingLayer.attention_weights`, heads averaged). The figure shows, for a few
seeded test samples, the batch's images with the weight each receives (positives: same class,
solid green; negatives: hatched red; the node itself grey), at the last layer, and over all
test samples the weight per positive and per negative neighbour at every layer::

    python -m benchmark analyze intra_batch_attention --ckpt runs/<run>/checkpoints/last.ckpt

The question it answers: does the trained MPN listen to the right neighbours? An MPN whose
weight per positive is no higher than per negative refines by averaging, not by message
passing; the per-layer summary in the JSON (mean weight and total mass on positives, negatives
and the node itself) gives the numbers behind the picture.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.core.contracts import register_figure
from benchmark.engine.figures import CORRECT, INCORRECT, FigureContext, FigureResult, pyplot
from benchmark.nn.reciprocal_neighbours import reciprocal_knn_batches

METHOD = "intra_batch"
SHOWN = 6  # at most this many samples drawn with their batch (settings.queries, default 6)


@torch.no_grad()
def batch_attention(model: Any, nodes: torch.Tensor, batches: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(N, D) normalised nodes, (G, B) index batches (node 0 first) -> (G, L, B): the weight node 0
    gives every batch member at each of the L MPN layers, heads averaged (eval mode).

    The MPN is run layer by layer by hand, because its forward returns the updated nodes, not
    the weights: at each layer node 0's query is scored against every member's key with the
    layer's own :meth:`attention_weights`, then the layer updates all nodes for the next one.
    Eval mode turns attention dropout off; the module's mode is restored afterwards.

    Args:
        model: an Intra-Batch model (its ``mpn``).
        nodes: the normalised embeddings the batches index.
        batches: index batches, the refined sample in column 0.
        chunk: batches per forward, bounding the memory of a whole test split.
    """
    mpn = model.mpn
    was_training = mpn.training
    mpn.eval()
    dtype = next(mpn.parameters()).dtype
    out = []
    try:
        for start in range(0, batches.shape[0], chunk):
            h = mpn.input(nodes[batches[start : start + chunk]].to(dtype))  # (c, B, d)
            per_layer = []
            for layer in mpn.layers:
                weights = layer.attention_weights(layer.q(h[:, :1]), layer.k(h))  # (c, M, 1, B)
                per_layer.append(weights.mean(dim=1)[:, 0].float())  # (c, B)
                h = layer(h)
            out.append(torch.stack(per_layer, dim=1))  # (c, L, B)
    finally:  # also on an error: the model may be trained or evaluated further
        mpn.train(was_training)
    return torch.cat(out) if out else nodes.new_zeros(0, len(mpn.layers), batches.shape[1])


@register_figure(
    "intra_batch_attention",
    "attention of test nodes over their reciprocal k-NN batch at every MPN layer: positives vs negatives",
    methods=(METHOD,),
)
def attention(context: FigureContext) -> FigureResult:
    """``intra_batch_attention``: node 0's attention over its reciprocal k-NN test batch.

    Left, for up to :data:`SHOWN` seeded test queries, the batch's images above bars of the
    weight each member receives at the last layer (the one the refined embedding comes from);
    right, the distribution over every test query of the weight per positive and per negative
    neighbour, one histogram pair per layer.
    """
    plt = pyplot()  # the figure layer's headless matplotlib, imported first
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    evaluation = context.require_evaluation()
    model = context.model
    device = next(model.parameters()).device
    cfg = model.refine_config
    # The batches the model's own refine() builds at test time: same settings, same database.
    nodes = F.normalize(evaluation.embeddings.float(), dim=-1).to(device)
    batches = reciprocal_knn_batches(nodes, evaluation.is_gallery.to(device), cfg.k1, cfg.batch_size, cfg.alpha,
                                     cfg.strict_overlap)  # (N, B), column 0 = the sample
    # The queries' batches (every sample, when the queries are the gallery).
    queries = evaluation.is_query.nonzero().flatten().to(device)
    weights = batch_attention(model, nodes, batches[queries]).cpu()  # (Q, L, B)
    members = batches[queries].cpu()
    labels = evaluation.labels
    # Positives share node 0's class; column 0 (the node itself) is neither.
    positive = labels[members] == labels[members[:, :1]]  # (Q, B), column 0 is the node itself
    positive[:, 0] = False
    negative = ~positive
    negative[:, 0] = False
    layers = weights.shape[1]
    # The weights per positive and per negative neighbour at each layer, over every query.
    per_pos = [weights[:, t][positive].numpy() for t in range(layers)]
    per_neg = [weights[:, t][negative].numpy() for t in range(layers)]
    # Seeded, so that the same checkpoint always shows the same samples.
    rng = np.random.default_rng(context.seed)
    count = max(1, min(SHOWN, context.settings.queries, len(queries)))
    shown = sorted(rng.choice(len(queries), size=count, replace=False).tolist())

    fig = plt.figure(figsize=(10.5, 1.9 * len(shown) + 0.7))
    grid = fig.add_gridspec(max(1, len(shown)), 2, width_ratios=[2.2, 1.0])
    samples = []
    for row, q in enumerate(shown):
        ax = fig.add_subplot(grid[row, 0])
        b = members.shape[1]
        x = np.arange(b)
        w = weights[q, -1].numpy()  # the last layer (what the refined embedding comes from)
        # Colour and hatching both mark positives / negatives, so the figure reads in grey too.
        colours = ["0.6"] + [CORRECT if positive[q, j] else INCORRECT for j in range(1, b)]
        hatches = [""] + ["" if positive[q, j] else "//" for j in range(1, b)]
        for xi, wi, c, hatch in zip(x, w, colours, hatches):
            ax.bar(xi, wi, color=c, hatch=hatch, edgecolor="white", width=0.7)
            ax.text(xi, wi, f"{wi:.2f}", ha="center", va="bottom", fontsize=6.5)
        # Headroom above the bars for the thumbnails (drawn at 1.45 x the scale).
        top = max(float(w.max()) * 1.25, 1e-6)
        ax.set_ylim(0, top * 1.9)
        # Thumbnails of the dataset images (evaluation.indices maps a row to its image), so a
        # reader sees what the node attends to, not only whether it shares the class.
        for xi in x:  # the batch member's image above its bar
            index = int(evaluation.indices[members[q, xi]])
            box = AnnotationBbox(OffsetImage(context.thumbnail(index, 40), zoom=0.75), (xi, top * 1.45), frameon=False)
            ax.add_artist(box)
        ax.set_xticks(x, ["self"] + [f"n{j}" for j in range(1, b)], fontsize=7)
        ax.set_xlim(-0.6, b - 0.4)
        ax.set_ylabel("weight", fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
        node = int(queries[q])
        ax.set_title(f"test sample {int(evaluation.indices[node])} (class {int(labels[node])}): attention of the "
                     f"node at MPN layer {layers}, heads averaged", fontsize=8)
        samples.append({"index": int(evaluation.indices[node]), "label": int(labels[node]),
                        "batch": [int(evaluation.indices[m]) for m in members[q]],
                        "batch_labels": [int(labels[m]) for m in members[q]],
                        "positive": positive[q].tolist(), "attention": weights[q].tolist()})
    ax = fig.add_subplot(grid[:, 1])
    # Shared bins over the neighbours' weights (column 0, the node itself, left out).
    bins = np.linspace(0, max(1e-6, float(weights[:, :, 1:].max())), 30)
    for t in range(layers):
        alpha = 0.35 + 0.5 * (t + 1) / layers  # later layers drawn more opaque
        ax.hist(per_pos[t], bins=bins, color=CORRECT, alpha=alpha * 0.7, density=True,
                label=f"positives, layer {t + 1} (mean {per_pos[t].mean() if per_pos[t].size else float('nan'):.3f})")
        ax.hist(per_neg[t], bins=bins, color=INCORRECT, alpha=alpha * 0.7, density=True, hatch="//", edgecolor="white",
                label=f"negatives, layer {t + 1} (mean {per_neg[t].mean() if per_neg[t].size else float('nan'):.3f})")
    ax.set_xlabel("attention weight on a neighbour")
    ax.set_ylabel("density")
    ax.set_title(f"all {len(queries)} test nodes: weight per neighbour", fontsize=8)
    ax.legend(fontsize=6.5, frameon=False)
    # With a null logit a node may give its batch less than 1 in total: the title says which
    # softmax the model has, since the bars are read against it.
    fig.suptitle(f"{context.method}: reciprocal k-NN test batches (k1={cfg.k1}, batch {members.shape[1]}), "
                 f"{'null logit: weights sum below 1' if getattr(model.mpn_config, 'null_logit', False) else 'softmax over the batch'}",
                 fontsize=9)
    fig.tight_layout()
    # Per layer: mean weight per positive / negative neighbour, and the mass (sum of weights)
    # a node puts on its positives, its negatives and itself, averaged over the queries.
    summary = {
        f"layer{t + 1}": {
            "mean_weight_positive": float(per_pos[t].mean()) if per_pos[t].size else None,
            "mean_weight_negative": float(per_neg[t].mean()) if per_neg[t].size else None,
            "mass_on_positives": float((weights[:, t] * positive).sum(1).mean()),
            "mass_on_negatives": float((weights[:, t] * negative).sum(1).mean()),
            "mass_on_self": float(weights[:, t, 0].mean()),
        }
        for t in range(layers)
    }
    return FigureResult([context.save(fig, "intra_batch_attention")],
                        {"k1": cfg.k1, "batch_size": int(members.shape[1]), "summary": summary, "samples": samples})
