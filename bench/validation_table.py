"""Print docs/validation.md's table: graphcost against PyTorch's own measurements.

    python bench/validation_table.py > docs/validation-table.md

Parameters against the module's unique parameters and the published count
(../shared/reference/models.md), FLOPs against FlopCounterMode (meta device, forward and the
backward of the model's own loss), saved activations against autograd's saved tensors on a real
CPU run of a small config of the same family (fp32 and bf16).
"""

from __future__ import annotations

import warnings

import _root  # noqa: F401 - the repository root on sys.path, for validation/
import torch
from graphcost.models import SMALL_OVERRIDES, list_models, load

import graphcost
from validation.groundtruth import measure_flops, measure_saved_bytes

PUBLISHED = {
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200, "llama-7b": 6_738_415_616, "llama2-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320, "llama-65b": 65_285_660_672, "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496, "llama3-405b": 405_853_388_800,
}
SMALL = SMALL_OVERRIDES


def seq_of(name: str) -> int:
    return 32 if name == "resnet-cnn" else 1024 if "gpt2" in name else 2048


def row(model, quantity, ours, truth, reference="") -> str:
    mark = "yes" if ours == truth else "**NO**"
    return f"| {model} | {quantity} | {ours:,} | {truth:,} | {reference} | {mark} |"


def main() -> None:
    warnings.simplefilter("ignore")
    print("| model | quantity | graphcost | ground truth | reference | equal |")
    print("|---|---|---:|---:|---|---|")
    for name in list_models():
        seq = seq_of(name)
        module, inputs = load(name, batch=1, seq=seq, with_targets=True)
        a = graphcost.analyze(module, inputs)
        fwd, bwd = measure_flops(module, inputs)
        torch_params = sum(p.numel() for p in module.parameters())
        print(row(name, "params", a.params, torch_params, "module.parameters()"))
        if name in PUBLISHED:
            print(row(name, "params", a.params, PUBLISHED[name], "published"))
        shape = f"B=1, {seq}x{seq} images" if name == "resnet-cnn" else f"B=1, T={seq}"
        print(row(name, f"forward FLOPs ({shape})", a.forward_flops, fwd, "FlopCounterMode"))
        print(row(name, f"backward FLOPs ({shape})", a.backward_flops, bwd, "FlopCounterMode"))
    for name, small in SMALL.items():
        for dtype in (torch.float32, torch.bfloat16):
            seq = 32 if name == "resnet-cnn" else 16
            meta = load(name, batch=2, seq=seq, dtype=dtype, with_targets=True, **small)
            torch.manual_seed(0)
            real = load(name, batch=2, seq=seq, dtype=dtype, with_targets=True, device="cpu",
                        **small)
            a = graphcost.analyze(*meta)
            label = f"{name} small ({str(dtype).removeprefix('torch.')})"
            print(row(label, "saved activation bytes (B=2)", a.saved_activation_bytes,
                      measure_saved_bytes(*real), "autograd saved_tensors_hooks, CPU"))
    full = load("gpt2", batch=1, seq=256, with_targets=True)
    torch.manual_seed(0)
    real = load("gpt2", batch=1, seq=256, with_targets=True, device="cpu")
    print(row("gpt2 (full size, fp32)", "saved activation bytes (B=1, T=256)",
              graphcost.analyze(*full).saved_activation_bytes, measure_saved_bytes(*real),
              "autograd saved_tensors_hooks, CPU"))
    nano, inputs = load("gpt2", batch=1, seq=1024, bias=False, with_targets=True)
    a = graphcost.analyze(nano, inputs)
    print(row("gpt2 bias=False", "params", a.params, 124_337_664, "nanoGPT"))
    print(row("gpt2 bias=False", "forward FLOPs (T=1024)", a.forward_flops, 291_648_307_200,
              "nanoGPT transformer_sizing"))
    print(row("gpt2 bias=False", "forward+backward FLOPs", a.total_flops, 874_944_921_600,
              "nanoGPT transformer_sizing"))


if __name__ == "__main__":
    main()
