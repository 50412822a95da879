"""The fused ops. Each comes with a plain PyTorch reference that is its specification.

    causal_attention(q, k, v, scale=None, dropout_p=0.0, seed=None) -> out   (minilm::causal_attention)
    causal_attention_reference(q, k, v, scale=None, dropout_p=0.0, seed=None)
    char_cnn(char_ids, embedding, weights, biases, activation="relu") -> out  (minilm::char_cnn)
    char_cnn_reference(char_ids, embedding, weights, biases, activation="relu")
"""
from minilm.ops.attention import causal_attention, causal_attention_reference, dropout_keep_mask
from minilm.ops.char_cnn import char_cnn, char_cnn_reference

__all__ = ["causal_attention", "causal_attention_reference", "dropout_keep_mask", "char_cnn",
           "char_cnn_reference"]
