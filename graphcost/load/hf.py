"""Hugging Face models from a config: `hf:path/to/config.json` or `hf:path/to/model_dir`.

The config is read with `transformers.AutoConfig` (local files only, no network), the model is
built with the Auto class of its task on the meta device (no weights are read or allocated),
and wrapped so that `module(*inputs)` returns the loss (with labels) or the logits:

    task      Auto class                        inputs (batch B, sequence T, image size S)
    causal    AutoModelForCausalLM              input_ids, attention_mask [, labels]
    masked    AutoModelForMaskedLM              input_ids, attention_mask, token_type_ids
                                                [, labels]
    seq2seq   AutoModelForSeq2SeqLM             input_ids, decoder_input_ids, attention_mask
                                                [, labels]
    image     AutoModelForImageClassification   pixel_values (B, C, S, S) [, labels (B,)]

Token inputs are (B, T) int64: ids 0 and no padding (attention_mask all ones).

`transformers` is an optional dependency: `pip install graphcost[hf]`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphcost.errors import ConfigError
from graphcost.optional import require

MAX_DEFAULT_SEQ = 2048  # --seq defaults to the config's position table, at most this
DEFAULT_SEQ = 512  # for configs without a position table (T5's relative positions)
# --set keys that choose an implementation rather than set a config field
IMPLEMENTATION_KEYS = ("attn_implementation", "experts_implementation")
# the position table's length, under the names configs give it
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


@dataclass(frozen=True)
class HFModel:
    """What `load_hf` built: the wrapped module, its example inputs, and what was chosen."""

    name: str  # the model directory's name (or the config file's stem)
    model_type: str  # the config's model_type: "llama", "gpt2", ...
    task: str  # "causal", "masked", "seq2seq" or "image"
    module: nn.Module
    inputs: tuple
    max_seq: int | None  # the config's position table (None: relative positions, images)


class HFWrapper(nn.Module):
    """`forward(*inputs)` -> `model(**dict(zip(input_names, inputs)))`'s loss, else its logits.

    With `shifted_labels` a causal LM's labels are also passed as already shifted
    (`shift_labels`, as packed-sequence trainers pass them), so the loss makes no copy of the
    shifted int64 labels (B x T x 8 bytes): a copy that a batch of one does not need, which
    would make the step's ops differ between batch 1 and 2, where `fit` extrapolates from.

    The Hugging Face model's children are registered as this module's own, so module paths
    read as the model's (`model.layers.0.self_attn`, not `hf.model.layers.0.self_attn`)."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...],
                 shifted_labels: bool = False):
        super().__init__()
        object.__setattr__(self, "hf_model", model)  # not a child: its children are ours
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        self.input_names = input_names
        self.shifted_labels = shifted_labels

    def train(self, mode: bool = True) -> HFWrapper:
        self.hf_model.training = mode
        return super().train(mode)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs))
        if self.shifted_labels and "labels" in named:
            named["shift_labels"] = named["labels"]
        out = self.hf_model(**named)
        return out.loss if "labels" in self.input_names else out.logits


# ---------------------------------------------------------------- config


def _transformers():
    return require("transformers", "hf", "an hf: model")


def config_path(text: str) -> Path:
    """The config.json that `hf:TEXT` names: the file itself, or `TEXT/config.json`."""
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in the directory {text!r}; give hf:path/to/"
                              "config.json or a model directory that holds a config.json")
    elif not path.is_file():
        raise ConfigError(f"Hugging Face config {text!r} not found; give hf:path/to/config.json "
                          "or hf:path/to/model_dir (relative to the current directory)")
    return path


def model_name(path: Path) -> str:
    """`models/llama3-8b/config.json` -> "llama3-8b"; `configs/tiny-gpt2.json` -> "tiny-gpt2"."""
    path = path.resolve()
    return path.parent.name if path.name == "config.json" else path.stem


def read_config(path: Path, overrides: Mapping[str, Any]):
    """The config at `path` with the `--set` fields applied (each must be a config field)."""
    transformers = _transformers()
    try:
        config, unused = transformers.AutoConfig.from_pretrained(
            str(path), local_files_only=True, return_unused_kwargs=True, **overrides)
    except Exception as exc:  # a bad file or model_type: say which, and why
        raise ConfigError(f"cannot read the Hugging Face config {str(path)!r}: "
                          f"{type(exc).__name__}: {_first_line(exc)}; give a config.json "
                          "saved by transformers (with a model_type it knows, transformers "
                          f"{transformers.__version__})") from None
    if unused:
        fields = ", ".join(sorted(k for k in config.to_dict() if not k.startswith("_")))
        raise ConfigError(f"--set {', '.join(sorted(unused))}: no such field in the "
                          f"{config.model_type} config {str(path)!r}; its fields: {fields}")
    return config


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


def max_positions(config) -> int | None:
    """The length of the config's position table, None when it has none."""
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------- task and inputs


