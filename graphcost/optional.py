"""The optional dependencies (pyproject.toml's extras), imported where they are needed.

scipy (extra `optimize`) solves the checkpoint optimizer's integer program, matplotlib (extra
`plot`) draws `--plot`, transformers (extra `hf`) reads `hf:` configs. Everything else runs
without them. A missing one is a user error: a ConfigError that says what needs it and what to
install, which the CLI prints as one line (exit status 2).

    >>> require("math", "none", "this example").sqrt(4.0)
    2.0
"""

from __future__ import annotations

import importlib
from types import ModuleType

from graphcost.errors import ConfigError


def require(module: str, extra: str, why: str) -> ModuleType:
    """Import `module`; if it is missing, raise ConfigError naming `why` it is needed, the
    package to pip install, and graphcost's `extra` that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise ConfigError(f"{why} needs {package}, which is not installed: pip install "
                          f"'graphcost[{extra}]' (or pip install {package})") from exc
