"""Hugging Face models built in code from small configs and called the way training scripts call
them, `model(input_ids, labels=labels)` — not through the hf: loader. Each is checked against
PyTorch's own measurements of the same model (FlopCounterMode, autograd's saved tensors on a
real CPU run), with use_cache at its default (the output then holds a DynamicCache or
EncoderDecoderCache: graphcost.trace.outputs) and off (the case where transformers' mask code
used to take its export-only branch: graphcost.trace.masks)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphcost.trace.export import trace
from tests.helpers import assert_matches_pytorch, assert_user_error, run_cli
from validation.groundtruth import measure_flops, measure_saved_bytes

transformers = pytest.importorskip("transformers")

V, B, T = 128, 2, 16  # vocabulary, batch, tokens
LAYERS = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)


def build(name: str) -> nn.Module:
    """A two-layer model of each family, built in code."""
    tf = transformers
    special = dict(bos_token_id=1, eos_token_id=2)
    gpt2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=V, **special)
    return {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**gpt2)),  # dropout 0.1: math SDPA
        "gpt2-no-dropout": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            **gpt2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**LAYERS, num_key_value_heads=2,
                                                            vocab_size=V)),  # grouped-query
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**LAYERS, num_key_value_heads=1,
                                                            head_dim=16, vocab_size=V)),
        "gpt-neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**LAYERS, vocab_size=V)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(
            num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
            word_embed_proj_dim=64, vocab_size=V, pad_token_id=0, **special)),
        "clip-text": lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**LAYERS, vocab_size=V,
                                                               pad_token_id=0, **special)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0)),
    }[name]()


MODELS = ["gpt2", "gpt2-no-dropout", "llama", "gemma", "gpt-neox", "opt", "clip-text", "t5"]
LABELS = {name: name != "clip-text" for name in MODELS}  # CLIP's text tower has no loss


class Call(nn.Module):
    """`model(**dict(zip(names, tensors)), **options)`: a keyword call as a positional one."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], **options):
        super().__init__()
        self.model = model
        self.names = names
        self.options = options

    def forward(self, *tensors: torch.Tensor):
        return self.model(**dict(zip(self.names, tensors)), **self.options)


def called(name: str, *, use_cache: bool | None = None, padded: bool = False):
    """(make_module, make_inputs): `model(input_ids, [attention_mask,] labels=input_ids)`."""
    names = ("input_ids",) + (("attention_mask",) if padded else ()) + \
        (("labels",) if LABELS[name] else ())
    options = {} if use_cache is None else {"use_cache": use_cache}

    def make_inputs(device: torch.device, dtype: torch.dtype) -> tuple:
        ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
        mask = torch.ones(B, T, dtype=torch.long, device=device)
        if device.type != "meta":
            mask[1, -4:] = 0  # the second sequence is padded
        return (ids,) + ((mask,) if padded else ()) + ((ids,) if LABELS[name] else ())

    return (lambda: Call(build(name), names, **options)), make_inputs


# ---------------------------------------------------------------- figures against PyTorch


