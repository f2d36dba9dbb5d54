"""EleutherAI's calculator scripts (github.com/EleutherAI/cookbook, calc/) against graphcost:
the documented examples of calc_transformer_params.py, calc_transformer_flops.py and
calc_transformer_mem.py (docs/parallel.md, "The calculator scripts' examples").

The scripts' formulas are written out below from their definitions, with named dimensions; the
scripts themselves are not used. The tests pin what the scripts print for the README's examples
and for the two runs their maintainers posted, then hold graphcost's numbers for the same
architecture to those formulas: equal where both count the same thing, off by a named term
where a formula leaves something out or assumes another implementation.
"""

from __future__ import annotations

import functools
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from graphcost.models import load
from graphcost.models.gpt_moe import GPTMoE, GPTMoEConfig, moe_15b, moe_15b_every_block

from graphcost import analyze
from graphcost.cli.main import main
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.parallel.plan import ParallelPlan, per_device_memory, zero_model_states_bytes

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
TOKENS = 300e9  # calc_transformer_flops.py's default --tokens
V, S = 51200, 2048  # the scripts' default --vocab-size and --sequence-length


# ------------------------------------------------------------- the scripts' formulas

def printed(x: float, units=("", "K", "M", "B", "T", "P", "E", "Z", "Y")) -> str:
    """How the scripts print a count: 3 digits per unit, rounded to 2 decimals."""
    i = int(math.floor(math.log(x, 1000)))
    return f"{round(x / 1000 ** i, 2)} {units[i]}"


def printed_flops(x: float) -> str:
    return printed(x, ("", "KFLOPs", "MFLOPs", "GFLOPs", "TFLOPs", "PFLOPs", "EFLOPs",
                       "ZFLOPs", "YFLOPs"))


def calc_params(L, h, *, V=V, s=S, moe=False, E=8, interval=1, ff=4, kv=1.0, tied=True):
    """calc_transformer_params.py: the head tied to the embedding (the flag --tied-embeddings
    in later versions, where untied is the default), a learned s x h position table, 4h^2
    attention (less for GQA), two ff x h^2 MLP matrices per layer and per expert, 13h per
    layer for LayerNorms and biases, an h x E router per MoE layer."""
    embedding = h * V * (1 if tied else 2)
    attention = int(2 * (1 + kv) * L * h * h)
    if moe:
        moe_layers = L / interval
        ffn = 2 * ff * moe_layers * E * h * h + 2 * ff * (L - moe_layers) * h * h
        gating = moe_layers * h * E
    else:
        ffn, gating = 2 * ff * L * h * h, 0
    return embedding + attention + ffn + h * s + 13 * L * h + gating


def calc_flops(L, h, *, tokens=TOKENS, V=V, s=S, kv=1.0, moe=False, E=128, interval=2,
               topk=1, checkpoint=True, ff=4, mlp_linears=2, infer=False) -> dict:
    """calc_transformer_flops.py: 2 FLOPs per multiply-add; x3 for forward and backward, x4
    with activation checkpointing (the default), x1 with --infer; the LM head ("embedding")
    always x3 (6 x tokens x h x V); MoE gating 2Eh / interval in all (not per token)."""
    k = 1 if infer else (4 if checkpoint else 3)
    out = {"qkv": int(k * 2 * (1 + 2 * kv) * L * tokens * h * h),
           "attention_matrix": k * 2 * L * tokens * s * h,
           "attention_over_values": k * 2 * L * tokens * s * h,
           "linear_projection": k * 2 * L * tokens * h * h,
           "ffn": int(k * 2 * mlp_linears * ff) * L * tokens * h * h,
           "embedding": 6 * tokens * h * V}
    if moe and topk > 1:
        out["ffn"] += out["ffn"] * topk / interval
    out["gating"] = 2 * E * h / interval if moe else 0
    out["total"] = sum(out.values())
    return out


def calc_mem_params(L, h, *, V=V, s=S, ff=4.0, mlp_linears=2, kv=1.0):
    """calc_transformer_mem.py's parameter count: an untied head (2Vh), a position table,
    8h per layer and 2h at the end for LayerNorms."""
    return (2 * V * h + h * s + 8 * h * L + 2 * h + int(2 * (1 + kv) * L * h * h)
            + mlp_linears * L * h * ff * h)


