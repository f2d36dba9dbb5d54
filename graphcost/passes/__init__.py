"""Passes over a costed graph: plain functions, graph first, returning frozen results."""
