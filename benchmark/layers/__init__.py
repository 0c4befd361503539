"""Neural-network building blocks shared by the methods (torch only, nothing from the project)."""

from benchmark.layers import fused
from benchmark.layers.attention import Attention, attend, attention_weights, merge_heads, split_heads

__all__ = ["fused", "Attention", "attend", "attention_weights", "merge_heads", "split_heads"]
