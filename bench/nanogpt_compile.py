"""GPT-2 124M as nanoGPT trains it, eager and compiled, against the peaks the nanoGPT sizing
notebook measured (../shared/reference/nanogpt_measured.md), as a markdown table.

    python bench/nanogpt_compile.py [BATCH ...]

nanoGPT's defaults: vocab 50304, bias, dropout 0, tied weights, sequences of 1024 tokens,
bf16 autocast over fp32 weights, fused AdamW, torch.compile, flash attention on a CUDA GPU
(an A100 here; the notebook does not name its GPU). graphcost's eager column uses the A100's
kernels (flash attention's saved tensors); its compiled column partitions the graphs Inductor
makes for the CPU, standing in for the GPU's (docs/compile.md). Each compiled row costs about
10 s here.
"""

from __future__ import annotations

import sys
import time
import warnings

import _root  # noqa: F401 - the repository root on sys.path

from graphcost import analyze

MEASURED_MIB = {1: 2269, 2: 2870, 4: 3918, 8: 6012, 16: 10206, 32: 18595}
MIB = 2**20


def main(batches: list[int]) -> None:
    warnings.simplefilter("ignore")
    print("| batch x 1024 | measured (nanoGPT, MiB) | graphcost eager (MiB) | | "
          "graphcost --compile (MiB) | | saved for backward, eager / compiled (MiB) | time |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for batch in batches:
        start = time.perf_counter()
        a = analyze("gpt2", batch=batch, seq=1024, precision="bf16-mixed", device="a100-80gb",
                    overrides={"vocab_size": 50304})
        eager = a.memory(optimizer_impl="fused").peak_bytes / MIB
        compiled = a.memory(optimizer_impl="fused", compile=True)
        peak = compiled.peak_bytes / MIB
        measured = MEASURED_MIB.get(batch)

        def diff(x: float) -> str:
            return f"{(x - measured) / measured:+.1%}" if measured else ""

        print(f"| {batch} | {measured or '-':,} | {eager:,.0f} | {diff(eager)} | {peak:,.0f} | "
              f"{diff(peak)} | {a.saved_activation_bytes / MIB:,.0f} / "
              f"{compiled.compiled.saved_activation_bytes / MIB:,.0f} | "
              f"{time.perf_counter() - start:.1f} s |", flush=True)


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or sorted(MEASURED_MIB))
