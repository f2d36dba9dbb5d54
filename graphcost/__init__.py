"""graphcost: a graph-based cost model for PyTorch.

    >>> import graphcost
    >>> a = graphcost.analyze("gpt2", seq=128, overrides={"n_layer": 2})
    >>> a.params
    53561088

The Python API mirrors the command line (graphcost.api.analyze): `analyze` a module with its example
inputs or MODEL by name, then `a.memory()`, `a.checkpoints()`, `a.optimize(budget)`,
`a.roofline(device)`, `a.cost(tokens)`; `fit`, `plan` and `sweep` trace MODEL at the shapes they
need. Every result has `to_dict()`, which is what the CLI's --json prints.
"""

from graphcost.analysis.analyze import Analysis
from graphcost.api.analyze import ModelAnalysis, analyze
from graphcost.api.results import (
    CheckpointResult,
    CostResult,
    CoverageResult,
    FitResult,
    InferenceMemoryResult,
    InferenceRooflineResult,
    MemoryResult,
    ParallelFitResult,
    ParallelMemoryResult,
    PlanResult,
    RooflineResult,
    SweepResult,
)
from graphcost.api.shapes import cost, fit, plan, sweep
from graphcost.errors import ConfigError, GraphcostError, TraceError, UnsupportedOpError
from graphcost.hardware.devices import PRESETS, Device, get_device
from graphcost.passes.parallel.plan import ParallelPlan
from graphcost.rules.registry import FLOPS_PER_FMA, OpCost, Out, RuleContext, TensorSpec, Value
from graphcost.rules.registry import register as register_rule
from graphcost.trace.export import spec
from graphcost.version import __version__ as __version__  # defined once, there

__all__ = ["FLOPS_PER_FMA", "PRESETS", "Analysis", "CheckpointResult", "ConfigError",
           "CostResult", "CoverageResult", "Device", "FitResult", "GraphcostError", "InferenceMemoryResult",
           "InferenceRooflineResult", "MemoryResult", "ModelAnalysis", "OpCost", "Out",
           "ParallelFitResult", "ParallelMemoryResult", "ParallelPlan", "PlanResult",
           "RooflineResult", "RuleContext", "SweepResult", "TensorSpec", "TraceError",
           "UnsupportedOpError", "Value", "analyze", "cost", "fit", "get_device", "plan",
           "register_rule", "spec", "sweep"]