def calc_mem(L, s, a, h, b, *, checkpoint, zero, partition, tp, pp, gpus, V=V, ff=4.0,
             mlp_linears=2, low=2, grad_bytes=4, optimizer_bytes=12, bucket=5e8) -> dict:
    """calc_transformer_mem.py per GPU, training in mixed precision: weights `low` bytes / (tp
    x pp) (/ gpus at ZeRO-3), fp32 gradients (/ gpus from ZeRO-2, not divided by tp or pp),
    12 bytes of optimizer state (fp32 master weights and Adam's two moments, / gpus from
    ZeRO-1), DeepSpeed's all-gather bucket from ZeRO-1 on more than one GPU, and the
    activations of Korthikanti et al.: sbhL(16 low + 2) bytes with --checkpoint-activations,
    plus (2 low + 1) as/h without, / tp with --partition-activations."""
    params = calc_mem_params(L, h, V=V, s=s, ff=ff, mlp_linears=mlp_linears)
    model = params * low / (tp * pp) / (gpus if zero == 3 else 1)
    grads = params * grad_bytes / (gpus if zero >= 2 else 1)
    optimizer = params * optimizer_bytes / (gpus if zero >= 1 else 1)
    comm = (bucket * low if zero >= 1 and gpus > 1 else 0) + \
        (1e9 * low if zero == 3 and gpus > 1 else 0)
    per_layer = 16 * low + 2 + (0 if checkpoint else (2 * low + 1) * a * s / h)
    activations = s * b * h * L * per_layer / (tp if partition else 1)
    return {"params": params, "activations": activations, "model": model, "grads": grads,
            "optimizer": optimizer, "communication": comm,
            "total": activations + model + grads + optimizer + comm}


# The README's memory examples and the LLaMA one of the script's banner (flags as written)
PYTHIA_6_9B = dict(L=32, s=2048, a=32, h=4096, b=8, checkpoint=True, zero=1, partition=True,
                   pp=1, tp=2, gpus=128)
PYTHIA_12B = dict(L=36, s=2048, a=40, h=5120, b=8, checkpoint=True, zero=1, partition=True,
                  pp=1, tp=4, gpus=256)
DEFAULT_20B = dict(L=44, s=2048, a=64, h=6144, b=1, checkpoint=True, zero=1, partition=True,
                   pp=1, tp=1, gpus=1)
LLAMA_7B = dict(L=32, s=4096, a=32, h=4096, ff=3.5, b=1, checkpoint=False, zero=1,
                partition=False, pp=1, tp=1, gpus=1)


# ------------------------------------------------------------- what the scripts print

def test_the_formulas_reproduce_the_outputs_the_maintainers_posted():
    """cookbook PR #31: calc_transformer_flops.py at its defaults (the 20B: 44 layers of 6144);
    PR #37: calc_transformer_mem.py --infer on Qwen1.5-72B's shape (before --num-mlp-linears:
    two MLP matrices of 3h), 1-byte weights, ZeRO-3 over 2 GPUs."""
    f = calc_flops(44, 6144)
    assert [printed_flops(f[k]) for k in ("qkv", "attention_matrix", "attention_over_values",
                                          "linear_projection", "ffn", "embedding", "total")] \
        == ["11.96 ZFLOPs", "1.33 ZFLOPs", "1.33 ZFLOPs", "3.99 ZFLOPs", "31.89 ZFLOPs",
            "566.23 EFLOPs", "51.06 ZFLOPs"]
    qwen = dict(L=80, h=8192, V=152064, s=1024, ff=3)
    params = calc_mem_params(**qwen)
    assert printed(params) == "56.19 B"
    model_bytes = params * 1  # --low-prec-bytes-per-val 1
    assert f"{model_bytes / 2 / GiB:.2f}" == "26.17" and f"{model_bytes / GiB:.2f}" == "52.33"
    one_layer = 1024 * 1 * 8192 * (16 * 1 + 2)  # --infer: one layer's activations
    assert f"{one_layer / GiB:.2f}" == "0.14"


