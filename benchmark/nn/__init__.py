"""Layer 1, the building blocks: torch modules and tensor routines that the methods and the engine share.

``backbones`` (timm models behind one registry of presets), ``attention`` and ``fused`` (multi-head
attention written once), ``neighbours`` (exact k-NN search: torch blocks or faiss), ``knn_context``
(k-NN contexts: search with self-exclusion, unions, mean), ``reciprocal_neighbours`` (k-NN graphs
and reciprocal k-NN batches), ``heads`` (a cross-attention classifier), ``mlp`` (a projection
MLP), ``divergences`` (JS divergences between view distributions), ``splits`` (class-stratified
splits), ``memory_probe`` (activation and free-memory probes), ``distributed`` (gathers under
DDP), ``embedding_cache`` (frozen embeddings kept on disk). They import only
``benchmark.core``; this package file imports nothing, so importing one module loads only it.
"""