@pytest.mark.parametrize("use_cache", [None, False], ids=["use_cache-default", "no-cache"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_flop_counter_and_autograd(name, use_cache):
    if name == "clip-text" and use_cache is False:
        pytest.skip("CLIP's text tower has no cache")
    assert_matches_pytorch(*called(name, use_cache=use_cache))


@pytest.mark.parametrize("name", ["llama", "gpt2-no-dropout"])
def test_padded_attention_mask_matches_autograd(name):
    assert_matches_pytorch(*called(name, use_cache=False, padded=True))


def _eager_attention_calls(module: nn.Module, inputs: tuple, monkeypatch) -> list[tuple]:
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((None if attn_mask is None else tuple(attn_mask.shape), bool(is_causal),
                      bool(kwargs.get("enable_gqa", False)), tuple(k.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        module(*inputs)
    monkeypatch.undo()
    return calls


def _traced_attention_calls(module: nn.Module, inputs: tuple) -> list[tuple]:
    program = trace(module, inputs, reuse_blocks=False).program
    calls = []
    for node in program.graph.nodes:
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            args = dict(zip(("q", "k", "v", "attn_mask", "dropout_p", "is_causal"), node.args))
            args.update(node.kwargs)
            mask = args.get("attn_mask")
            calls.append((None if mask is None else tuple(mask.meta["val"].shape),
                          bool(args.get("is_causal", False)), bool(args.get("enable_gqa", False)),
                          tuple(args["k"].meta["val"].shape)))
    return calls


@pytest.mark.parametrize("name, padded", [
    *((name, False) for name in ("gpt2-no-dropout", "llama", "gemma", "opt", "clip-text", "t5")),
    ("llama", True), ("gpt2-no-dropout", True)])
def test_traced_attention_calls_are_eagers(name, padded, monkeypatch):
    """Each traced SDPA call is the eager run's: the same mask (none where eager skips it; the
    (B, 1, T, T) one where an attention_mask is passed in, whose values graphcost does not see,
    as for padded inputs), is_causal, enable_gqa and key shape (grouped-query attention without
    repeated heads where eager has none)."""
    make_module, make_inputs = called(name, use_cache=False, padded=padded)
    torch.manual_seed(0)
    eager = _eager_attention_calls(make_module(), make_inputs(torch.device("cpu"), torch.float32),
                                   monkeypatch)
    with torch.device("meta"):
        module = make_module()
    traced = _traced_attention_calls(module, make_inputs(torch.device("meta"), torch.float32))
    assert traced == eager and eager


class ExplicitCausalMask(nn.Module):
    """Attention with a causal mask written out in the forward (not transformers): eager passes
    the mask, so the trace must keep it."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.heads = heads

    def forward(self, x):  # (B, T, d)
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2)  # (B, h, T, d / h)
                   for z in self.qkv(x).chunk(3, dim=-1))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)


def test_an_explicit_causal_mask_is_kept():
    analysis = assert_matches_pytorch(
        ExplicitCausalMask, lambda device, dtype: torch.randn(B, T, 32, device=device))
    assert analysis.saved_activation_bytes > 0
    with torch.device("meta"):
        traced = _traced_attention_calls(ExplicitCausalMask(), (torch.randn(B, T, 32),))
    assert traced == [((T, T), False, False, (B, 4, T, 8))]


# ---------------------------------------------------------------- the cache in the output


def test_cache_tensors_are_outputs_alive_at_the_end_of_the_forward():
    """With use_cache at its default, Llama's output holds a DynamicCache: its keys and values
    (per layer, (B, kv heads, T, head dim)) are outputs of the forward, but not part of the
    loss (no gradient flows from them)."""
    from graphcost import analyze

    make_module, make_inputs = called("llama")
    with torch.device("meta"):
        module = make_module()
    analysis = analyze(module, make_inputs(torch.device("meta"), torch.float32),
                       reuse_blocks=False)
    outputs = analysis.graph.graph["outputs"]
    cache = [v for v in outputs if tuple(v.spec.shape) == (B, 2, T, 16)]
    assert len(cache) == 2 * 2  # keys and values of two layers
    assert not any(v.requires_grad for v in cache)
    assert [v.spec.shape for v in outputs if v.requires_grad] == [(), (B, T, V)]  # loss, logits


# ---------------------------------------------------------------- the command line


FACTORIES = '''
    import torch
    import transformers as tf
    from torch import nn

    LLAMA = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


    def llama(batch=2, seq=16):
        """model(input_ids): logits and the DynamicCache."""
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA))
        return model, (torch.zeros(batch, seq, dtype=torch.long),)


    class Train(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = tf.GPT2LMHeadModel(tf.GPT2Config(
                n_layer=2, n_embd=64, n_head=4, vocab_size=128, attn_pdrop=0.0, resid_pdrop=0.0,
                embd_pdrop=0.0, bos_token_id=1, eos_token_id=2))

        def forward(self, ids):
            return self.model(ids, labels=ids, use_cache=False)


    def gpt2_train(batch=2, seq=16):
        return Train(), (torch.zeros(batch, seq, dtype=torch.long),)


    class Streaming(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            y = self.proj(x)
            return {"loss": y.sum(), "chunks": (c for c in y.split(1))}


    def streaming():
        return Streaming(), (torch.zeros(2, 8),)
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "models_in_code.py"
    path.write_text(textwrap.dedent(FACTORIES))
    return path


@pytest.mark.parametrize("factory", ["llama", "gpt2_train"])
def test_cli_analyze_a_factory(capsys, factories, factory):
    import importlib.util

    code, out, err = run_cli(capsys, "analyze", f"{factories}:{factory}", "--json")
    assert code == 0, err
    got = json.loads(out)
    spec = importlib.util.spec_from_file_location("models_in_code", factories)
    namespace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(namespace)
    with torch.device("meta"):
        module, inputs = getattr(namespace, factory)()
    try:
        flops = measure_flops(module, inputs)
    except RuntimeError:  # transformers reads position values, which meta has not
        from tests.helpers import measure_flops_on_cpu

        with torch.device("cpu"):
            flops = measure_flops_on_cpu(*getattr(namespace, factory)())
    with torch.device("cpu"):
        module, inputs = getattr(namespace, factory)()
    assert (got["forward_flops"], got["backward_flops"], got["saved_activation_bytes"],
            got["params"]) == (*flops, measure_saved_bytes(module, inputs),
                               sum(p.numel() for p in module.parameters()))
    assert got["unsupported_ops"] == {}


def test_cli_an_output_it_cannot_look_into_names_its_type(capsys, factories):
    assert_user_error(capsys, ("analyze", f"{factories}:streaming"), "holds a generator")
    _, _, err = run_cli(capsys, "analyze", f"{factories}:streaming")
    assert "output['chunks']" in err and ".item()" not in err