def _mapping_names(mapping: Mapping[str, Any]) -> set[str]:
    names = set()
    for value in mapping.values():
        names |= {value} if isinstance(value, str) else set(value)
    return names


def _tasks(transformers) -> dict[str, tuple[Mapping[str, Any], Any]]:
    auto = transformers.models.auto.modeling_auto
    return {  # in the order they are tried for a config that names no architecture
        "seq2seq": (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                    transformers.AutoModelForSeq2SeqLM),
        "causal": (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, transformers.AutoModelForCausalLM),
        "masked": (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, transformers.AutoModelForMaskedLM),
        "image": (auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                  transformers.AutoModelForImageClassification),
    }


def choose_task(config, transformers) -> str:
    """The task of the config's first `architectures` entry, else the first task whose Auto
    class knows the model_type (seq2seq for encoder-decoders, masked LM for encoders)."""
    tasks = _tasks(transformers)
    for arch in (getattr(config, "architectures", None) or [])[:1]:
        for task, (mapping, _) in tasks.items():
            if arch in _mapping_names(mapping):
                return task
    model_type = config.model_type
    known = [task for task, (mapping, _) in tasks.items() if model_type in mapping]
    if "seq2seq" in known and getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if "causal" in known and ("masked" not in known or getattr(config, "is_decoder", False)):
        return "causal"
    for task in ("masked", "image", "seq2seq"):
        if task in known:
            return task
    raise ConfigError(f"model_type {model_type!r} has no causal LM, masked LM, seq2seq LM or "
                      "image classification class in transformers; graphcost builds those four "
                      "kinds of model from a config")


def example_inputs(task: str, config, *, batch: int, seq: int, targets: bool,
                   dtype: torch.dtype, accepts: set[str],
                   device: str | torch.device = "meta") -> tuple[tuple[str, ...], tuple]:
    """(input names, tensors) for the task's forward: token ids 0, no padding."""
    device = torch.device(device)
    if task == "image":
        channels = getattr(config, "num_channels", 3)
        named = {"pixel_values": torch.empty(batch, channels, seq, seq, dtype=dtype, device=device)}
        if targets:
            named["labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        def ids() -> torch.Tensor:  # (B, T)
            return torch.zeros(batch, seq, dtype=torch.long, device=device)

        named = {"input_ids": ids()}
        if task == "seq2seq":
            named["decoder_input_ids"] = ids()
        if "attention_mask" in accepts:  # no padding: all ones, as a tokenizer gives
            named["attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=device)
        if task == "masked" and "token_type_ids" in accepts:  # one segment, as a tokenizer gives
            named["token_type_ids"] = ids()
        if targets:
            named["labels"] = ids()
    return tuple(named), tuple(named.values())


# ---------------------------------------------------------------- building


SDPA = "graphcost_sdpa"  # transformers' SDPA attention, its masks decided as in an eager run


def unpadded_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None,
                       **kwargs: Any) -> torch.Tensor | None:
    """transformers' `sdpa_mask` on graphcost's inputs, which have no padding (attention_mask
    all ones, one sequence per row): called without the attention_mask, which masks nothing.
    Whether a mask is built at all is then transformers' own decision on no padding, taken as
    in an eager run (under torch.export too: graphcost.trace.masks): none where only causality
    limits attention, and SDPA runs with `is_causal`. (With the attention_mask, the decision
    would read its values, which an export cannot: it would always build the (B, 1, T, T)
    mask, a different kernel with other saved tensors, and an eager run on meta tensors would
    fail.)"""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=None, **kwargs)


def _register_sdpa(transformers) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if SDPA not in transformers.AttentionInterface._global_mapping:
        transformers.AttentionInterface.register(SDPA, sdpa_attention_forward)
        transformers.AttentionMaskInterface.register(SDPA, unpadded_sdpa_mask)


EXPERTS = "graphcost_balanced"  # transformers' fused experts, dispatched as if balanced


