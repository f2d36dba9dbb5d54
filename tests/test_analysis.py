"""Every zoo model against PyTorch's own measurements (DESIGN.md, "Ground truth"):
parameters against the module's unique parameters, FLOPs against FlopCounterMode on the same
meta model, saved activations against autograd's saved tensors on a real CPU run."""

from __future__ import annotations

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, build_model, list_models, load

from graphcost import analyze
from validation.groundtruth import measure_flops, measure_saved_bytes

FULL_DEPTH_SEQ = {"resnet-cnn": 32}
# Small configs of each family for the real CPU runs (saved-tensor ground truth).
SMALL = {"gpt2": SMALL_OVERRIDES["gpt2"], "llama": SMALL_OVERRIDES["llama3-8b"],
         "cs336": SMALL_OVERRIDES["cs336-gpt2-xl"], "resnet": SMALL_OVERRIDES["resnet-cnn"]}
DEPTH_KEY = {"gpt2": "n_layer", "llama": "n_layers", "cs336": "n_layers"}


def family(name: str) -> str:
    if name.startswith("mixtral"):
        return "llama"  # the LLaMA code with mixture-of-experts feed-forwards
    return next(f for f in ("cs336", "gpt2", "llama", "resnet") if f in name)


def assert_flops_match(module, inputs, **kwargs):
    a = analyze(module, inputs, **kwargs)
    assert a.unsupported_ops == {}
    assert (a.forward_flops, a.backward_flops) == measure_flops(module, inputs)
    return a


@pytest.mark.parametrize("name", list_models())
def test_full_model_params_and_flops(name):
    """The whole preset at its real depth and width: params and FLOPs, fp32, batch 1."""
    module, inputs = load(name, batch=1, seq=FULL_DEPTH_SEQ.get(name, 128), with_targets=True)
    a = assert_flops_match(module, inputs)
    assert a.params == sum(p.numel() for p in module.parameters())
    assert a.trainable_params == a.params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 48)])
@pytest.mark.parametrize("name", [n for n in list_models() if n != "resnet-cnn"])
def test_flops_at_two_shapes_and_dtypes(name, shape, dtype):
    """Full width, two layers (FLOPs per layer do not depend on depth), two shapes, two dtypes."""
    batch, seq = shape
    module, inputs = load(name, batch=batch, seq=seq, dtype=dtype, with_targets=True,
                          **{DEPTH_KEY[family(name)]: 2})
    assert_flops_match(module, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_targets", [True, False])
@pytest.mark.parametrize("shape", [(2, 16), (1, 40)])
@pytest.mark.parametrize("name", ["gpt2", "llama3-8b", "llama-7b", "cs336-gpt2-xl", "resnet-cnn"])
def test_saved_bytes_match_autograd(name, shape, with_targets, dtype):
    """Saved activations equal what autograd saves on a real CPU forward of a small config."""
    batch, seq = shape
    small = SMALL[family(name)]
    if name == "resnet-cnn":
        seq = 16 if seq == 16 else 32
    meta_model, meta_inputs = load(name, batch=batch, seq=seq, dtype=dtype,
                                   with_targets=with_targets, **small)
    a = assert_flops_match(meta_model, meta_inputs)
    torch.manual_seed(0)
    cpu_model, cpu_inputs = load(name, batch=batch, seq=seq, dtype=dtype,
                                 with_targets=with_targets, device="cpu", **small)
    assert a.saved_activation_bytes == measure_saved_bytes(cpu_model, cpu_inputs)
    assert sum(r.saved_bytes for r in a.ops) == a.saved_activation_bytes


def _freeze_first_half(model):
    blocks = getattr(model, "layers", None) or getattr(model, "h")
    embedding = getattr(model, "tok_embeddings", None) or getattr(model, "wte")
    embedding.weight.requires_grad_(False)
    for p in blocks[0].parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("name", ["llama3-8b", "gpt2"])
def test_frozen_layers(name):
    """Frozen embedding and first block: no gradients for them, a shorter backward."""
    small = SMALL[family(name)]
    model, inputs = load(name, batch=2, seq=16, with_targets=True, **small)
    _freeze_first_half(model)
    a = assert_flops_match(model, inputs)
    assert a.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert a.trainable_params < a.params
    torch.manual_seed(0)
    cpu_model, cpu_inputs = load(name, batch=2, seq=16, with_targets=True, device="cpu", **small)
    _freeze_first_half(cpu_model)
    assert a.saved_activation_bytes == measure_saved_bytes(cpu_model, cpu_inputs)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_transformer_encoder_layer(dropout):
    def make(device):
        torch.manual_seed(0)
        with torch.device(device):
            layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=dropout,
                                                     batch_first=True)
            x = torch.randn(2, 16, 64)
        return layer, (x,)

    a = assert_flops_match(*make("meta"))
    assert a.saved_activation_bytes == measure_saved_bytes(*make("cpu"))


