"""The version of graphcost, defined here only: pyproject.toml reads it (setuptools' dynamic
version) and `graphcost.__version__` re-exports it."""

__version__ = "0.1.0"
