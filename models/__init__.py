"""The model zoo: published shapes, built on the meta device by default.

One table, ``ZOO``, maps a preset name to its family's model class and config. Everything
else (configs, models, example inputs) is looked up from it.

    >>> model, inputs = load("gpt2", batch=2, seq=128)  # meta tensors: nothing is allocated
    >>> model(*inputs).shape
    torch.Size([2, 128, 50257])
    >>> sum(p.numel() for p in build_model("gpt2").parameters())
    124439808
"""

import dataclasses
import difflib

import torch
import torch.nn as nn

from .cnn import ResNetCNN, ResNetCNNConfig
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig
from .transformer_lm import TransformerLM, TransformerLMConfig

__all__ = [
    "ZOO", "UnknownModelError", "list_models", "get_config", "build_model", "example_inputs", "load",
    "GPT2", "GPT2Config", "Llama", "LlamaConfig", "TransformerLM", "TransformerLMConfig",
    "ResNetCNN", "ResNetCNNConfig",
]

_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)

# preset name -> (model class, config)
ZOO = {
    "gpt2": (GPT2, GPT2Config(n_layer=12, n_embd=768, n_head=12)),
    "gpt2-medium": (GPT2, GPT2Config(n_layer=24, n_embd=1024, n_head=16)),
    "gpt2-large": (GPT2, GPT2Config(n_layer=36, n_embd=1280, n_head=20)),
    "gpt2-xl": (GPT2, GPT2Config(n_layer=48, n_embd=1600, n_head=25)),
    "llama-7b": (Llama, LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, **_LLAMA1)),
    "llama-13b": (Llama, LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, **_LLAMA1)),
    "llama-65b": (Llama, LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, ffn_dim=22016, **_LLAMA1)),
    "llama2-7b": (Llama, LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, **_LLAMA2)),
    "llama2-70b": (Llama, LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_LLAMA2)),
    "llama3-8b": (Llama, LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, **_LLAMA3)),
    "llama3-70b": (Llama, LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_LLAMA3)),
    "llama3-405b": (Llama, LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, **_LLAMA3)),
    # Mixtral 8x7B: 8 SwiGLU experts per layer, top-2 (balanced routing: models/moe.py)
    "mixtral-8x7b": (Llama, LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                                        vocab_size=32000, norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768,
                                        n_experts=8, top_k=2)),
    "cs336-gpt2-xl": (TransformerLM, TransformerLMConfig(
        vocab_size=50257, context_length=1024, n_layers=48, d_model=1600, n_heads=25, d_ff=6400)),
    "resnet-cnn": (ResNetCNN, ResNetCNNConfig(channels=(32, 64, 128), blocks=(2, 2, 2))),
}

_FAMILY_OF_CONFIG = {type(cfg): cls for cls, cfg in ZOO.values()}

# Example inputs default to the model's context length, but no longer than this for LLaMA,
# whose rope tables are sized for up to 8192 positions.
LLAMA_DEFAULT_SEQ = 2048


class UnknownModelError(KeyError, ValueError):
    """A zoo name that is not in ZOO. Both a KeyError (lookup) and a ValueError (bad argument)."""

    def __str__(self):  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def list_models() -> list[str]:
    """Names of every preset in the zoo, in table order."""
    return list(ZOO)


def _entry(name: str):
    if name not in ZOO:
        close = difflib.get_close_matches(str(name), ZOO, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(ZOO)}"
        )
    return ZOO[name]


def get_config(name: str, **overrides):
    """A fresh copy of the preset's config, with ``overrides`` replacing its fields."""
    _, config = _entry(name)
    return _with_overrides(config, overrides, name)


def _with_overrides(config, overrides: dict, name: str):
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hints = [f"{k!r} -> {m[0]!r}" for k in unknown if (m := difflib.get_close_matches(k, fields, n=1))]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ValueError(
            f"{name}: unknown config field(s) {unknown} for {type(config).__name__}{hint}; "
            f"valid fields are {sorted(fields)}"
        )
    return dataclasses.replace(config, **overrides)  # re-runs the config's own checks


