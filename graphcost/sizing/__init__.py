"""Drivers that trace a model at more than one shape: fit (the largest batch and context),
plans (the parallel-plan search), and one export re-run at several shapes (retrace, sampled)."""
