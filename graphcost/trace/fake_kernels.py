"""Composite ops whose C++ composite cannot run on fake tensors, given a kernel that can while
graphcost exports.

F.ctc_loss (aten.ctc_loss, with int-list or tensor lengths) is CompositeImplicitAutograd: eager
runs `_ctc_loss` and reduces its per-sample losses, dividing by the target lengths it turns into
a tensor with `at::tensor(lengths)`, which a fake run cannot fill; and `_ctc_loss` is tagged
dynamic_output_shape (its log_alpha is as wide as the longest target). torch.export keeps the
composite whole in its graph, so only its output's shape is needed while tracing, and that does
not depend on the values: a scalar, or one loss per sample with reduction="none". During the
export the composite's kernel is replaced by one that makes that output
(`shape_only_kernels`), and the op stays one node, costed by its rule (rules/loss.py).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

NONE = 0  # at::Reduction::None


def _ctc_loss_shape(log_probs, targets, input_lengths, target_lengths, blank=0,
                    reduction=1, zero_infinity=False):
    batch = log_probs.shape[1] if log_probs.dim() == 3 else 1
    shape = (batch,) if reduction == NONE and log_probs.dim() == 3 else ()
    return log_probs.new_empty(shape)


SHAPE_ONLY = {"ctc_loss.IntList": _ctc_loss_shape, "ctc_loss.Tensor": _ctc_loss_shape}


@contextlib.contextmanager
def shape_only_kernels() -> Iterator[None]:
    """Inside the block the ops in SHAPE_ONLY run their shape-only kernel (only fake tensors
    should meet them there: an export's trace)."""
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # "overriding a previously registered kernel"
            warnings.simplefilter("ignore")
            for op, kernel in SHAPE_ONLY.items():
                library.impl(op, kernel, "CompositeImplicitAutograd")
        yield
    finally:
        library._destroy()
