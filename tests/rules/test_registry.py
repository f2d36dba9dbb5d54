"""The rule registry: one table keyed by ATen op; duplicates are errors; per-call overrides are
merged on top without touching the global table; unknown ops stay loud."""

import warnings

import pytest
import torch
from torch import nn

import graphcost
from graphcost.errors import UnsupportedOpError
from graphcost.rules import REGISTRY
from graphcost.rules.registry import DuplicateRuleError, OpCost, RuleRegistry, op_name
from tests.helpers import Fn, randn_inputs

aten = torch.ops.aten


def rule_a(ctx):
    return OpCost(forward_flops=1)


def rule_b(ctx):
    return OpCost(forward_flops=2)


def test_registering_an_op_twice_raises():
    reg = RuleRegistry()
    reg.register(aten.relu)(rule_a)
    with pytest.raises(DuplicateRuleError, match="aten.relu"):
        reg.register(aten.relu)(rule_b)
    assert reg.lookup(aten.relu.default) is rule_a


def test_override_replaces():
    reg = RuleRegistry()
    reg.register(aten.relu)(rule_a)
    reg.register(aten.relu, override=True)(rule_b)
    assert reg.lookup(aten.relu.default) is rule_b


def test_register_returns_the_rule_and_covers_every_op_given():
    reg = RuleRegistry()
    assert reg.register(aten.sin, aten.cos)(rule_a) is rule_a
    assert reg.lookup(aten.sin.default) is rule_a and reg.lookup(aten.cos.default) is rule_a


def test_merged_leaves_the_original_untouched():
    reg = RuleRegistry()
    reg.register(aten.relu)(rule_a)
    merged = reg.merged({aten.relu: rule_b, aten.sin.default: rule_b})
    assert merged.lookup(aten.relu.default) is rule_b
    assert merged.lookup(aten.sin.default) is rule_b
    assert reg.lookup(aten.relu.default) is rule_a
    assert reg.lookup(aten.sin.default) is None
    assert reg.merged(None).lookup(aten.relu.default) is rule_a


def test_global_table_untouched_by_merged():
    before = dict(REGISTRY._rules)
    REGISTRY.merged({aten.relu: rule_b, aten.lgamma: rule_b})
    assert REGISTRY._rules == before
    assert REGISTRY.lookup(aten.lgamma.default) is None


def test_lookup_falls_back_from_overload_to_packet():
    reg = RuleRegistry()
    reg.register(aten.add)(rule_a)
    assert reg.lookup(aten.add.Tensor) is rule_a
    assert reg.lookup(aten.add.Scalar) is rule_a
    assert reg.lookup(aten.sub.Tensor) is None


def test_exact_overload_wins_over_packet():
    reg = RuleRegistry()
    reg.register(aten.add)(rule_a)
    reg.register(aten.add.Scalar)(rule_b)
    assert reg.lookup(aten.add.Scalar) is rule_b
    assert reg.lookup(aten.add.Tensor) is rule_a


def test_op_names():
    assert op_name(aten.linear.default) == "aten.linear.default"
    assert op_name(aten.linear) == "aten.linear"
    assert op_name(rule_a) == "rule_a"


def _lgamma_model():
    return (lambda: Fn(lambda x: torch.lgamma(x).relu())), randn_inputs((3, 4))


def _meta(make_module, make_inputs):
    with torch.device("meta"):
        module = make_module()
    return module, make_inputs(torch.device("meta"), torch.float32)


def test_unknown_op_is_listed_and_warned_never_silently_zero():
    module, inputs = _meta(*_lgamma_model())
    with pytest.warns(UserWarning, match="aten.lgamma"):
        a = graphcost.analyze(module, inputs)
    assert a.unsupported_ops == {"aten.lgamma.default": 1}
    row = next(r for r in a.ops if r.op == "aten.lgamma.default")
    assert not row.supported


def test_unknown_op_is_an_error_when_strict():
    module, inputs = _meta(*_lgamma_model())
    with pytest.raises(UnsupportedOpError, match="aten.lgamma"):
        graphcost.analyze(module, inputs, strict=True)


def test_a_merged_rule_is_used_for_one_call_only():
    module, inputs = _meta(*_lgamma_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = graphcost.analyze(module, inputs, rules=REGISTRY.merged({aten.lgamma: rule_b}))
    assert a.unsupported_ops == {}
    assert a.forward_flops == 2
    with pytest.warns(UserWarning):
        assert graphcost.analyze(module, inputs).unsupported_ops == {"aten.lgamma.default": 1}


def test_registered_ops_are_aten_ops():
    """Every shipped rule is keyed by a real ATen op or overload (no typo can slip in)."""
    for op in REGISTRY.ops():
        assert isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)), op
        assert op_name(op).startswith("aten.")


def test_a_failing_rule_names_the_node():
    def broken(ctx):
        raise ValueError("boom")

    module, inputs = _meta(lambda: nn.Linear(4, 2), randn_inputs((3, 4)))
    with pytest.raises(graphcost.GraphcostError, match=r"aten.linear.default.*%linear.*boom"):
        graphcost.analyze(module, inputs, rules=REGISTRY.merged({aten.linear: broken}))