def test_the_readme_examples_print():
    assert printed(calc_params(96, 12288)) == "174.62 B"  # GPT-3 175B
    assert printed(calc_params(96, 12288, tied=False)) == "175.24 B"
    assert printed(calc_params(12, 768, moe=True, E=512)) == "29.07 B"  # "Fairseq-MoE 15B"
    assert printed(calc_params(12, 768, moe=True, E=512, tied=False)) == "29.1 B"
    assert printed(calc_params(12, 768, moe=True, E=512, interval=2)) == "14.6 B"
    assert printed_flops(calc_flops(96, 12288)["total"]) == "430.2 ZFLOPs"
    assert printed_flops(calc_flops(96, 12288, checkpoint=False)["total"]) == "322.93 ZFLOPs"
    assert printed_flops(calc_flops(12, 768, moe=True, E=512)["total"]) == "365.22 EFLOPs"
    assert printed_flops(calc_flops(12, 768, moe=True, E=512, checkpoint=False)["total"]) \
        == "291.61 EFLOPs"
    assert printed_flops(calc_flops(44, 6144, checkpoint=False)["total"]) == "38.44 ZFLOPs"
    shown = {}
    for name, example in (("pythia-6.9b", PYTHIA_6_9B), ("pythia-12b", PYTHIA_12B),
                          ("20b", DEFAULT_20B), ("llama-7b", LLAMA_7B)):
        m = calc_mem(**example)
        shown[name] = [printed(m["params"])] + [f"{m[k] / GiB:.2f}" for k in (
            "activations", "model", "grads", "optimizer", "communication", "total")]
    assert shown == {
        "pythia-6.9b": ["6.87 B", "34.00", "6.40", "25.60", "0.60", "0.93", "67.53"],
        "pythia-12b": ["11.86 B", "23.91", "5.52", "44.19", "0.52", "0.93", "75.06"],
        "20b": ["20.58 B", "17.53", "38.32", "76.65", "229.95", "0.00", "362.45"],
        "llama-7b": ["6.34 B", "97.00", "11.81", "23.63", "70.89", "0.00", "203.33"]}


# ------------------------------------------------------------- graphcost, same architectures

def _gpt(L, h, a, *, tied=True, seq=S, batch=1, **overrides):
    """The zoo's GPT-2 (nanoGPT: biases, LayerNorm, learned positions) at the scripts' sizes."""
    return load("gpt2", batch=batch, seq=seq, with_targets=True, n_layer=L, n_embd=h,
                n_head=a, vocab_size=V, block_size=seq, tie_weights=tied, **overrides)


@functools.cache
def _analysis(name: str):
    models = {"gpt3": lambda: _gpt(96, 12288, 96), "20b": lambda: _gpt(44, 6144, 64),
              "moe-15b": lambda: moe_15b(seq=S), "moe-15b-every": lambda: moe_15b_every_block()}
    return analyze(*models[name]())


@pytest.mark.parametrize("name, L, h, extra", [
    ("gpt3", 96, 12288, {}),
    ("moe-15b-every", 12, 768, dict(moe=True, E=512, interval=1)),
    ("moe-15b", 12, 768, dict(moe=True, E=512, interval=2)),
])
def test_parameters_are_the_formulas_plus_what_it_leaves_out(name, L, h, extra):
    """calc_transformer_params.py's 13h per layer is GPT-2's biases (9h) and two LayerNorms
    (4h); it leaves out the final LayerNorm (2h) and, in MoE layers, the biases of all but one
    expert ((E - 1) x 5h)."""
    moe_layers = L // extra.get("interval", 1) if extra else 0
    expert_biases = moe_layers * (extra.get("E", 1) - 1) * 5 * h
    assert _analysis(name).params == calc_params(L, h, **extra) + 2 * h + expert_biases


def test_memory_parameters_leave_out_five_biases_per_layer():
    """calc_transformer_mem.py counts 8h per layer for norms (GPT-2: 4h of LayerNorm and 9h of
    biases) and the untied head; graphcost's untied GPT-2 has 5h per layer more."""
    for example in (PYTHIA_6_9B, PYTHIA_12B, DEFAULT_20B):
        L, h, a, b = example["L"], example["h"], example["a"], example["b"]
        assert _mixed(L, h, a, b).params == calc_mem_params(L, h) + 5 * L * h
    # --tied-embeddings off in the parameter script is the same untied model
    assert analyze(*_gpt(2, 64, 4, tied=False)).params == \
        calc_params(2, 64, tied=False) + 2 * 64


