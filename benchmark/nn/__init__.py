"""Layer 1, the building blocks: torch modules and tensor routines that the methods and the engine share.

``backbones`` (timm models behind one registry of presets), ``attention`` and ``fused`` (multi-head
attention written once), ``neighbours`` (exact k-NN search: torch blocks or faiss), ``distributed``
(gathers under DDP), ``embedding_cache`` (frozen embeddings kept on disk). They import only
``benchmark.core``; this package file imports nothing, so importing one module loads only it.
"""
