"""Coverage: a corpus of small models (the zoo's families, vision models written with torch.nn,
a mixture of experts) costed with no unsupported op, FLOPs equal to FlopCounterMode's and saved
bytes equal to autograd's; `graphcost coverage`; a user's rule file from the command line."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load
from torch import nn

from graphcost import analyze
from graphcost.cli.main import main
from validation.groundtruth import measure_flops, measure_saved_bytes


class ConvNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.norm = nn.GroupNorm(4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = nn.functional.gelu(self.pw(self.dw(self.stem(x))))
        return self.head(self.norm(x).mean((2, 3)))


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 32))
        self.pos = nn.Parameter(torch.zeros(1, 17, 32))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(
            32, 4, 64, dropout=0.0, batch_first=True, norm_first=True) for _ in range(2)])
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def _vision(cls):
    def build(device):
        torch.manual_seed(0)
        with torch.device(device):
            return cls(), (torch.randn(2, 3, 16, 16, device=device),)
    return build


def _zoo(name, **overrides):
    def build(device):
        torch.manual_seed(0)
        return load(name, batch=2, seq=16, with_targets=True, device=device, **overrides)
    return build


CORPUS = {
    "convnet": _vision(ConvNet),
    "depthwise-separable": _vision(DepthwiseSeparable),
    "tiny-vit": _vision(TinyViT),
    "gpt2-unfused": _zoo("gpt2", **dict(SMALL_OVERRIDES["gpt2"], flash=False)),
    "mixtral-small": _zoo("mixtral-8x7b", n_layers=2, dim=64, n_heads=4, n_kv_heads=2,
                          vocab_size=100, ffn_dim=96, max_seq_len=64, n_experts=4, top_k=2),
    **{name: _zoo(name, **overrides) for name, overrides in SMALL_OVERRIDES.items()},
}


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_is_costed_exactly(name):
    build = CORPUS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unsupported op warns: fail on it
        a = analyze(*build("meta"))
    assert a.unsupported_ops == {}
    assert (a.forward_flops, a.backward_flops) == measure_flops(*build("meta"))
    model, inputs = build("cpu")
    model.train()
    assert a.saved_activation_bytes == measure_saved_bytes(model, inputs)


def test_coverage_lists_every_op_with_its_rule(capsys):
    code = main(["coverage", "gpt2", "--set", "n_layer=2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["unsupported_ops"] == {}
    rules = {r["op"]: r["rule"] for r in out["ops"]}
    assert rules["aten.linear.default"] == "graphcost.rules.matmul.linear_cost"
    assert all(r["supported"] for r in out["ops"])


LGAMMA_MODEL = """
    import torch
    from torch import nn

    class LogGamma(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x).lgamma()

    def factory():
        return LogGamma(), (torch.empty(4, 8),)
"""

LGAMMA_RULE = """
    import torch
    import graphcost

    @graphcost.register_rule(torch.ops.aten.lgamma, override=True)
    def lgamma_cost(ctx):
        x = ctx.inputs[0]
        return graphcost.OpCost(forward_flops=x.spec.numel)  # one FLOP per element, say
"""


def test_unsupported_op_is_listed_and_a_rule_file_fixes_it(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text(textwrap.dedent(LGAMMA_MODEL))
    code = main(["coverage", f"{model}:factory", "--strict"])
    out = capsys.readouterr().out
    assert code == 1 and "UNSUPPORTED" in out and "aten.lgamma" in out
    rules = tmp_path / "rules.py"
    rules.write_text(textwrap.dedent(LGAMMA_RULE))
    code = main(["coverage", f"{model}:factory", "--rules", str(rules), "--json"])
    ops = {r["op"]: r for r in json.loads(capsys.readouterr().out)["ops"]}
    assert code == 0 and ops["aten.lgamma.default"]["rule"].endswith("lgamma_cost")
    assert ops["aten.lgamma.default"]["forward_flops"] == 4 * 8
    from graphcost.rules import REGISTRY  # leave the global table as it was
    REGISTRY._rules.pop(torch.ops.aten.lgamma, None)


def test_a_bad_rule_file_exits_2(tmp_path, capsys):
    code = main(["coverage", "gpt2", "--rules", str(tmp_path / "missing.py")])
    assert code == 2 and "no such file" in capsys.readouterr().err
