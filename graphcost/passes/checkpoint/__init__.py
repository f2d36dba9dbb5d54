"""Activation checkpointing: policies resolved on the costed graph (policy.py), compared and
optimized under a budget (search.py), applied to a real module with torch.utils.checkpoint
(apply.py)."""
