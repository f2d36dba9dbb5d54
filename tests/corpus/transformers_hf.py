"""Hugging Face transformers models built in code from a small config and called the way
training scripts call them: ``model(input_ids, labels=labels)``, use_cache left at its default
(a causal LM in training mode returns its cache too). The output is the library's ModelOutput
(loss, logits, ...); the ground truth's loss sums its floating tensors."""

from __future__ import annotations

import torch
from torch import nn

from . import Entry, inputs, ints

V, B, T = 100, 2, 16
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=4, bos_token_id=1, eos_token_id=2))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**SMALL, num_labels=3))


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64,
                                               num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0))


def gpt2_checkpointed() -> nn.Module:
    """GPT-2 trained with transformers' own activation checkpointing (non-reentrant, per
    layer), as `Trainer(gradient_checkpointing=True)` sets it up."""
    model = gpt2()
    model.config.use_cache = False  # transformers turns the cache off under checkpointing
    model.gradient_checkpointing_enable()
    return model


def llama_checkpointed() -> nn.Module:
    model = llama()
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    return model


def llama_checkpointed_reentrant() -> nn.Module:
    model = llama()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def with_mask(device, dtype):
    ids = torch.randint(0, V, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, -4:] = 0  # the second sequence is padded
    return ids, mask, torch.randint(0, 3, (B,), device=device)


ENTRIES = [
    Entry("hf_gpt2_lm", "hf", gpt2, inputs(ints(V, B, T), ints(V, B, T)),
          "GPT2LMHeadModel(input_ids, labels=...), returns loss, logits and the cache",
          kwarg_names=("labels",)),
    Entry("hf_llama_lm", "hf", llama, inputs(ints(V, B, T), ints(V, B, T)),
          "LlamaForCausalLM(input_ids, labels=...), GQA, returns loss, logits and the cache",
          kwarg_names=("labels",)),
    Entry("hf_gpt2_grad_ckpt", "hf", gpt2_checkpointed, inputs(ints(V, B, T), ints(V, B, T)),
          "GPT2LMHeadModel after gradient_checkpointing_enable() (dropout 0.1)",
          kwarg_names=("labels",)),
    Entry("hf_llama_grad_ckpt", "hf", llama_checkpointed, inputs(ints(V, B, T), ints(V, B, T)),
          "LlamaForCausalLM after gradient_checkpointing_enable() (rotary tables passed by "
          "keyword)", kwarg_names=("labels",)),
    Entry("hf_llama_grad_ckpt_reentrant", "hf", llama_checkpointed_reentrant,
          inputs(ints(V, B, T), ints(V, B, T)),
          "LlamaForCausalLM, gradient_checkpointing_enable(use_reentrant=True)",
          kwarg_names=("labels",)),
    Entry("hf_bert_cls", "hf", bert, with_mask,
          "BertForSequenceClassification with a padding attention_mask and labels (dropout 0.1)",
          kwarg_names=("attention_mask", "labels")),
    Entry("hf_t5_seq2seq", "hf", t5, inputs(ints(V, B, T), ints(V, B, 8)),
          "T5ForConditionalGeneration(input_ids, labels=...): decoder inputs shifted from labels",
          kwarg_names=("labels",)),
]
