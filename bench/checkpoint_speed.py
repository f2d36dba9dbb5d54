"""Time to compare the built-in checkpoint policies and to find the optimal per-block mix.

    python bench/checkpoint_speed.py [--repeat N]

For each model: `compare` (one training-step walk per built-in policy) and `optimize` at a budget
halfway between the `full` and `save-matmuls` peaks, where some blocks must recompute matmuls
(the walks of the built-ins and the four per-block options, the integer program, and one walk
of the mix found). Each timed call gets a fresh analysis (not counted), so it pays for what a
first call pays: the shortened stacks it walks (passes/memory/stack.py) and what every walk of a graph
shares. scipy is imported before timing. Best of N. Figures: docs/checkpoint.md.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from graphcost.models import load

import graphcost
from graphcost.passes.checkpoint.policy import BUILTIN_POLICIES
from graphcost.passes.checkpoint.search import compare, optimize
from graphcost.passes.memory.training import TrainingConfig

# pure bf16 training at a batch where activations, not AdamW's state, set the peak
CASES = [("llama-7b", 8, 2048), ("llama3-405b", 4, 8192)]
GIB = 2**30


def best(fn, fresh, repeat):
    """Best time of `fn(analysis)` over `repeat` fresh analyses."""
    times, result = [], None
    for _ in range(repeat):
        analysis = fresh()
        start = time.perf_counter()
        result = fn(analysis)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import scipy.optimize  # noqa: F401 - a one-time import (~0.5 s), not the search
    config = TrainingConfig()
    print(f"{'model':<13}{'shape':>9}{'layers':>7}{'compare s':>11}{'optimize s':>12}"
          f"{'of it search s':>16}  budget -> optimum (best built-in)")
    for name, batch, seq in CASES:
        module, inputs = load(name, batch=batch, seq=seq, with_targets=True,
                              dtype=torch.bfloat16)
        layers = len(module.layers)

        def fresh(module=module, inputs=inputs):
            return graphcost.analyze(module, inputs)

        t_compare, rows = best(lambda a: compare(a, BUILTIN_POLICIES, config), fresh,
                               args.repeat)
        by = {r.policy: r for r in rows}
        budget = (by["full"].peak_bytes + by["save-matmuls"].peak_bytes) / 2
        t_opt, found = best(lambda a: optimize(a, budget, config), fresh, args.repeat)
        answer = (f"{budget / GIB:.1f} GiB -> {found.row.policy[:40]}"
                  f" {found.row.recompute_flops:.3g} FLOPs" if found.row else "nothing fits")
        if found.best_builtin:
            answer += f" ({found.best_builtin.policy} {found.best_builtin.recompute_flops:.3g})"
        print(f"{name:<13}{f'{batch}x{seq}':>9}{layers:>7}{t_compare:>11.2f}{t_opt:>12.2f}"
              f"{found.search_seconds:>16.2f}  {answer}")


if __name__ == "__main__":
    main()
