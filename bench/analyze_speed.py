"""Wall time of graphcost.analyze vs FlopCounterMode forward+backward on the same meta models.

    python bench/analyze_speed.py [--repeat N]

Targets (issue 2): llama-7b (B=1, T=2048) under 3 s, llama3-405b (B=1, T=8192) under 15 s.
Each figure is the best of N runs in this process, after one warm-up analysis of a tiny model
(first-use imports and torch.export's one-time setup are excluded from both sides).
"""

from __future__ import annotations

import argparse
import time
import warnings

import _root  # noqa: F401 - the repository root on sys.path, for validation/
from graphcost.models import load

import graphcost
from validation.groundtruth import measure_flops

CASES = [("llama-7b", 1, 2048), ("llama3-405b", 1, 8192)]


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    graphcost.analyze(*load("gpt2", seq=8, n_layer=1, with_targets=True))  # warm-up

    print(f"{'model':<14}{'shape':>12}{'build s':>10}{'analyze s':>11}"
          f"{'FlopCounter s':>15}{'ratio':>8}  same FLOPs")
    for name, batch, seq in CASES:
        build_s, (module, inputs) = best_of(args.repeat, lambda: load(
            name, batch=batch, seq=seq, with_targets=True))
        analyze_s, a = best_of(args.repeat, lambda: graphcost.analyze(module, inputs))
        counter_s, flops = best_of(args.repeat, lambda: measure_flops(module, inputs))
        same = (a.forward_flops, a.backward_flops) == flops
        print(f"{name:<14}{f'{batch}x{seq}':>12}{build_s:>10.2f}{analyze_s:>11.2f}"
              f"{counter_s:>15.2f}{analyze_s / counter_s:>8.2f}  {same}")


if __name__ == "__main__":
    main()
