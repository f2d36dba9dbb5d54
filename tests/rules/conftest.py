import pytest
import torch


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request) -> torch.dtype:
    """Every rule is checked in fp32 and in bf16 (kernels keep some statistics in fp32)."""
    return request.param
