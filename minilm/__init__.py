"""minilm: GPT-1 and ELMo from scratch, with fused causal-attention and char-CNN kernels.

Importing minilm loads the compiled ops (``torch.ops.minilm.*``): the prebuilt ``minilm._C`` from
``pip install --no-build-isolation -e .``, or a JIT build of ``csrc/`` into a cache directory.
"""
import torch  # noqa: F401  (torch must be imported before the extension that links against it)

from minilm._build import load_extension

_C = load_extension()

from minilm import ops  # noqa: E402  (registers fake and autograd formulas for the compiled ops)

__version__ = "0.1.0"
__all__ = ["ops"]
