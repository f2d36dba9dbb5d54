"""Time to compare the built-in checkpoint policies and to find the optimal per-block mix.

    python bench/checkpoint_speed.py [--repeat N]

For each model: analyze once (not counted), then `compare` (one training-step walk per built-in
policy) and `optimize` at a budget halfway between the `full` and `none` peaks (the walks of
the four per-block options, which compare shares, the integer program, and one walk of the
mix found). Best of N. Figures: docs/checkpoint.md.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import graphcost
from graphcost.models import load
from graphcost.passes.checkpoint import BUILTIN_POLICIES
from graphcost.passes.checkpoint_search import compare, optimize
from graphcost.passes.schedule import TrainingConfig

# pure bf16 training at a batch where activations, not AdamW's state, set the peak
CASES = [("llama-7b", 8, 2048), ("llama3-405b", 4, 8192)]
GIB = 2**30


def best(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    config = TrainingConfig()
    print(f"{'model':<13}{'shape':>9}{'layers':>7}{'compare s':>11}{'optimize s':>12}"
          f"{'of it search s':>16}  budget -> optimum (best built-in)")
    for name, batch, seq in CASES:
        module, inputs = load(name, batch=batch, seq=seq, with_targets=True,
                              dtype=torch.bfloat16)
        analysis = graphcost.analyze(module, inputs)
        layers = len(module.layers)
        t_compare, rows = best(lambda: compare(analysis, BUILTIN_POLICIES, config), args.repeat)
        by = {r.policy: r for r in rows}
        budget = (by["full"].peak_bytes + by["none"].peak_bytes) / 2
        t_opt, found = best(lambda: optimize(analysis, budget, config), args.repeat)
        answer = (f"{budget / GIB:.1f} GiB -> {found.row.policy[:40]}"
                  f" {found.row.recompute_flops:.3g} FLOPs" if found.row else "nothing fits")
        if found.best_builtin:
            answer += f" ({found.best_builtin.policy} {found.best_builtin.recompute_flops:.3g})"
        print(f"{name:<13}{f'{batch}x{seq}':>9}{layers:>7}{t_compare:>11.2f}{t_opt:>12.2f}"
              f"{found.search_seconds:>16.2f}  {answer}")


if __name__ == "__main__":
    main()
