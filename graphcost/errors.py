"""Errors a user can cause. The CLI turns each into one message and exit status 2."""


class GraphcostError(Exception):
    """Base class: a problem with the user's model, inputs or options (not a graphcost bug)."""


class TraceError(GraphcostError):
    """torch.export could not capture the model."""


class UnsupportedOpError(GraphcostError):
    """An op without a cost rule was found and strict mode is on."""


class ConfigError(GraphcostError):
    """A bad option value (unknown device, dtype, model name, shape), or an optional dependency
    that a command needs and that is not installed (graphcost.optional)."""
