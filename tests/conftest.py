import pytest
import torch

import minilm  # noqa: F401  (loads the compiled ops before any test collects)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
