"""Stage 1: a module and its example inputs captured with torch.export as an ATen-level fx graph
(export.py), a deep stack traced with two blocks (blocks.py), autocast's dtypes, stand-ins for
what cannot be traced (opaque.py), any output structure returned as its tensors (outputs.py),
transformers' mask decisions taken as in an eager run (masks.py), and what each fx node says of
its origin (node_meta.py)."""
