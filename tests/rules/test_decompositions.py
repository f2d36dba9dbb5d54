"""Ops without a rule that PyTorch runs through their CompositeImplicitAutograd decomposition
(einsum, diff, normalize, the losses written in ATen ops...) are costed through that
decomposition: the ops eager PyTorch runs, with their rules, checked here against FlopCounterMode
and autograd's saved tensors on a real run."""

import pytest
import torch
import torch.nn.functional as F

from graphcost import analyze
from graphcost.rules.registry import OpCost, RuleRegistry
from tests.helpers import Fn, analyze_meta, assert_matches_pytorch, measure, on_activations

SHAPE = (2, 4, 6)

COMPOSITES = {
    "einsum_bmm": lambda x: torch.einsum("abc,abd->acd", x, x),
    "einsum_scan": lambda x: torch.einsum("bld,bld->bl", x, x.cumsum(1)),
    "einsum_bilinear": lambda x: torch.einsum("bi,oij,bj->bo", x[:, 0],
                                              torch.ones(4, 6, 6, device=x.device, dtype=x.dtype),
                                              x[:, 1]),
    "diff": lambda x: torch.diff(x, dim=-1),
    "normalize": lambda x: F.normalize(x, dim=-1),
    "mse_loss": lambda x: F.mse_loss(x, x * 2),
    "smooth_l1_loss": lambda x: F.smooth_l1_loss(x, x * 2),
}


@pytest.mark.parametrize("fn", COMPOSITES.values(), ids=COMPOSITES.keys())
def test_a_composite_op_is_costed_through_its_decomposition(fn, dtype):
    a = assert_matches_pytorch(*on_activations(fn, SHAPE), dtype)
    assert not any(r.op in ("aten.einsum.default", "aten.diff.default") for r in a.ops)


def test_einsum_flops_are_its_matmuls():
    b, i, j, k = 2, 4, 6, 6
    a = analyze_meta(*on_activations(lambda x: torch.einsum("bij,bik->bjk", x, x), (b, i, j)))
    assert a.forward_flops == 2 * b * i * j * k and a.backward_flops == 2 * a.forward_flops


def test_an_op_with_a_rule_is_kept_whole():
    """A rule (here a user's, for einsum) wins over the decomposition."""
    from graphcost.rules import REGISTRY

    rules = REGISTRY.merged({torch.ops.aten.einsum: lambda ctx: OpCost(forward_flops=7)})
    assert isinstance(rules, RuleRegistry)
    with torch.device("meta"):
        x = torch.randn(SHAPE, requires_grad=True)
    a = analyze(Fn(lambda x: torch.einsum("abc,abd->acd", x, x)), (x,), rules=rules)
    assert [r.op for r in a.ops if "einsum" in r.op] == ["aten.einsum.default"]
    assert a.forward_flops == 7


def test_cosine_similarity_saved_bytes():
    """Its composite clamps the norms in place (clamp_min_), which keeps nothing; the
    decomposition keeps the in-place op (an out-of-place clamp_min would keep its input)."""
    m = measure(*on_activations(lambda x: F.cosine_similarity(x, x * 2, -1), SHAPE))
    assert m["graphcost"] == m["pytorch"]


def test_the_cli_says_nothing_of_torch_internals_while_decomposing(tmp_path, capsys):
    """A model with an einsum: the report, and no warning torch raises inside its own
    decomposition pass (nothing a user can act on)."""
    from graphcost.cli.main import main

    model = tmp_path / "model.py"
    model.write_text("import torch\n"
                     "from torch import nn\n\n"
                     "class M(nn.Module):\n"
                     "    def __init__(self):\n"
                     "        super().__init__()\n"
                     "        self.proj = nn.Linear(8, 8)\n\n"
                     "    def forward(self, x):\n"
                     "        h = self.proj(x)\n"
                     "        return torch.einsum('bij,bik->bjk', h, h).sum()\n\n"
                     "def factory():\n"
                     "    return M(), (torch.empty(2, 4, 8),)\n")
    assert main(["analyze", f"{model}:factory"]) == 0
    out, err = capsys.readouterr()
    assert "aten.bmm.default" in out and "UNSUPPORTED" not in out
    assert err == ""