def test_the_llama_example_is_not_llama():
    """The memory script's 'llama 7B' flags (-ff 3.5, two MLP matrices, vocab 51200, a position
    table, LayerNorm biases) count 6.34 B; the LLaMA-7B graphcost traces has 6,738,415,616,
    LLaMA's own formula: 2 x 32000 x h + L (4h^2 + 3 x 11008 x h + 2h) + h."""
    h, L, ffn = 4096, 32, 11008
    a = analyze(*load("llama-7b", seq=16))
    assert a.params == 2 * 32000 * h + L * (4 * h * h + 3 * h * ffn + 2 * h) + h == 6_738_415_616
    assert calc_mem_params(L, h, s=4096, ff=3.5) == 6_342_844_416


def _over_300b_tokens(flops_per_sequence: int) -> str:
    return printed_flops(flops_per_sequence / S * TOKENS)


@pytest.mark.parametrize("name, L, h, shown", [
    ("gpt3", 96, 12288, ("322.93 ZFLOPs", "395.41 ZFLOPs")),
    ("20b", 44, 6144, ("38.44 ZFLOPs", "47.07 ZFLOPs")),
])
def test_dense_flops_are_the_formula_less_what_recompute_skips(name, L, h, shown):
    """Per step of one 2,048-token sequence: graphcost's forward + backward is the formula with
    --no-checkpoint-activations to the FLOP; its forward is the --infer formula less 4hV per
    token (the script counts the head's 6hV even forward-only); with every block checkpointed
    it is the formula less 8h^2 per token and layer: PyTorch's non-reentrant checkpoint stops
    re-running the block once the backward has what it needs, and the MLP's second matmul keeps
    only its input, so it is not run again (the script re-runs whole layers, as Megatron's and
    DeepSpeed's reentrant checkpointing do)."""
    a = _analysis(name)
    tokens = S
    assert a.forward_flops + a.backward_flops == calc_flops(
        L, h, tokens=tokens, checkpoint=False)["total"]
    assert a.forward_flops == calc_flops(L, h, tokens=tokens, infer=True)["total"] \
        - 4 * h * V * tokens
    recompute = training_timeline(a, TrainingConfig(checkpoint="full", steps=1)).recompute_flops
    assert a.forward_flops + a.backward_flops + recompute == \
        calc_flops(L, h, tokens=tokens)["total"] - 8 * h * h * L * tokens
    assert (_over_300b_tokens(a.forward_flops + a.backward_flops),
            _over_300b_tokens(a.forward_flops + a.backward_flops + recompute)) == shown
    if name == "gpt3":
        assert printed_flops(8 * h * h * L * TOKENS) == "34.79 ZFLOPs"


def test_moe_flops_add_the_router():
    """The 'Fairseq-MoE 15B' FLOPs example (experts every other layer, top-1): graphcost adds
    the router, 2hE per token and MoE layer forward, x3 with the backward, where the script
    counts 2Eh / interval FLOPs in all; blocks checkpointed, the router runs again and the dense
    blocks' second MLP matmul does not, while the experts' does (the routing weights' multiply
    saves its output)."""
    L, h, E, interval, tokens = 12, 768, 512, 2, S
    a = _analysis("moe-15b")
    moe_layers, dense_layers = L // interval, L - L // interval
    router = 2 * h * E * moe_layers * tokens  # forward
    script = calc_flops(L, h, tokens=tokens, moe=True, E=E, checkpoint=False)
    assert a.forward_flops + a.backward_flops == script["total"] - script["gating"] + 3 * router
    recompute = training_timeline(a, TrainingConfig(checkpoint="modules:h.*", steps=1)) \
        .recompute_flops
    script = calc_flops(L, h, tokens=tokens, moe=True, E=E)
    assert a.forward_flops + a.backward_flops + recompute == (
        script["total"] - script["gating"] + 4 * router - 8 * h * h * dense_layers * tokens)
    assert printed_flops(script["gating"]) == "393.22 KFLOPs"
    assert (_over_300b_tokens(a.forward_flops + a.backward_flops),
            _over_300b_tokens(a.forward_flops + a.backward_flops + recompute)) \
        == ("295.86 EFLOPs", "362.39 EFLOPs")


