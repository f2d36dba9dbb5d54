"""Time of `graphcost memory` (analyze + training timeline) and of `graphcost fit`, next to
PyTorch's MemTracker running the same training step on the same model under FakeTensorMode.

    python bench/memory_speed.py [--repeat N] [--skip-memtracker]

MemTracker runs one forward + backward + AdamW step on fake CPU tensors (it needs real or fake
tensors, not meta); its figure is one run, model build included. graphcost's are the best of N runs.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from graphcost.models import load, max_context

import graphcost
from graphcost.passes.memory.timeline import training_timeline
from graphcost.sizing.fit import fit

CASES = [("llama-7b", 1, 2048), ("llama3-405b", 1, 8192)]
# NB: MemTracker on llama3-405b takes about 4 minutes here; --skip-memtracker leaves it out.


def graphcost_memory(name: str, batch: int, seq: int) -> tuple[float, int]:
    start = time.perf_counter()
    module, inputs = load(name, batch=batch, seq=seq, with_targets=True)
    peak = training_timeline(graphcost.analyze(module, inputs)).peak_bytes
    return time.perf_counter() - start, peak


def graphcost_fit(name: str, seq: int) -> tuple[float, object]:
    start = time.perf_counter()
    result = fit(lambda b, t, training: load(name, batch=b, seq=t, with_targets=training),
                 device="h100-sxm", seq=seq, model_max_seq=max_context(name))
    return time.perf_counter() - start, result


def memtracker_step(name: str, batch: int, seq: int) -> tuple[float, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    start = time.perf_counter()
    module, inputs = load(name, batch=batch, seq=seq, with_targets=True)  # meta
    with FakeTensorMode(allow_non_fake_inputs=True):
        module = module.to_empty(device="cpu")  # fake CPU tensors: no memory is allocated
        inputs = tuple(torch.zeros(t.shape, dtype=t.dtype) for t in inputs)
        opt = torch.optim.AdamW(module.parameters())
        tracker = MemTracker()
        tracker.track_external(module, opt, *inputs)
        with tracker:
            module(*inputs).backward()
            opt.step()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-memtracker", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    graphcost_memory("gpt2", 1, 8)  # warm-up: first-use imports and export setup
    print(f"{'model':<14}{'shape':>10}{'memory s':>10}{'peak GiB':>10}"
          f"{'MemTracker s':>14}{'its peak GiB':>14}{'difference':>12}")
    for name, batch, seq in CASES:
        runs = [graphcost_memory(name, batch, seq) for _ in range(args.repeat)]
        seconds, peak = min(r[0] for r in runs), runs[0][1]
        mt = ("-", "-") if args.skip_memtracker else memtracker_step(name, batch, seq)
        mt_s = mt[0] if isinstance(mt[0], str) else f"{mt[0]:.2f}"
        mt_peak = mt[1] if isinstance(mt[1], str) else f"{mt[1] / 2**30:.1f}"
        diff = "-" if isinstance(mt[1], str) else f"{(peak - mt[1]) / mt[1]:+.3%}"
        print(f"{name:<14}{f'{batch}x{seq}':>10}{seconds:>10.2f}{peak / 2**30:>10.1f}"
              f"{mt_s:>14}{mt_peak:>14}{diff:>12}")
    print(f"\n{'model':<14}{'fit s':>8}  answer (h100-sxm, fp32, adamw)")
    for name, _, seq in CASES:
        runs = [graphcost_fit(name, seq) for _ in range(args.repeat)]
        seconds, r = min(run[0] for run in runs), runs[0][1]
        print(f"{name:<14}{seconds:>8.2f}  train max batch {r.train_max_batch} @ {seq}, "
              f"max context {r.train_max_seq}; inference max batch {r.infer_max_batch}, "
              f"max context {r.infer_max_seq}")


if __name__ == "__main__":
    main()
