import pytest
import torch
import torch.nn.functional as F

from minilm.ops import causal_attention, causal_attention_reference


@pytest.mark.parametrize("T", [1, 37, 128])
def test_forward_and_grads_match_sdpa_fp32(T):
    q, k, v = (torch.randn(2, 3, T, 48, requires_grad=True) for _ in range(3))
    out = causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_reference_matches_sdpa():
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    torch.testing.assert_close(causal_attention_reference(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
