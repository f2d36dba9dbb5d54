"""Stage 2: the exported fx graph as a networkx graph (build.py), its node and graph attributes
(schema.py), the full stack from two traced blocks (expand.py), and the CostedGraph with its
derived facts as cached properties (costed.py, facts.py, liveness.py)."""