def test_tied_parameters_are_one_node():
    model = build_model("gpt2", n_layer=1)
    _, inputs = load("gpt2", seq=8, n_layer=1)
    a = analyze(model, inputs)
    params = [d for _, d in a.graph.nodes(data=True) if d["kind"] == "param"]
    tied = [d for d in params if len(d["names"]) > 1]
    assert [sorted(d["names"]) for d in tied] == [["lm_head.weight", "wte.weight"]]
    assert a.params == sum(p.numel() for p in model.parameters())


def test_nanogpt_sizing_figures():
    """nanoGPT's transformer_sizing numbers for GPT-2 124M, bias=False, T=1024
    (../shared/reference/models.md): matmul FLOPs per sequence, backward = 2x forward."""
    model, inputs = load("gpt2", batch=1, seq=1024, bias=False, with_targets=True)
    a = analyze(model, inputs)
    assert a.params == 124_337_664
    assert a.forward_flops == 291_648_307_200
    assert a.forward_flops + a.backward_flops == 874_944_921_600
    per_layer = {}
    for r in a.ops:
        if r.module_path.startswith("h.0."):
            kind = "mlp" if ".mlp" in r.module_path else "attention"
            per_layer[kind] = per_layer.get(kind, 0) + r.forward_flops
    assert per_layer == {"attention": 8_053_063_680, "mlp": 9_663_676_416}
    head = sum(r.forward_flops for r in a.ops if r.module_path == "lm_head")
    assert head == 79_047_426_048


def test_rows_add_up_to_totals():
    a = analyze(*load("llama3-8b", batch=1, seq=32, with_targets=True, **SMALL["llama"]))
    for rows in (a.by_op(), a.by_module(1), a.by_module(2), a.by_module(None)):
        assert sum(r.forward_flops for r in rows) == a.forward_flops
        assert sum(r.backward_flops for r in rows) == a.backward_flops
        assert sum(r.saved_bytes for r in rows) == a.saved_activation_bytes
    assert sum(r.params for r in a.by_module(1)) == a.params


def test_input_forms_give_the_same_analysis():
    """Meta tensors, TensorSpecs, graphcost.spec and a real CPU model all trace the same."""
    import graphcost

    small = SMALL["llama"]
    meta_model, meta_inputs = load("llama3-8b", batch=2, seq=16, with_targets=True, **small)
    cpu_model, cpu_inputs = load("llama3-8b", batch=2, seq=16, with_targets=True, device="cpu",
                                 **small)
    specs = (graphcost.spec((2, 16), torch.long), graphcost.TensorSpec((2, 16), torch.long))
    reference = analyze(meta_model, meta_inputs).totals()
    assert analyze(meta_model, specs).totals() == reference
    assert analyze(cpu_model, cpu_inputs).totals() == reference


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.proj(x))


class _Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # reads tensor data: cannot be traced on meta tensors
            return x
        return -x


def test_trace_error_names_module_and_line():
    from graphcost.errors import TraceError

    with torch.device("meta"):
        model, x = _DataDependent(), torch.empty(2, 8)
    with pytest.raises(TraceError) as info:
        analyze(model, (x,), strict=True)  # not strict: gate is an opaque op (test_trace_fallback)
    message = str(info.value)
    assert "_DataDependent" in message
    assert "in module gate (_Gate)" in message
    assert "if x.sum() > 0" in message
    assert "what to do" in message
