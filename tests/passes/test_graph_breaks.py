"""Graph breaks (graphcost/passes/graph_breaks.py): where torch.compile would split a model,
asked of dynamo on fake tensors, against the graphs a real torch.compile makes on real tensors
(torch._dynamo.testing.CompileCounter counts them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from graphcost.errors import TraceError
from graphcost.passes.compiled import compiled_step
from graphcost.passes.graph_breaks import UnknownBreaks, graph_breaks
from tests.helpers import run_cli


class Logged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = self.a(x).relu()
        print("between the layers")  # dynamo cannot trace print: a graph break
        return self.b(h)


class Plain(Logged):
    def forward(self, x):
        return self.b(self.a(x).relu())


class Branchy(Logged):
    def forward(self, x):
        h = self.a(x)
        if h.sum().item() > 0:  # a branch on a value: dynamo breaks and runs it on values
            h = h.relu()
        return self.b(h)


def _real_graphs(cls) -> int:
    torch.manual_seed(0)
    counter = CompileCounter()
    torch._dynamo.reset()
    torch.compile(cls(), backend=counter)(torch.randn(8, 16))
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("cls", [Logged, Plain], ids=["print", "none"])
def test_the_breaks_are_those_of_a_real_compile(cls, capsys):
    with torch.device("meta"):
        module, x = cls(), torch.randn(8, 16)
    breaks = graph_breaks(module, (x,))
    assert len(breaks) + 1 == _real_graphs(cls)
    assert all(b.startswith("test_graph_breaks.py:") and "print" in b for b in breaks)


def test_a_model_dynamo_cannot_run_on_fake_tensors_is_said_unknown():
    """A branch on a value (`.item()`): the breaks are not known, and the partition, on fake
    tensors too, cannot run it."""
    with torch.device("meta"):
        module, x = Branchy(), torch.randn(8, 16)
    with pytest.raises(UnknownBreaks, match="DataDependent"):
        graph_breaks(module, (x,))
    # nor can the partition run it: one clear error, after the warning
    with pytest.warns(UserWarning, match="cannot tell where torch.compile would break"), \
            pytest.raises(TraceError, match="cannot partition the model as torch.compile would"):
        compiled_step(module, (x,))


def test_memory_compile_names_the_breaks(tmp_path, capsys):
    path = tmp_path / "logged.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class Logged(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)\n\n"
        "    def forward(self, x):\n"
        "        h = self.a(x).relu()\n"
        "        print('between the layers')\n"
        "        return self.b(h)\n\n\n"
        "def build(batch=8):\n"
        "    return Logged(), (torch.randn(batch, 16),)\n")
    code, out, err = run_cli(capsys, "memory", f"{path}:build", "--compile")
    assert code == 0 and "Graph breaks (1):" in out and "logged.py:12:" in out
    assert "graphcost: torch.compile would break Logged into several graphs" in err
