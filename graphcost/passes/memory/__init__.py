"""Memory: the timeline of training steps (timeline.py; walk.py walks it, stack.py derives a deep
stack's from short ones, training.py holds its config and result) and of inference with a KV
cache (inference.py)."""