def balanced_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """A transformers experts module (fused `gate_up_proj` / `down_proj` weights) run with
    balanced routing, graphcost's MoE assumption (graphcost.models.moe, docs/moe.md): the N x k
    (token, choice) pairs are dealt to the E experts in equal blocks of C = ceil(N k / E) slots
    (pair p goes to expert p // C) and each expert runs one matmul on its C tokens. Shapes do
    not depend on the routing, so it traces; the router runs and its weights scale the outputs,
    but its choice of experts is not used."""
    # NB: the FLOPs are those of N k expert tokens (plus E C - N k padding slots when E does
    # not divide N k), as for any routing; transformers' `grouped_mm` does the same work on the
    # tokens actually routed, its `batched_mm` gathers a copy of the expert weights per token.
    n, k = top_k_index.shape
    up = self.gate_up_proj if self.has_gate else self.up_proj  # (E, out, D) or transposed
    e, d = up.shape[0], hidden_states.shape[-1]
    capacity = -(-n * k // e)
    slot = torch.arange(e * capacity, device=hidden_states.device)  # (E C,)
    valid = (slot < n * k).to(top_k_weights.dtype)  # slots past N k carry no weight
    slot = slot % (n * k)
    token_of = slot // k
    x = hidden_states[token_of].view(e, capacity, d)  # (E, C, D)
    up_bias = _bias(self, "gate_up_proj_bias" if self.has_gate else "up_proj_bias")
    h = _expert_linear(x, up, up_bias, self.is_transposed).reshape(e * capacity, -1)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # (E C, I)
    y = _expert_linear(h.view(e, capacity, -1), self.down_proj, _bias(self, "down_proj_bias"),
                       self.is_transposed).reshape(e * capacity, d)  # (E C, D)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    w = top_k_weights.reshape(-1)[slot] * valid  # (E C,)
    out = torch.zeros_like(hidden_states)
    return out.index_add(0, token_of, (y * w[:, None]).to(hidden_states.dtype))  # (N, D)


def _bias(experts: nn.Module, name: str) -> torch.Tensor | None:
    return getattr(experts, name) if experts.has_bias else None


def _expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   transposed: bool) -> torch.Tensor:
    """(E, C, in) through each expert's weight: (E, out, in), or (E, in, out) when transposed."""
    y = torch.bmm(x, weight if transposed else weight.transpose(1, 2))  # (E, C, out)
    return y if bias is None else y + bias[:, None, :]


def _register_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS, balanced_experts_forward)


def _build(transformers, auto_class, config, implementations: dict[str, Any],
           device: str | torch.device) -> nn.Module:
    """`auto_class.from_config` on `device`: SDPA attention where the model has it (else
    eager); fused mixture-of-experts layers with balanced routing (`balanced_experts_forward`:
    transformers' own routing depends on the data and does not trace on meta)."""
    kwargs = dict(implementations)
    if "attn_implementation" not in kwargs:
        model_class = auto_class._model_mapping.get(type(config), None)
        sdpa = getattr(model_class, "_supports_sdpa", False)
        if sdpa:
            _register_sdpa(transformers)
        kwargs["attn_implementation"] = SDPA if sdpa else "eager"
    if _has_experts(config) and "experts_implementation" not in kwargs:
        _register_experts()
        kwargs["experts_implementation"] = EXPERTS
    try:
        with torch.device(device):
            return auto_class.from_config(config, **kwargs)
    except Exception as exc:  # transformers' message says what is wrong
        raise ConfigError(f"building {type(config).__name__} with {auto_class.__name__} "
                          f"failed: {type(exc).__name__}: {_first_line(exc)}; check the config "
                          "and --set values") from None


def _has_experts(config) -> bool:
    fields = ("num_local_experts", "num_experts", "n_routed_experts")
    return any(getattr(config, f, None) for f in fields)


def load_hf(text: str, *, batch: int = 1, seq: int | None = None, targets: bool = True,
            dtype: torch.dtype = torch.float32, overrides: Mapping[str, Any] | None = None,
            device: str | torch.device = "meta") -> HFModel:
    """The model of a Hugging Face config (`text`: a config.json or a model directory) on the
    meta device, with (batch, seq) example inputs; labels, and training mode, when `targets`.
    (`device="cpu"` builds it for real, randomly initialised: for checks on small configs.)

    `seq` is the token count (the image size for image models) and defaults to the config's
    position table, at most 2,048. `overrides` set config fields (`num_hidden_layers=2`);
    `attn_implementation` and `experts_implementation` choose transformers' kernels instead.
    """
    transformers = _transformers()
    overrides = dict(overrides or {})
    implementations = {k: overrides.pop(k) for k in IMPLEMENTATION_KEYS if k in overrides}
    path = config_path(text)
    config = read_config(path, overrides)
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no key/value cache in the outputs: graphcost derives its own
    task = choose_task(config, transformers)
    limit = max_positions(config) if task != "image" else None
    if task == "image":  # an image model's seq is its image size
        if seq is not None:
            config.image_size = seq
        seq = config.image_size
    elif seq is None:
        seq = min(limit, MAX_DEFAULT_SEQ) if limit else DEFAULT_SEQ
    elif limit is not None and seq > limit:
        field = next(f for f in POSITION_FIELDS if getattr(config, f, None) == limit)
        raise ConfigError(f"--seq {seq} is beyond the {config.model_type} config's {field} "
                          f"{limit}; give a shorter --seq or --set {field}={seq}")
    model = _build(transformers, _tasks(transformers)[task][1], config, implementations, device)
    model = model.to(dtype)  # NB: floating parameters and buffers only, as nn.Module.to does
    accepts = set(inspect.signature(model.forward).parameters)
    names, inputs = example_inputs(task, config, batch=batch, seq=seq, targets=targets,
                                   dtype=dtype, accepts=accepts, device=device)
    module = HFWrapper(model, names, shifted_labels=task == "causal")
    module.train(targets)  # training: dropout as configured; inference: eval()
    return HFModel(model_name(path), config.model_type, task, module, inputs, limit)

