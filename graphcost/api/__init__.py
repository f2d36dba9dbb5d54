"""The Python API: the command line's verbs as functions and methods (analyze.py: `analyze` and
`ModelAnalysis`; shapes.py: `fit`, `plan`, `cost`, `sweep`), the options they share (options.py)
and the results they return (results.py), whose `to_dict()` is what `--json` prints.
`graphcost/__init__.py` re-exports them."""