def _family(config) -> type[nn.Module]:
    try:
        return _FAMILY_OF_CONFIG[type(config)]
    except KeyError:
        raise TypeError(
            f"{type(config).__name__} is not a zoo config; expected one of "
            f"{[c.__name__ for c in _FAMILY_OF_CONFIG]}"
        ) from None


def _build(config, dtype, device) -> nn.Module:
    with torch.device(device):
        model = _family(config)(config)
    return model.to(dtype)


def build_model(name: str, *, dtype=torch.float32, device="meta", **overrides) -> nn.Module:
    """Build preset ``name`` (fields replaced by ``overrides``) on ``device``, params in ``dtype``.

    >>> build_model("llama3-8b", n_layers=2).layers[0].attention.wk.weight.shape
    torch.Size([1024, 4096])
    """
    return _build(get_config(name, **overrides), dtype, device)


# Small configs of each family: real CPU runs for the ground-truth tests and benchmarks.
SMALL_OVERRIDES: dict[str, dict] = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=64),
    "llama3-8b": dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_dim=96,
                      max_seq_len=64),
    "cs336-gpt2-xl": dict(n_layers=2, d_model=64, n_heads=4, vocab_size=100, d_ff=128,
                          context_length=64),
    "resnet-cnn": {},
}


def max_context(name_or_config, **overrides) -> int | None:
    """The longest sequence the model accepts (None for models without one, like the CNN)."""
    config = get_config(name_or_config, **overrides) if isinstance(name_or_config, str) \
        else name_or_config
    for field in ("block_size", "context_length", "max_seq_len"):
        if hasattr(config, field):
            return getattr(config, field)
    return None


def _seq_len(config, seq):
    if isinstance(config, GPT2Config):
        limit, default = config.block_size, config.block_size
    elif isinstance(config, TransformerLMConfig):
        limit, default = config.context_length, config.context_length
    elif isinstance(config, LlamaConfig):
        limit, default = config.max_seq_len, min(config.max_seq_len, LLAMA_DEFAULT_SEQ)
    else:
        return seq if seq is not None else config.image_size
    if seq is None:
        return default
    if not 0 < seq <= limit:
        raise ValueError(
            f"seq={seq} is outside 1..{limit}, the context length of this "
            f"{type(config).__name__}; pass a shorter seq or override the context length"
        )
    return seq


def example_inputs(name_or_config, *, batch=1, seq=None, with_targets=False, device="meta",
                   dtype=torch.float32) -> tuple:
    """Inputs for ``model(*inputs)``: token ids (batch, seq) for LMs, images (batch, C, seq, seq)
    for the CNN, plus targets when ``with_targets``. ``dtype`` applies to float inputs only."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    _family(config)  # reject foreign configs early
    seq = _seq_len(config, seq)
    if isinstance(config, ResNetCNNConfig):
        x = _random((batch, config.in_channels, seq, seq), dtype, device)
        y = _random((batch,), torch.int64, device, high=config.num_classes)
    else:
        x = _random((batch, seq), torch.int64, device, high=config.vocab_size)
        y = _random((batch, seq), torch.int64, device, high=config.vocab_size, seed=1)
    return (x, y) if with_targets else (x,)


def _random(shape, dtype, device, high=None, seed=0):
    """Seeded random values made on the CPU then moved (same values on every device);
    on the meta device only the shape and dtype exist, so nothing is allocated."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    g = torch.Generator().manual_seed(seed)
    if high is None:
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return torch.randint(high, shape, generator=g).to(device)


def load(name: str, *, batch=1, seq=None, dtype=torch.float32, with_targets=False, device="meta",
         **overrides):
    """``(module, example_inputs)`` for preset ``name``, ready for ``module(*example_inputs)``."""
    config = get_config(name, **overrides)
    model = _build(config, dtype, device)
    inputs = example_inputs(config, batch=batch, seq=seq, with_targets=with_targets,
                            device=device, dtype=dtype)
    return model, inputs