def test_the_moe_model_is_what_pytorch_counts():
    """models/gpt_moe.py against FlopCounterMode and autograd's saved tensors."""
    from validation.groundtruth import measure_flops, measure_saved_bytes

    config = GPTMoEConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=100, block_size=16,
                          n_experts=4, top_k=2, expert_interval=2, dropout=0.1)
    ids = torch.randint(100, (2, 2, 16), generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        meta = GPTMoE(config)
    a = analyze(meta, (ids[0].to("meta"), ids[1].to("meta")))
    assert a.unsupported_ops == {}
    assert (a.forward_flops, a.backward_flops) == measure_flops(
        meta, (ids[0].to("meta"), ids[1].to("meta")))
    torch.manual_seed(0)
    assert a.saved_activation_bytes == measure_saved_bytes(GPTMoE(config), (ids[0], ids[1]))


# ------------------------------------------------------------- memory per GPU

@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("tp", [1, 2])
def test_zero_model_states_where_the_accounting_is_the_same(stage, tp):
    """With the script's bytes per parameter (2 weights, 4 gradients, 12 optimizer),
    graphcost's ZeRO formula on the tp-local parameters over the data-parallel ranks equals the
    script's per-GPU model + gradients + optimizer, except that the script divides only the
    weights by tp (and pp): below ZeRO-2 every GPU of a tensor-parallel group holds all the
    gradients, without ZeRO all the optimizer state too, and at ZeRO-3 the weights are divided
    by tp twice (by tp x pp, then by all the GPUs)."""
    example = dict(PYTHIA_6_9B, zero=stage, tp=tp, gpus=64 * tp)
    m = calc_mem(**example)
    params, dp = m["params"], 64
    ours = zero_model_states_bytes(params / tp, dp, stage, (2, 4, 12))
    script = m["model"] + m["grads"] + m["optimizer"]
    if stage == 0:
        expected = script - (4 + 12) * params * (1 - 1 / tp)
    elif stage == 1:
        expected = script - 4 * params * (1 - 1 / tp)
    elif stage == 2:
        expected = script
    else:
        expected = script + 2 * params / (tp * dp) * (1 - 1 / tp)
    assert ours == pytest.approx(expected, rel=1e-12)


@functools.cache
def _mixed(L, h, a, batch):
    """The memory examples' model in PyTorch's mixed precision (fp32 weights, bf16 compute)."""
    return analyze(*_gpt(L, h, a, tied=False, batch=batch), device="a100-80gb",
                   autocast=torch.bfloat16)


@pytest.mark.parametrize("name, example, shown", [
    ("pythia-6.9b", PYTHIA_6_9B, ["12.80", "12.80", "0.40", "7.63", "38.80"]),
    ("pythia-12b", PYTHIA_12B, ["11.05", "11.05", "0.35", "6.41", "33.50"]),
    ("20b", DEFAULT_20B, ["76.65", "76.65", "153.31", "3.11", "383.27"]),
])
def test_memory_examples_per_gpu(name, example, shown):
    """The README's memory examples in PyTorch's mixed precision (fp32 weights, gradients and
    AdamW moments), every block checkpointed, ZeRO-1 and partitioned activations, per GPU from
    named dimensions. Megatron's split leaves 12h^2 + 7h per layer, the embeddings and the head
    split over tp; 6h per layer (LayerNorms, row-parallel biases) and the final LayerNorm
    replicated. Kept for the backward: each block's fp32 input (split), the head's bf16 input
    and weight copy (split), the fp32 log-probabilities (whole: the logits are gathered for
    the loss), the final LayerNorm's fp32 input and statistics, the positions. The peak is the
    optimizer step: foreach AdamW's fp32 temporary per parameter (and a few KiB). Against the
    script: weights 2x (fp32, not its bf16 copy), gradients 1/tp (it does not split them),
    optimizer 2/3 (two moments; graphcost's weights are the master copy), activations far less
    (its 34sbh per layer is selective recomputation's, not what full checkpointing keeps)."""
    L, s_, a_, h_, b_, t = (example[k] for k in ("L", "s", "a", "h", "b", "tp"))
    dp = example["gpus"] // t
    plan = ParallelPlan(gpus=example["gpus"], tp=t, zero=1,
                        partition_activations=example["partition"] and t > 1)
    d = per_device_memory(_mixed(L, h_, a_, b_), plan, TrainingConfig(checkpoint="full"))[0]
    local = L * (12 * h_ * h_ + 7 * h_) // t + 6 * h_ * L + (2 * V * h_ + s_ * h_) // t + 2 * h_
    tensors = 12 * L + 5  # trainable parameters, each with a 4-byte AdamW step
    kept = ((4 * s_ * b_ * h_ * L + 2 * V * h_ + 2 * s_ * b_ * h_) // t
            + 4 * s_ * b_ * V + 4  # log-probabilities and the loss's fp32 total weight
            + 4 * s_ * b_ * h_ + 2 * 4 * s_ * b_ + 8 * s_)
    states = d.states
    assert (states.params_bytes, states.grads_bytes) == (4 * local, 4 * local)
    assert states.optimizer_state_bytes == math.ceil((8 * local + 4 * tensors) / dp)
    assert d.activation_bytes == kept
    assert d.peak_phase == "optimizer"
    assert d.peak_bytes == pytest.approx(states.total_bytes + 4 * local, rel=1e-5)
    assert [f"{x / GiB:.2f}" for x in (4 * local, 4 * local, d.states.optimizer_state_bytes,
                                       kept, d.peak_bytes)] == shown
    script = calc_mem(**example)
    assert states.params_bytes / script["model"] == pytest.approx(2, rel=1e-3)
    assert states.grads_bytes / script["grads"] == pytest.approx(1 / t, rel=1e-3)
    assert states.optimizer_state_bytes / script["optimizer"] == pytest.approx(2 / 3, rel=1e-3)
    assert kept < script["activations"] / 2


# The layer the script's activation formula describes (Korthikanti et al.): nanoGPT's unfused
# attention, dropout, 16-bit activations, CUDA kernels. s, b, h, a at a small size.
s, b, h, a = 64, 2, 64, 4


def _kept_per_layer(policy: str, plan: ParallelPlan) -> int:
    def kept(n_layer):
        m, i = load("gpt2", batch=b, seq=s, with_targets=True, dtype=torch.bfloat16,
                    n_layer=n_layer, n_embd=h, n_head=a, block_size=s, vocab_size=128,
                    flash=False, dropout=0.1, tie_weights=False)
        return per_device_memory(analyze(m, i, device="a100-80gb"), plan,
                                 TrainingConfig(checkpoint=policy))[0].activation_bytes
    return kept(2) - kept(1)


LAYERNORM_STATS = 2 * 2 * 4 * s * b  # two LayerNorms' fp32 mean and rstd per layer


def _script_per_layer(**flags) -> float:
    return calc_mem(L=1, s=s, a=a, h=h, b=b, zero=0, pp=1, gpus=flags.get("tp", 1),
                    **{"tp": 1, **flags})["activations"]


@pytest.mark.parametrize("policy, checkpoint", [("none", False), ("selective", True)])
def test_activations_per_layer_are_the_formula_on_its_own_layer(policy, checkpoint):
    """The script's activations without checkpointing, sbh(34 + 5as/h), are graphcost's with
    nothing recomputed; its 'checkpointed' 34sbh are graphcost's with the attention core
    recomputed (Megatron's selective recomputation); graphcost's only extra bytes are the
    LayerNorms' fp32 statistics."""
    assert _kept_per_layer(policy, ParallelPlan()) == \
        _script_per_layer(checkpoint=checkpoint, partition=False) + LAYERNORM_STATS


def test_full_checkpointing_keeps_the_block_input_not_34sbh():
    """What --checkpoint-activations does in GPT-NeoX (every layer checkpointed) keeps the
    layer's input, 2sbh, 1/17 of the script's figure; --partition-activations splits it."""
    script = _script_per_layer(checkpoint=True, partition=False)
    full = _kept_per_layer("modules:h.*", ParallelPlan())
    assert full == 2 * s * b * h == script / 17
    assert _kept_per_layer("modules:h.*", ParallelPlan(gpus=2, tp=2,
                                                        partition_activations=True)) == full / 2


def test_partitioned_activations_are_megatrons_split_with_sequence_parallelism():
    """The script divides all of a layer's activations by tp; in Megatron's split the norms'
    inputs, the residual stream and its dropout masks stay replicated unless sequence
    parallelism splits them: sbh(10 + 24/t) per layer (more than the script's 34/t), and
    34sbh/t with it."""
    t = 2
    script = _script_per_layer(checkpoint=True, partition=True, tp=t)
    assert script == 34 * s * b * h / t
    megatron = _kept_per_layer("selective", ParallelPlan(gpus=t, tp=t,
                                                         partition_activations=True))
    assert megatron == s * b * h * (10 + 24 / t) + LAYERNORM_STATS > script
    sp = _kept_per_layer("selective", ParallelPlan(gpus=t, tp=t, sequence_parallel=True))
    assert sp == script + LAYERNORM_STATS / t


def test_the_20b_example_activations_exceed_the_formula_by_what_is_outside_the_layers():
    """The whole 20B model (one sequence, the formula's layer): graphcost keeps 274 MB more
    than the script, checkpointed (selective, +1.5%) or not (+0.35%): the LayerNorms'
    statistics and, outside the layers, the bf16 log-probabilities, the final LayerNorm's input
    and output, the embedding's dropout mask and positions, which the formula leaves out."""
    L, s_, h_ = 44, 2048, 6144
    m, i = _gpt(L, h_, 64, tied=False, flash=False, dropout=0.1, dtype=torch.bfloat16)
    an = analyze(m, i, device="a100-80gb")
    outside = (s_ * V * 2  # log_softmax's output, bf16
               + 2 * s_ * h_ * 2 + 2 * 4 * s_  # ln_f's input and output, its statistics
               + s_ * h_  # the embedding dropout's mask
               + 8 * s_)  # the positions (int64) the position embedding keeps
    for policy, checkpoint in (("none", False), ("selective", True)):
        kept = training_timeline(an, TrainingConfig(checkpoint=policy, steps=1)) \
            .saved_activation_bytes
        script = calc_mem(**dict(DEFAULT_20B, checkpoint=checkpoint))["activations"]
        excess = kept - script - L * 2 * 2 * 4 * s_
        assert 0 <= excess - outside < 8  # and the loss's scalars
        assert 0.003 < (kept - script) / script < 0.015


# ------------------------------------------------------------- the commands in the docs

def _doc_commands():
    text = (ROOT / "docs" / "parallel.md").read_text()
    section = text.partition("## The calculator scripts' examples")[2].split("\n## ", 1)[0]
    for block in re.findall(r"```text\n(.*?)```", section, flags=re.S):
        for chunk in re.split(r"^(?=\$ graphcost )", block, flags=re.M):
            if chunk.startswith("$ graphcost "):
                command, _, output = chunk.partition("\n")
                yield command[len("$ graphcost "):], output.rstrip("\n").split("\n")


DOC_COMMANDS = list(_doc_commands())


def test_the_section_shows_commands():
    assert len(DOC_COMMANDS) >= 4


@pytest.mark.parametrize("command, shown", DOC_COMMANDS, ids=[c[:40] for c, _ in DOC_COMMANDS])
def test_doc_commands_print_what_the_docs_show(command, shown, capsys, monkeypatch):
    """Each `$ graphcost ...` in the section prints what follows it (up to a final '...')."""
    monkeypatch.chdir(ROOT)  # models/gpt_moe.py:FACTORY is relative to the root
    assert main(shlex.split(command)) == 0
    out = [line.rstrip() for line in capsys.readouterr().out.rstrip("\n").split("\n")]
    if shown[-1] == "...":
        shown, out = shown[:-1], out[:len(shown) - 1]
    assert out == [line.rstrip() for line in shown]
