"""A corpus of independently written architectures, each checked against PyTorch's own ground
truth (validation/corpus.py, tests/test_corpus.py, bench/corpus.py).

The models are written the way users write them (tutorials, papers, the Hugging Face library),
not shaped to graphcost. Each entry builds a small config (a CPU training step well under a
second) and example inputs, targets included where the model computes its loss in forward:

    Entry(name, kind, make_module, make_inputs, notes="", kwarg_names=())

``make_module()`` runs under the target device as the default device; ``make_inputs(device,
dtype)`` returns a tuple. The last ``len(kwarg_names)`` inputs are passed by keyword
(``model(input_ids, labels=labels)``), the rest by position.

``KNOWN_FAILURES``: the entries that do not match yet, each with what is off and why (measured);
tests/test_corpus.py marks them xfail(strict=True), so one that starts passing is an error
until its line goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    make_module: Callable[[], nn.Module]
    make_inputs: Callable[[torch.device, torch.dtype], tuple]
    notes: str = ""
    kwarg_names: tuple[str, ...] = ()  # the trailing inputs passed by keyword


def floats(*shape: int) -> Callable[[torch.device, torch.dtype], torch.Tensor]:
    """A data batch (standard normal, no grad) of this shape."""
    return lambda device, dtype: torch.randn(*shape, device=device, dtype=dtype)


def ints(high: int, *shape: int) -> Callable[[torch.device, torch.dtype], torch.Tensor]:
    """int64 ids/labels in [0, high) of this shape."""
    return lambda device, dtype: torch.randint(0, high, shape, device=device)


def inputs(*makers: Callable) -> Callable[[torch.device, torch.dtype], tuple]:
    """make_inputs from one maker per input."""
    return lambda device, dtype: tuple(m(device, dtype) for m in makers)


def _all() -> list[Entry]:
    from . import (
        attention,
        audio,
        checkpointed,
        generative,
        graphs,
        outputs,
        recsys,
        sequence,
        transformers_hf,
        vision,
    )

    modules = (sequence, vision, audio, generative, recsys, attention, checkpointed,
               transformers_hf, outputs, graphs)
    return [e for m in modules for e in m.ENTRIES]


CORPUS: list[Entry] = _all()
BY_NAME: dict[str, Entry] = {e.name: e for e in CORPUS}
assert len(BY_NAME) == len(CORPUS), "corpus names must be unique"

# name -> which defect class and what is wrong, measured (graphcost vs PyTorch's ground truth)
KNOWN_FAILURES: dict[str, str] = {
    # -- traced as an opaque module --------------------------------------------------------------
    "nn_transformer_encoder": (
        "opaque module: nn.TransformerEncoder.forward(src, mask) calls _detect_is_causal_mask, "
        "which compares the mask's values with a causal one (a data-dependent branch on meta), so "
        "the whole encoder stands in as one opaque op, listed as unsupported: FLOPs -93%, saved "
        "bytes -93%. With is_causal=True (nn_transformer_seq2seq) it traces and is exact."),
}
