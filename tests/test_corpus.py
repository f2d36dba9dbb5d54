"""Every model of the corpus (tests/corpus: independently written architectures) against
PyTorch's own ground truth (validation/corpus.py): parameters, forward and backward FLOPs and
saved activation bytes exactly, every op with a rule, and the predicted training peak and each
step's forward-phase peak within 0.5% of the live-tensor tracker's real CPU steps.

The entries in KNOWN_FAILURES are xfail(strict=True): one that starts passing fails here until
its line in tests/corpus/__init__.py goes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tests.corpus import CORPUS, KNOWN_FAILURES
from validation.corpus import check
from validation.groundtruth import scalar_loss

PEAK_TOLERANCE = 0.005


def _param(entry):
    marks = []
    if entry.name in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[entry.name]))
    return pytest.param(entry, id=entry.name, marks=marks)


def test_known_failures_name_corpus_entries():
    assert set(KNOWN_FAILURES) <= {e.name for e in CORPUS}


@pytest.mark.parametrize("entry", [_param(e) for e in CORPUS])
def test_matches_ground_truth(entry):
    if entry.kind == "hf":
        pytest.importorskip("transformers")
    record = check(entry)
    assert not record.errors, record.errors
    assert not record.unsupported_ops, f"ops without a rule: {record.unsupported_ops}"
    for field in record.EXACT:
        ours, truth = getattr(record, field)
        assert ours == truth, f"{field}: graphcost {ours:,} != ground truth {truth:,}"
    assert record.peak_bytes[0] == pytest.approx(record.peak_bytes[1], rel=PEAK_TOLERANCE)
    assert set(record.forward_peaks) == {0, 1}  # TrainingConfig(): two steps
    for step, (ours, truth) in record.forward_peaks.items():
        assert ours == pytest.approx(truth, rel=PEAK_TOLERANCE), f"forward peak of step {step}"
    assert not record.problems(PEAK_TOLERANCE)


def test_record_of_a_known_model():
    """The harness itself: a plain MLP is exact, and measuring leaves the thread count as it
    was."""
    from tests.corpus import Entry, floats, inputs

    threads = torch.get_num_threads()
    entry = Entry("mlp", "test", lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                       nn.Linear(16, 3)),
                  inputs(floats(4, 8)))
    record = check(entry)
    assert torch.get_num_threads() == threads
    assert record.params == (8 * 16 + 16 + 16 * 3 + 3,) * 2
    assert record.forward_flops == (2 * 4 * (8 * 16 + 16 * 3),) * 2
    assert record.problems() == []


@dataclass
class _Out:
    loss: torch.Tensor
    extra: dict


def test_scalar_loss_reaches_every_floating_output():
    """The ground truth's loss sums the floating outputs that need a gradient, through nested
    containers and dataclass fields; integer, gradient-free and non-pytree leaves add nothing."""
    a = torch.ones(2, requires_grad=True)
    b = torch.full((3,), 2.0, requires_grad=True)
    out = _Out(loss=a * 1, extra={"b": (b * 1, [torch.ones(4)]), "ids": torch.arange(3),
                                  "cache": object()})
    assert scalar_loss(out).item() == 2 + 6
    assert scalar_loss(((a * 1,), {"x": b * 1})).item() == 2 + 6
