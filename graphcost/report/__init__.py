"""Stage 6: results as text (units.py is the only place units are formatted; one module per
verb's report) and plots (plot.py, the `plot` extra)."""
