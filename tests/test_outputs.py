"""Model outputs of any structure (graphcost.trace.outputs): what torch.export returns as it is
(tensors in tuples, dicts, NamedTuples), a @dataclass, an object that keeps tensors in its
attributes (as a Hugging Face cache does), each checked against FlopCounterMode and autograd's
saved tensors; an output graphcost cannot look into is an error that names its type."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphcost import analyze
from graphcost.errors import TraceError
from graphcost.trace.export import trace
from graphcost.trace.outputs import output_tensors, returning_tensors
from tests.helpers import assert_matches_pytorch, randn_inputs

B, D = 4, 8


@dataclasses.dataclass
class Prediction:
    loss: torch.Tensor
    logits: torch.Tensor
    extra: dict


class Pair(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


class Cache:
    """A cache as transformers keeps one: plain attributes, a list of layers."""

    def __init__(self):
        self.layers: list[dict[str, torch.Tensor]] = []
        self.seen = 0


class SlotsCache:
    __slots__ = ("keys", "values")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values


class Net(nn.Module):
    """Two linear layers; `forward` returns `shape(hidden, logits, loss)`."""

    def __init__(self, shape):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, 3)
        self.shape = shape

    def forward(self, x):
        h = torch.tanh(self.a(x))
        logits = self.b(h)
        loss = F.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long,
                                                   device=x.device))
        return self.shape(h, logits, loss)


def with_cache(h, logits, loss):
    cache = Cache()
    cache.layers.append({"k": h * 2, "v": h + 1})
    return {"loss": loss, "logits": logits, "cache": cache}


SHAPES = {
    "tuple": lambda h, logits, loss: (loss, (logits, h)),
    "dict": lambda h, logits, loss: {"loss": loss, "logits": logits},
    "namedtuple": lambda h, logits, loss: Pair(loss, logits),
    "dataclass": lambda h, logits, loss: Prediction(loss, logits, {"hidden": h, "n": 3}),
    "dataclass in a list": lambda h, logits, loss: [Prediction(loss, logits, {})],
    "object with attributes": with_cache,
    "object with slots": lambda h, logits, loss: (loss, SlotsCache(h * 2, logits * 3)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_output_structure_matches_pytorch(shape):
    assert_matches_pytorch(lambda: Net(SHAPES[shape]), randn_inputs((B, D), requires_grad=False))


def test_a_cache_is_alive_at_the_end_of_the_forward_but_not_in_the_loss():
    """The tensors an object keeps are outputs (alive when the forward returns), detached: the
    loss is taken from the containers' tensors only, as validation.groundtruth.scalar_loss
    takes it."""
    with torch.device("meta"):
        module = Net(with_cache)
    outputs = analyze(module, (torch.empty(B, D, device="meta"),)).graph.graph["outputs"]
    grads = [(tuple(v.spec.shape), v.requires_grad) for v in outputs]
    assert grads == [((), True), ((B, 3), True), ((B, D), False), ((B, D), False)]


def test_output_tensors_in_order_each_once():
    a, b = torch.ones(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    cache = Cache()
    cache.layers.append({"k": a, "v": b})
    found = output_tensors(Prediction(a, b, {"cache": cache, "again": (a,), "n": 1}))
    assert [t.shape for t in found] == [(2,), (3,)]  # the cache's a and b were seen already
    held = output_tensors({"cache": cache})
    assert [t.requires_grad for t in held] == [False, False]  # detached


def test_an_output_torch_export_accepts_is_returned_as_it_is():
    with torch.device("meta"):
        module = Net(SHAPES["dict"])
    program = trace(module, (torch.empty(B, D, device="meta"),)).program
    assert program.call_spec.out_spec.context == ["loss", "logits"]
    with returning_tensors(module):
        assert "forward" in module.__dict__
    assert "forward" not in module.__dict__  # the class's forward again


@pytest.mark.parametrize("shape, named", [
    (lambda h, logits, loss: {"loss": loss, "parts": (t for t in (h, logits))},
     "holds a generator (at output['parts'])"),
    (lambda h, logits, loss: (loss, lambda: logits), "holds a function (at output[1])"),
])
def test_an_output_it_cannot_look_into_is_named(shape, named):
    with torch.device("meta"):
        module = Net(shape)
    with pytest.raises(TraceError) as error:
        analyze(module, (torch.empty(B, D, device="meta"),))
    message = str(error.value)
    assert named in message and "cannot trace model 'Net'" in message
    assert ".item()" not in message  # not about tensor values
