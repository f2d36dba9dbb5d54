"""Checkpoint policies, predicted against real CPU runs with torch.utils.checkpoint: the table in
docs/checkpoint.md.

    python bench/validate_checkpoint.py

Small configs of the zoo (4 blocks, batch 8 x 64 tokens; the CNN at 4 x 32 x 32), fp32, AdamW,
two steps. The plan is applied to the real module with graphcost.passes.checkpoint.apply (the unfused
GPT-2's written-out attention core is wrapped in checkpoint() by hand, as a user would). Peak:
validation/memtrack.py's live-tensor tracker; kept: live bytes after the first forward; recompute:
FlopCounterMode's FLOPs with the policy minus without it.
"""

from __future__ import annotations

import contextlib
import warnings

import _root  # noqa: F401 - the repository root on sys.path, for validation/
import torch
from graphcost.models import SMALL_OVERRIDES, load
from graphcost.models import gpt2 as gpt2_module
from torch.utils.checkpoint import checkpoint

from graphcost import analyze
from graphcost.passes.checkpoint.apply import checkpointed
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from validation.groundtruth import measure_flops
from validation.memtrack import measure_training_peak

FAMILIES = {
    "gpt2": ("gpt2", dict(SMALL_OVERRIDES["gpt2"], n_layer=4)),
    "gpt2 unfused": ("gpt2", dict(SMALL_OVERRIDES["gpt2"], n_layer=4, flash=False,
                                  dropout=0.1)),
    "llama3-8b": ("llama3-8b", dict(SMALL_OVERRIDES["llama3-8b"], n_layers=4)),
    "cs336-gpt2-xl": ("cs336-gpt2-xl", dict(SMALL_OVERRIDES["cs336-gpt2-xl"], n_layers=4)),
    "resnet-cnn": ("resnet-cnn", {}),
}
POLICIES = ["none", "full", "every-2", "sqrt", "selective", "save-matmuls"]


def _load(family: str, device: str):
    zoo, overrides = FAMILIES[family]
    shape = dict(batch=4, seq=32) if zoo == "resnet-cnn" else dict(batch=8, seq=64)
    return load(zoo, **shape, with_targets=True, device=device, **overrides)


@contextlib.contextmanager
def applied(model, plan):
    if plan.policy.kind == "selective" and any(r.start != r.stop for r in plan.regions):
        core = gpt2_module.attention_core
        gpt2_module.attention_core = lambda *a: checkpoint(core, *a, use_reentrant=False)
        try:
            yield
        finally:
            gpt2_module.attention_core = core
    else:
        with checkpointed(model, plan):
            yield


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| model | policy | peak predicted | peak measured | difference | kept predicted | "
          "kept measured | recompute FLOPs predicted | measured |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for family in FAMILIES:
        analysis = analyze(*_load(family, "meta"))
        base = sum(measure_flops(*_load(family, "cpu")))
        for policy in POLICIES:
            if family == "resnet-cnn" and policy == "selective":
                continue
            t = training_timeline(analysis, TrainingConfig(checkpoint=policy))
            torch.manual_seed(0)
            model, inputs = _load(family, "cpu")
            with applied(model, t.plan):
                m = measure_training_peak(model, inputs)
            model, inputs = _load(family, "cpu")
            with applied(model, t.plan):
                flops = sum(measure_flops(model, inputs))
            kept = [e for e in m.timeline if e.step == 0 and e.phase == "forward"][-1].live_bytes
            kept_p = [e for e in t.events if e.step == 0 and e.phase == "forward"][-1].total_bytes
            print(f"| {family} | {policy} | {t.peak_bytes:,} | {m.peak_bytes:,} | "
                  f"{t.peak_bytes - m.peak_bytes:+,} B | {kept_p:,} | {kept:,} | "
                  f"{t.recompute_flops:,} | {flops - base:,} |")


if __name__ == "__main__":
    main()
