"""The fused ops. Each comes with a plain PyTorch reference that is its specification.

    causal_attention(q, k, v, scale=None)         -> out          (minilm::causal_attention)
    causal_attention_reference(q, k, v, scale=None)
"""
from minilm.ops.attention import causal_attention, causal_attention_reference

__all__ = ["causal_attention", "causal_attention_reference"]
