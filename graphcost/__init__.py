"""graphcost: a graph-based cost model for PyTorch.

    >>> import graphcost
    >>> from graphcost.models import load
    >>> analysis = graphcost.analyze(*load("llama-7b", batch=1, seq=2048))
"""

from graphcost.analysis.analyze import Analysis, analyze
from graphcost.errors import ConfigError, GraphcostError, TraceError, UnsupportedOpError
from graphcost.hardware.devices import PRESETS, Device, get_device
from graphcost.rules.registry import FLOPS_PER_FMA, OpCost, Out, RuleContext, TensorSpec, Value
from graphcost.rules.registry import register as register_rule
from graphcost.trace.export import spec
from graphcost.version import __version__ as __version__  # defined once, there

__all__ = ["FLOPS_PER_FMA", "PRESETS", "Analysis", "ConfigError", "Device", "GraphcostError",
           "OpCost", "Out", "RuleContext", "TensorSpec", "TraceError", "UnsupportedOpError",
           "Value", "analyze", "get_device", "register_rule", "spec"]
