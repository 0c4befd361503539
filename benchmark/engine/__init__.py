"""Layer 3, the engine: what runs and measures a fit, for any registered method.

``evaluation`` (the retrieval metrics and the one evaluation callback), ``training`` (run
lifecycle: status, signals, checkpoint I/O), ``figures`` / ``plotting`` (the figure registry's
callback and the shared drawing helpers), ``wandb_logger`` / ``wandb_auth`` (the W&B logger).
It names no method: methods reach it through the contracts of ``benchmark.core``.
"""
