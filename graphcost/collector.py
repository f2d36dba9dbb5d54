"""Python's cyclic garbage collector, held off while graphcost builds and walks graphs.

Each full pass of the collector walks every object alive, ~300k of them once torch is imported
(about 0.25 s on the 2-core machine of docs/), and building a deep model's graph allocates
enough to trigger one or two: analyze() of llama3-405b took 0.9 s with them, 0.55 s without.
What a paused section leaves behind is collected afterwards as usual.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Hold off the cyclic collector inside the block (or the decorated function)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
