"""Op rules, one module per op family, all registered in one table: `REGISTRY`."""

from graphcost.rules import (  # noqa: F401 - importing registers the rules
    attention,
    conv,
    embedding,
    indexing,
    loss,
    matmul,
    norm,
    pointwise,
    recurrent,
    shape,
    weight_norm,
)
from graphcost.rules.registry import (
    FLOPS_PER_FMA,
    REGISTRY,
    OpCost,
    Out,
    RuleContext,
    TensorSpec,
    Value,
    register,
)

__all__ = ["FLOPS_PER_FMA", "REGISTRY", "OpCost", "Out", "RuleContext", "TensorSpec", "Value",
           "register"]
