"""Roofline step time against measured CPU training steps, after `graphcost calibrate`.

    python bench/validate_cpu_time.py [--threads N] [--steps N] [--calibrate-seconds S]

Calibrates this machine (torch.mm FLOP/s per dtype, copy bandwidth) with the thread count the
steps will use, then for each config: the predicted time of one fp32 AdamW training step
(graphcost.passes.roofline, efficiencies 1.0: the calibrated figures are already achieved
ones) against the median of `--steps` real steps after two warm-up steps (zero_grad, forward,
backward, optimizer.step). With --compile, also the same step compiled: graphcost's roofline
of the kernels Inductor generates (passes/roofline_compiled.py) against the median of real
`torch.compile(model)` steps (the first compiles; 15-30 s each here). Prints a markdown table
for docs/validation.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from graphcost.models import load

from graphcost import analyze
from graphcost.hardware.calibrate import calibrate
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.roofline import Efficiency, training_step_time

CONFIGS = [
    ("gpt2 4x512", "gpt2", dict(n_layer=4, n_embd=512, n_head=8, vocab_size=8192,
                                 block_size=256), 4, 256),
    ("gpt2 4x768", "gpt2", dict(n_layer=4, n_embd=768, n_head=12, vocab_size=8192,
                                 block_size=512), 2, 512),
    ("llama 4x512", "llama3-8b", dict(n_layers=4, dim=512, n_heads=8, n_kv_heads=4,
                                      vocab_size=8192, ffn_dim=1536, max_seq_len=256), 4, 256),
    ("llama 4x1024", "llama3-8b", dict(n_layers=4, dim=1024, n_heads=16, n_kv_heads=8,
                                       vocab_size=8192, ffn_dim=2816, max_seq_len=512), 2, 512),
]


def measure(zoo: str, overrides: dict, batch: int, seq: int, steps: int,
            compiled: bool = False) -> float:
    torch.manual_seed(0)
    model, inputs = load(zoo, batch=batch, seq=seq, with_targets=True, device="cpu",
                         **overrides)
    model.train()
    opt = torch.optim.AdamW(model.parameters())
    torch._dynamo.reset()
    run = torch.compile(model) if compiled else model
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        run(*inputs).backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--calibrate-seconds", type=float, default=6.0)
    parser.add_argument("--compile", action="store_true",
                        help="also the compiled step, predicted and measured")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    cal = calibrate("cpu", seconds=args.calibrate_seconds, dtypes=("float32",),
                    threads=args.threads)
    device = cal.device
    print(f"calibrated: fp32 matmul {device.matmul_flops_per_s('float32') / 1e9:.1f} GFLOP/s, "
          f"copy {device.memory_bandwidth_bytes_per_s() / 1e9:.1f} GB/s, "
          f"{args.threads} thread(s)\n")
    compiled_header = (" compiled predicted s | compiled measured s | error |"
                       if args.compile else "")
    print("| config | batch x seq | predicted s | measured s | error | MFU (predicted) | "
          "time in memory-bound ops |" + compiled_header)
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.compile else ""))
    for label, zoo, overrides, batch, seq in CONFIGS:
        analysis = analyze(*load(zoo, batch=batch, seq=seq, with_targets=True, **overrides))
        step = training_step_time(analysis, device)
        measured = measure(zoo, overrides, batch, seq, args.steps)
        by = step.seconds_by_bound()
        row = (f"| {label} | {batch} x {seq} | {step.step_time_s:.3f} | {measured:.3f} | "
               f"{(step.step_time_s - measured) / measured:+.0%} | {step.mfu:.0%} | "
               f"{by['memory'] / (by['memory'] + by['compute']):.0%} |")
        if args.compile:
            predicted = analysis.step_time(device, TrainingConfig(compile=True),
                                           Efficiency()).step_time_s
            real = measure(zoo, overrides, batch, seq, args.steps, compiled=True)
            row += f" {predicted:.3f} | {real:.3f} | {(predicted - real) / real:+.0%} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
