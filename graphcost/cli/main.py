"""The command line: `graphcost <verb> MODEL [options]`.

    graphcost analyze llama-7b --batch 1 --seq 2048
    graphcost analyze gpt2 --seq 128 --json
    graphcost analyze path/to/model.py:factory --device h100-sxm
    graphcost memory gpt2 --checkpoint full --json
    graphcost checkpoint llama-7b --device a100-80gb --budget 40GiB --plot pareto.png
    graphcost roofline llama-7b --device a100-80gb --precision bf16 --top 5
    graphcost cost llama-7b --tokens 1.4e12 --device a100-80gb --gpus 2048 --usd-per-hour 2
    graphcost sweep gpt2 --device h100-sxm --batch 1,2,4,8 --seq 512,1024 --csv sweep.csv
    graphcost devices

MODEL is a zoo name (`graphcost models` lists them), `path/to/file.py:factory`, where
`factory()` returns `(module, example_inputs)` and runs under `torch.device("meta")`, or
`hf:path/to/config.json` (a Hugging Face config, docs/huggingface.md).
Errors a user can cause print one line-led message, `graphcost: error: ...`, and exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
import warnings

import torch

from graphcost.analysis.analyze import analyze
from graphcost.errors import GraphcostError
from graphcost.hardware.devices import (
    DEFAULT_DEVICE,
    PRESETS,
    Device,
    dtype_key,
    dtype_label,
    get_device,
    parse_size,
    save_device_file,
)
from graphcost.load.model import CliError, dtype_name, load_model, parse_dtype, parse_overrides
from graphcost.models import list_models, max_context
from graphcost.passes.checkpoint.policy import BUILTIN_POLICIES, parse_policy, plan
from graphcost.passes.checkpoint.search import compare, optimize
from graphcost.passes.memory.inference import inference_memory
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import OPTIMIZER_IMPLS, OPTIMIZERS, TrainingConfig
from graphcost.passes.roofline import (
    Efficiency,
    compute_bound_batch,
    decode_time,
    forward_time,
    memory_bound_context,
    training_cost,
    training_step_time,
)
from graphcost.report.analysis import render, unsupported_line
from graphcost.report.checkpoint import checkpoint_optimum_dict, checkpoint_report
from graphcost.report.memory import fit_report, inference_report, memory_report
from graphcost.report.parallel import parallel_memory_report, plan_report
from graphcost.report.roofline import (
    ROOFLINE_SORTS,
    SWEEP_COLUMNS,
    cost_report,
    roofline_inference_report,
    roofline_report,
    sweep_table,
)
from graphcost.report.units import (
    UNITS_NOTE,
    format_bandwidth,
    format_bytes,
    format_count_short,
    format_flops,
    format_flops_per_s,
    table,
)
from graphcost.sizing.fit import DEFAULT_RESERVE_BYTES, fit

EXIT_USAGE = 2


MODEL_HELP = "zoo name, path/to/file.py:factory or hf:path/to/config.json"

def _argument(convert, ok, expected: str):
    """An argparse type: `convert(text)` that passes `ok`, else 'expected <expected>'."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive = _argument(int, lambda v: v >= 1, "a positive integer")
_non_negative = _argument(int, lambda v: v >= 0, "0 or a positive integer")
_fraction = _argument(float, lambda v: 0 < v <= 1, "a fraction in (0, 1], e.g. 0.5")
_positive_number = _argument(float, lambda v: 0 < v < math.inf, "a positive number")


# ---------------------------------------------------------------- running the analysis


@contextlib.contextmanager
def _quiet_torch():
    """Hold back what torch.export prints while it works (a partial graph on stderr, internal
    log lines): on success it is passed on, on failure graphcost's own message replaces it.
    Warnings are collected and printed once each afterwards."""
    captured = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    ok = False
    try:
        with contextlib.redirect_stderr(captured), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield
        ok = True
    finally:
        logging.disable(previous)
        if ok:
            sys.stderr.write(captured.getvalue())
            shown = set()
            for w in seen:
                text = str(w.message)
                if not text.startswith("graphcost:"):
                    text = f"graphcost: warning: {w.category.__name__}: {text}"
                if text not in shown:
                    shown.add(text)
                    print(text, file=sys.stderr)


def cmd_analyze(args: argparse.Namespace) -> int:
    dtype = parse_dtype(args.dtype) if args.dtype is not None else None
    model, analysis = _analysis(args, dtype)
    if args.json:
        from graphcost.passes.experts import moe_summary

        moe = moe_summary(analysis)
        out = {**analysis.to_dict(module_depth=args.depth), "batch": model.batch,
               **(moe.as_dict() if moe else {}),
               "seq": model.seq, "dtype": model.dtype, "tokens": model.tokens}
        print(json.dumps(out))
    else:
        print(render(analysis, depth=args.depth, top=args.top, tokens=model.tokens,
                            dtype=model.dtype), end="")
    return 0


def _precision(args: argparse.Namespace) -> tuple[str | None, torch.dtype | None]:
    """--precision as (the dtype to cast the model to, the torch.autocast dtype)."""
    if args.precision == "bf16-mixed":  # fp32 weights, ops under torch.autocast(bfloat16)
        return "fp32", torch.bfloat16
    return (parse_dtype(args.precision) if args.precision is not None else None), None


def _analysis(args: argparse.Namespace, dtype: str | None, autocast: torch.dtype | None = None):
    """Load MODEL from the shared options and analyze it: (LoadedModel, Analysis)."""
    device = device_from_args(args)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        with _quiet_torch():  # --json: whatever the model file prints must not reach stdout
            model = load_model(args.model, batch=args.batch, seq=args.seq, dtype=dtype,
                               targets=not args.no_targets, overrides=parse_overrides(args.set))
            analysis = analyze(model.module, model.inputs, device=device, strict=args.strict,
                               model_name=model.name, autocast=autocast)
    return model, analysis


def cmd_coverage(args: argparse.Namespace) -> int:
    from graphcost.analysis.coverage import coverage

    dtype = parse_dtype(args.dtype) if args.dtype is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unsupported ops are the report itself
        model, analysis = _analysis(_with(args, strict=False), dtype)  # list, then --strict
    rows = coverage(analysis)
    missing = [r for r in rows if not r.supported]
    if args.json:
        print(json.dumps({"model": model.name, "ops": [dict(r.__dict__, supported=r.supported)
                                                       for r in rows],
                          "unsupported_ops": analysis.unsupported_ops}))
    else:
        body = [[r.op, format(r.count, ","), r.rule or "UNSUPPORTED",
                 format_flops(r.forward_flops) if r.forward_flops else "0"]
                for r in rows]
        print(f"graphcost coverage: {model.name}: {len(rows)} distinct ops, "
              f"{sum(r.count for r in rows):,} nodes, "
              + (f"{len(missing)} UNSUPPORTED (not counted: add rules, docs/rules.md)"
                 if missing else "every op has a rule") + "\n")
        print(table(["op", "nodes", "rule", "fwd FLOPs"], body, align="lrll"))
    return 1 if missing and args.strict else 0


def cmd_memory_inference(args: argparse.Namespace) -> int:
    dtype, autocast = _precision(args)
    if args.plot:
        raise CliError("--plot draws the training timeline; drop --plot or --inference")
    if parse_policy(args.checkpoint).kind != "none":
        raise CliError("--checkpoint applies to training (inference keeps nothing for a "
                       "backward); drop --checkpoint or --inference")
    args.seq = args.context or args.seq
    args.no_targets = True
    model, analysis = _analysis(args, dtype, autocast)
    mem = inference_memory(analysis)
    if args.json:
        print(json.dumps({
            "model": model.name, "device": analysis.device.name, "batch": model.batch,
            "context": model.seq, "dtype": model.dtype, "peak_bytes": mem.peak_bytes,
            "peak_at": {"phase": "prefill", "op": mem.peak_op, "module": mem.peak_module},
            "breakdown_at_peak": {"params": mem.weight_bytes, "kv_cache": mem.kv_cache_bytes,
                                  "activations": mem.activation_peak_bytes},
            "kv_cache_bytes_per_token": mem.kv_cache_bytes_per_token,
            "unsupported_ops": analysis.unsupported_ops}))
    else:
        print(inference_report(mem, model=model.name, device=analysis.device.name,
                                      batch=model.batch, context=model.seq), end="")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    if args.inference:
        return cmd_memory_inference(args)
    if args.context is not None:
        raise CliError("--context is the cached context of --inference; for training use --seq")
    dtype, autocast = _precision(args)
    config = TrainingConfig(optimizer=args.optimizer, steps=args.steps,
                            grad_accumulation=args.grad_accumulation,
                            optimizer_impl=args.optimizer_impl, checkpoint=args.checkpoint)
    plan = _plan(args)
    if plan is not None and args.plot:
        raise CliError("--plot draws one device's timeline; drop --plot or the parallel plan")
    model, analysis = _analysis(args, dtype, autocast)
    if plan is not None:
        return cmd_memory_parallel(args, plan, model, analysis, config)
    timeline = training_timeline(analysis, config)
    if args.plot:
        try:
            from graphcost.report.plot import memory_timeline_png
            memory_timeline_png(timeline, args.plot, title=f"{model.name}: training memory")
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install matplotlib") from None
        except OSError as exc:
            raise CliError(f"cannot write --plot {args.plot!r}: {exc.strerror}") from None
    peak = timeline.peak
    if args.json:
        print(json.dumps({
            "model": model.name, "device": analysis.device.name, "batch": model.batch,
            "seq": model.seq, "dtype": model.dtype,
            "precision": "bf16-mixed" if autocast else model.dtype, "optimizer": config.optimizer,
            "optimizer_impl": timeline.optimizer_impl,
            "steps": config.steps, "grad_accumulation": config.grad_accumulation,
            "checkpoint": str(parse_policy(config.checkpoint)),
            # per optimizer step (all micro-batches), as `graphcost checkpoint` counts them
            "recompute_flops": timeline.recompute_flops * config.grad_accumulation,
            "saved_activation_bytes": timeline.saved_activation_bytes,
            "peak_bytes": peak.total_bytes,
            "peak_at": {"step": peak.step, "phase": peak.phase, "op": peak.op,
                        "module": peak.module_path, "node": peak.node},
            "breakdown_at_peak": peak.breakdown(),
            "phase_peaks": [{"step": s, "phase": p, "peak_bytes": b}
                            for (s, p), b in timeline.phase_peaks().items()],
            "unsupported_ops": analysis.unsupported_ops,
        }))
    else:
        print(memory_report(timeline, model=model.name, device=analysis.device.name),
              end="")
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0


def _parallel_options(p: argparse.ArgumentParser) -> None:
    """A parallel plan (graphcost.passes.parallel): per-device memory instead of one device."""
    g = p.add_argument_group("parallel plan (memory per device: docs/parallel.md)")
    g.add_argument("--gpus", type=_positive, default=1, help="devices in all (default 1)")
    g.add_argument("--dp", type=_positive, default=None,
                   help="data-parallel size (default: --gpus / (--tp x --pp))")
    g.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=_positive, default=1, help="pipeline stages (default 1)")
    g.add_argument("--ep", type=_positive, default=1, help="expert-parallel size (default 1)")
    g.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (default 0)")
    g.add_argument("--fsdp", action="store_true",
                   help="PyTorch FSDP (fully_shard) across the data-parallel ranks")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split the norms' and dropouts' activations across --tp ranks too")
    g.add_argument("--partition-activations", action="store_true",
                   help="split checkpointed activations across --tp ranks")
    g.add_argument("--micro-batches", type=_positive, default=None,
                   help="micro-batches per pipeline flush (default --pp)")


def _plan(args: argparse.Namespace):
    """The ParallelPlan of the options, or None for one device without sharding."""
    from graphcost.passes.parallel.plan import ParallelPlan

    if (args.gpus, args.tp, args.pp, args.ep, args.zero, args.dp) == (1, 1, 1, 1, 0, None) \
            and not (args.fsdp or args.sequence_parallel or args.partition_activations):
        return None
    return ParallelPlan(gpus=args.gpus, dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep,
                        zero=args.zero, fsdp=args.fsdp,
                        sequence_parallel=args.sequence_parallel,
                        partition_activations=args.partition_activations,
                        micro_batches=args.micro_batches)


def cmd_memory_parallel(args, plan, model, analysis, config) -> int:
    from graphcost.passes.parallel.plan import per_device_memory

    stages = per_device_memory(analysis, plan, config)
    busiest = max(stages, key=lambda d: d.peak_bytes)
    if args.json:
        print(json.dumps({
            "model": model.name, "device": analysis.device.name, "batch": model.batch,
            "seq": model.seq, "plan": {k: v for k, v in plan.__dict__.items()},
            "checkpoint": str(parse_policy(config.checkpoint)),
            "peak_bytes_per_device": busiest.peak_bytes, "stage": busiest.stage,
            "breakdown_per_device": busiest.breakdown(),
            "stages": [{"stage": d.stage, "peak_bytes": d.peak_bytes, "in_flight": d.in_flight,
                        **d.breakdown()} for d in stages],
            "unsupported_ops": analysis.unsupported_ops}))
        return 0
    print(parallel_memory_report(stages, busiest, model=model.name,
                                        device=analysis.device), end="")
    return 0


def parse_bytes(text: str, option: str = "--reserve") -> int:
    """'2GiB', '1.5 GB', '512MiB', '40e9', '1073741824' -> bytes; `option` names the flag in
    the error."""
    try:
        value = parse_size(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise CliError(f"bad size {text!r} in {option}; write e.g. 2GiB, 1.5GB, 512MiB or 40e9")
    return int(value)


def cmd_fit(args: argparse.Namespace) -> int:
    dtype, autocast = _precision(args)
    config = TrainingConfig(optimizer=args.optimizer, optimizer_impl=args.optimizer_impl,
                            checkpoint=args.checkpoint)
    reserve = parse_bytes(args.reserve)
    overrides = parse_overrides(args.set)
    first = load_model(args.model, batch=1, seq=args.seq, dtype=dtype, overrides=overrides)
    zoo = args.model in list_models()
    # the context is searched for token models only (a CNN's `seq` is its image size)
    context = max_context(args.model, **overrides) if zoo and first.tokens else None

    def loader(batch: int, seq: int, training: bool):
        m = load_model(args.model, batch=batch, seq=seq if first.seq is not None else None,
                       dtype=dtype, targets=training, overrides=overrides)
        return m.module, m.inputs

    plan = _plan(args)
    if plan is not None:
        return cmd_fit_parallel(args, plan, config, reserve, dtype, autocast, first)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        with _quiet_torch():
            result = fit(loader, device=device_from_args(args), seq=first.seq, model_max_seq=context,
                         autocast=autocast,
                         config=config, reserve_bytes=reserve)
    if args.json:
        print(json.dumps({"model": first.name, "dtype": first.dtype,
                          "precision": "bf16-mixed" if autocast else first.dtype,
                          "optimizer": config.optimizer,
                          "checkpoint": str(parse_policy(config.checkpoint)),
                          **dataclasses.asdict(result),
                          "max_batch": result.train_max_batch, "max_seq": result.train_max_seq}))
    else:
        print(fit_report(result, model=first.name,
                                dtype="bf16-mixed" if autocast else first.dtype,
                                optimizer=config.optimizer,
                                checkpoint=str(parse_policy(config.checkpoint))), end="")
    return 0


def cmd_fit_parallel(args, plan, config, reserve, dtype, autocast, first) -> int:
    """The largest micro-batch per device under a parallel plan: the per-device estimate's two
    peaks (backward, optimizer step) are each linear in the micro-batch, so traces at 1 and 2
    give them at any size."""
    from graphcost.passes.parallel.plan import per_device_memory

    device = device_from_args(args)
    if not device.memory_bytes:
        raise CliError(f"device {device.name!r} has no memory size; pick a GPU preset")
    budget = device.memory_bytes - reserve
    lines = []
    for batch in (1, 2):
        _, analysis = _analysis(_with(args, batch=batch, no_targets=False, json=args.json,
                                      strict=False), dtype, autocast)
        stages = per_device_memory(analysis, plan, config)
        lines.append([(d.training_peak_bytes, d.optimizer_peak_bytes) for d in stages])

    def peak(b: int) -> float:
        return max(max(one[k] + (two[k] - one[k]) * (b - 1) for k in (0, 1))
                   for one, two in zip(*lines))

    best = 0
    if peak(1) <= budget:
        low, high = 1, 1 << 20
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if peak(mid) <= budget else (low, mid - 1)
        best = low
    if args.json:
        print(json.dumps({"model": first.name, "device": device.name,
                          "plan": dict(plan.__dict__), "budget_bytes": budget,
                          "checkpoint": str(parse_policy(config.checkpoint)),
                          "max_batch": best, "max_seq": None}))
        return 0
    shard = "FSDP" if plan.fsdp else (f"ZeRO-{plan.zero}" if plan.zero else "no sharding")
    print(f"graphcost fit: {first.name} on {plan.gpus} x {device.name}: dp {plan.dp} x tp "
          f"{plan.tp} x pp {plan.pp}, {shard}\n"
          f"  budget      {format_bytes(budget)} per device (memory less the reserve)\n"
          f"  training    largest micro-batch per data-parallel rank at {first.seq}: "
          + (f"{best}" if best else "does not fit") + "\n"
          "  (the per-device estimate of docs/parallel.md; the context search is for one "
          "device)")
    return 0


def _policies(args: argparse.Namespace, analysis) -> tuple[list[str], list[tuple[str, str]]]:
    """The policies to compare, deduplicated, in the order given, and the built-ins skipped
    because they do not apply to the model ((policy, why) pairs). A policy the user named that
    does not apply is an error (ConfigError, exit 2); the default list drops those quietly
    and says so."""
    given = args.policies is not None
    names = [p.strip() for p in args.policies.split(",")] if given else list(BUILTIN_POLICIES)
    if given and not all(names):
        raise CliError(f"--policies {args.policies!r} has an empty name; write e.g. "
                       "--policies none,full,selective")
    specs = list(dict.fromkeys(str(parse_policy(p)) for p in names))
    kept, skipped = [], []
    for spec in specs:
        try:
            plan(analysis.graph, spec)
        except GraphcostError as exc:
            if given:
                raise
            skipped.append((spec, str(exc)))
        else:
            kept.append(spec)
    return kept, skipped


def _budget(args: argparse.Namespace, device) -> tuple[int | None, str]:
    """What 'fits?' is judged against: --budget, else the device's memory less --reserve (None
    where the device has no memory size), and a line saying which."""
    if args.budget is not None:
        if args.reserve is not None:
            raise CliError("--reserve sizes the budget from --device's memory; with --budget, "
                           "give the budget itself")
        budget = parse_bytes(args.budget, "--budget")
        if budget <= 0:
            raise CliError(f"--budget {args.budget!r} must be more than 0 bytes")
        return budget, f"budget {format_bytes(budget)} (--budget)"
    if not device.memory_bytes:
        return None, (f"budget: none ({device.name} has no memory size; give --budget SIZE or a "
                      "GPU --device such as a100-80gb)")
    reserve = parse_bytes(args.reserve or f"{DEFAULT_RESERVE_BYTES}", "--reserve")
    budget = int(device.memory_bytes - reserve)
    if budget <= 0:
        raise CliError(f"--reserve {format_bytes(reserve)} leaves nothing of "
                       f"{device.name}'s {format_bytes(device.memory_bytes)}")
    return budget, (f"budget {format_bytes(budget)} = {device.name}'s "
                    f"{format_bytes(device.memory_bytes)} - reserve "
                    f"{format_bytes(reserve)}")


def cmd_checkpoint(args: argparse.Namespace) -> int:
    dtype, autocast = _precision(args)
    config = TrainingConfig(optimizer=args.optimizer, optimizer_impl=args.optimizer_impl,
                            grad_accumulation=args.grad_accumulation)
    device = device_from_args(args)
    budget, budget_line = _budget(args, device)  # a bad size fails before the trace
    model, analysis = _analysis(args, dtype, autocast)
    policies, skipped = _policies(args, analysis)
    optimum = None
    if args.budget is not None:
        optimum = optimize(analysis, budget, config, policies)
        rows = optimum.builtin
    else:
        rows = compare(analysis, policies, config, budget)
    if args.plot:
        try:
            from graphcost.report.plot import checkpoint_pareto_png
            checkpoint_pareto_png(rows, args.plot, budget_bytes=budget,
                                  optimum=optimum.row if optimum else None,
                                  title=f"{model.name}: checkpoint policies")
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install matplotlib") from None
        except OSError as exc:
            raise CliError(f"cannot write --plot {args.plot!r}: {exc.strerror}") from None
    precision = "bf16-mixed" if autocast else model.dtype
    if args.json:
        out = {"model": model.name, "device": device.name, "batch": model.batch,
               "seq": model.seq, "dtype": model.dtype, "precision": precision,
               "optimizer": config.optimizer, "grad_accumulation": config.grad_accumulation,
               "budget_bytes": budget,
               "budget_from": "--budget" if args.budget is not None else
               ("device" if budget is not None else None),
               "rows": [r.as_dict() for r in rows],
               "skipped": [{"policy": p, "reason": why} for p, why in skipped],
               "unsupported_ops": analysis.unsupported_ops}
        if optimum is not None:
            out.update(checkpoint_optimum_dict(optimum))
        print(json.dumps(out))
    else:
        print(checkpoint_report(rows, model=model.name, device=device.name,
                                       budget_line=budget_line, skipped=skipped,
                                       optimum=optimum,
                                       unsupported=unsupported_line(analysis)), end="")
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0


# ---------------------------------------------------------------- roofline, cost, sweep


COUNT_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """'1.4e12', '1.4T', '300B', '2_000_000' -> a positive count (an argparse type).

    >>> parse_count("1.4T"), parse_count("300B"), parse_count("5e9")
    (1400000000000.0, 300000000000.0, 5000000000.0)
    """
    clean = text.strip().replace("_", "").replace(",", "")
    suffix = clean[-1:].lower() if clean[-1:].isalpha() else ""
    try:
        value = float(clean[:-1] if suffix else clean) * COUNT_SUFFIXES[suffix]
    except (ValueError, KeyError):
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive count such as 1.4e12, 1.4T or "
                                         f"300B, got {text!r}")
    return value


def _int_list(text: str | None, option: str) -> list[int | None]:
    """'1,2,4,8' -> [1, 2, 4, 8] (order kept, repeats dropped); None -> [None]."""
    if text is None:
        return [None]
    items = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() and int(t) > 0 for t in items):
        raise CliError(f"bad {option} {text!r}; give positive integers separated by commas, "
                       f"e.g. {option} 1,2,4,8")
    return list(dict.fromkeys(int(t) for t in items))


def _efficiency(args: argparse.Namespace) -> Efficiency:
    return Efficiency(matmul=args.matmul_efficiency, vector=args.vector_efficiency,
                      bandwidth=args.bandwidth_efficiency)


def _roofline_device(args: argparse.Namespace) -> Device:
    """--device for a roofline: it needs a bandwidth and peaks, which the uncalibrated CPU lacks;
    asked before the trace, so that the device's own message (how to get the figure) comes
    first."""
    device = device_from_args(args)
    device.memory_bandwidth_bytes_per_s()
    return device


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    return TrainingConfig(optimizer=args.optimizer, optimizer_impl=args.optimizer_impl,
                          grad_accumulation=args.grad_accumulation, checkpoint=args.checkpoint)


def _with(args: argparse.Namespace, **changes) -> argparse.Namespace:
    """A copy of the options with some changed (another shape of the same model)."""
    return argparse.Namespace(**{**vars(args), **changes})


def _json_safe(value):
    """inf and nan (an op that moves no bytes has infinite intensity) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _setting(model, autocast, config: TrainingConfig | None = None, shape: bool = True) -> str:
    """'bf16, adamw, checkpoint full, batch 4, seq 2048' for a report's title line."""
    parts = ["bf16-mixed" if autocast else (model.dtype or "model dtype")]
    if config is not None:
        parts.append(config.optimizer)
        if parse_policy(config.checkpoint).kind != "none":
            parts.append(f"checkpoint {parse_policy(config.checkpoint)}")
    if shape and model.batch is not None:
        parts.append(f"batch {model.batch}")
    if shape and model.seq is not None:
        parts.append(f"seq {model.seq}")
    return ", ".join(parts)


def cmd_roofline(args: argparse.Namespace) -> int:
    if args.inference:
        return _roofline_inference(args)
    if args.context is not None:
        raise CliError("--context is the cached context of --inference; for training use --seq")
    dtype, autocast = _precision(args)
    config = _training_config(args)
    efficiency = _efficiency(args)
    device = _roofline_device(args)
    model, analysis = _analysis(args, dtype, autocast)
    step = training_step_time(analysis, device, config, efficiency)
    bound = step.seconds_by_bound()
    cbb = None
    if args.compute_bound_batch:
        ones = analysis if model.batch == 1 else _analysis(_with(args, batch=1), dtype,
                                                           autocast)[1]
        twos = analysis if model.batch == 2 else _analysis(_with(args, batch=2), dtype,
                                                           autocast)[1]
        try:
            cbb = compute_bound_batch(ones, twos, device, config, efficiency)
        except ValueError as exc:
            raise CliError(f"--compute-bound-batch: {exc}") from None
    if args.json:
        out = {"model": model.name, "batch": model.batch, "seq": model.seq, "dtype": model.dtype,
               "precision": "bf16-mixed" if autocast else model.dtype,
               "optimizer": config.optimizer, "checkpoint": str(parse_policy(config.checkpoint)),
               "grad_accumulation": config.grad_accumulation, **step.totals(),
               "optimizer_flops": step.optimizer_flops,
               "compute_bound_s": bound["compute"], "memory_bound_s": bound["memory"]}
        if args.compute_bound_batch:
            out["compute_bound_batch"] = cbb
        out["unsupported_ops"] = analysis.unsupported_ops
        out["ops"] = [o.as_dict() for o in step.ops]
        print(json.dumps(_json_safe(out)))
        return 0
    extra = []
    if args.compute_bound_batch:
        extra.append("  compute-bound   " + (
            f"from batch {format(cbb, ',')} at seq {model.seq} (more op time compute- than "
            "memory-bound)" if cbb is not None else "not up to batch 1,048,576"))
    print(roofline_report(
        step, title=f"graphcost roofline: {model.name} on {device.name}, "
        f"{_setting(model, autocast, config)}", sort=args.sort, top=args.top, extra=extra,
        unsupported=unsupported_line(analysis)), end="")
    return 0


def _roofline_inference(args: argparse.Namespace) -> int:
    """--inference: a prefill at (batch, seq), a decode step at --context, the context where
    decoding turns memory-bound."""
    if parse_policy(args.checkpoint).kind != "none":
        raise CliError("--checkpoint applies to training (inference keeps nothing for a "
                       "backward); drop --checkpoint or --inference")
    if args.grad_accumulation != 1 or args.compute_bound_batch:
        option = "--grad-accumulation" if args.grad_accumulation != 1 else \
            "--compute-bound-batch"
        raise CliError(f"{option} applies to training; drop it or --inference")
    dtype, autocast = _precision(args)
    efficiency = _efficiency(args)
    device = _roofline_device(args)
    limit = max_context(args.model, **parse_overrides(args.set)) \
        if args.model in list_models() else None
    if limit is not None and args.context is not None and args.context > limit:
        raise CliError(f"--context {args.context} is beyond {args.model}'s context length "
                       f"{limit}; give a shorter --context or --set the context length")
    model, prefill_analysis = _analysis(_with(args, no_targets=True), dtype, autocast)
    if model.tokens is None:
        raise CliError(f"--inference times a prefill and the decoding of a language model; "
                       f"{model.name!r} does not take (batch, seq) token ids")
    context = args.context or model.seq
    _, one_token = _analysis(_with(args, seq=1, no_targets=True), dtype, autocast)
    prefill = forward_time(prefill_analysis, device, efficiency)
    decode = decode_time(one_token, context, device, efficiency)
    turn = memory_bound_context(one_token, device, efficiency)
    if args.json:
        print(json.dumps(_json_safe({
            "model": model.name, "device": device.name, "batch": model.batch, "seq": model.seq,
            "context": context, "dtype": model.dtype,
            "precision": "bf16-mixed" if autocast else model.dtype,
            "efficiency": dict(efficiency.__dict__),
            "prefill_s": prefill.step_time_s, "prefill_tokens_per_s": prefill.tokens_per_s,
            "prefill_mfu": prefill.mfu, "prefill_flops": prefill.model_flops,
            "decode_s_per_token": decode.seconds_per_token,
            "decode_tokens_per_s": decode.tokens_per_s, "decode_flops": decode.step.model_flops,
            "memory_bound_context": turn, "peak_flops_per_s": prefill.peak_flops_per_s,
            "mfu_dtype": prefill.mfu_dtype,
            "unsupported_ops": prefill_analysis.unsupported_ops,
            "ops": [o.as_dict() for o in prefill.ops]})))
        return 0
    print(roofline_inference_report(
        prefill, decode, turn, title=f"graphcost roofline --inference: {model.name} on "
        f"{device.name}, {_setting(model, autocast)}", sort=args.sort, top=args.top,
        unsupported=unsupported_line(prefill_analysis)), end="")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    dtype, autocast = _precision(args)
    config = _training_config(args)
    efficiency = _efficiency(args)
    device = _roofline_device(args)
    if args.inference:
        if parse_policy(config.checkpoint).kind != "none":
            raise CliError("--checkpoint applies to training; drop --checkpoint or --inference")
        model, analysis = _analysis(_with(args, no_targets=True), dtype, autocast)
        step = forward_time(analysis, device, efficiency)
    else:
        model, analysis = _analysis(args, dtype, autocast)
        step = training_step_time(analysis, device, config, efficiency)
    try:
        cost = training_cost(step, params=analysis.params, tokens=args.tokens, gpus=args.gpus,
                             usd_per_gpu_hour=args.usd_per_hour, mfu=args.mfu)
    except ValueError as exc:  # the options are checked by argparse; this is a safety net
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps({"model": model.name, "device": device.name, "batch": model.batch,
                          "seq": model.seq, "precision": "bf16-mixed" if autocast
                          else model.dtype, "checkpoint": str(parse_policy(config.checkpoint)),
                          **cost.as_dict(), "mfu_dtype": step.mfu_dtype,
                          "unsupported_ops": analysis.unsupported_ops}))
        return 0
    setting = _setting(model, autocast, None if args.inference else config)
    if args.inference:
        setting += ", forward only"
    if args.mfu is None:
        mfu_line = f"{100 * cost.mfu:.1f}% predicted by the roofline ({setting}; --mfu assumes one)"
    else:
        mfu_line = (f"{100 * cost.mfu:.1f}% assumed (--mfu); the roofline predicts "
                    f"{100 * step.mfu:.1f}% ({setting})")
    title = (f"graphcost cost: {model.name}, {'inference over ' if args.inference else ''}"
             f"{format_count_short(args.tokens)} tokens on "
             f"{format(args.gpus, ',')} x {device.name}")
    text = cost_report(cost, title=title, mfu_line=mfu_line, mfu_dtype=step.mfu_dtype)
    unsupported = unsupported_line(analysis)
    print(text + (f"\n{unsupported}\n" if unsupported else ""), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from graphcost.hardware.network import network_for
    from graphcost.sizing.plans import SHARDINGS, search_plans

    dtype, autocast = _precision(args)
    config = TrainingConfig(optimizer=args.optimizer, optimizer_impl=args.optimizer_impl)
    device = _roofline_device(args)
    if not device.memory_bytes:
        raise CliError(f"device {device.name!r} has no memory size; pick a GPU preset such as "
                       "h100-sxm ('graphcost devices')")
    micro = _int_list(args.micro_batch, "--micro-batch")
    policies = [p.strip() for p in args.checkpoint.split(",") if p.strip()]
    for p in policies:
        parse_policy(p)
    shardings = [x.strip() for x in args.sharding.split(",") if x.strip()]
    for x in shardings:
        if x not in SHARDINGS:
            raise CliError(f"unknown --sharding {x!r}; use {', '.join(SHARDINGS)}")
    network = network_for(device.name, intra=_link(args.intra_node),
                          inter=_link(args.inter_node), gpus_per_node=args.gpus_per_node)
    reserve = parse_bytes(args.reserve)
    cache: dict = {}

    def load(mb: int):
        if mb not in cache:
            cache[mb] = _analysis(_with(args, batch=mb, no_targets=False), dtype, autocast)
        return cache[mb][1]

    plans = search_plans(load, gpus=args.gpus, device=device, global_batch=args.global_batch,
                         config=config, micro_batches=micro, policies=policies,
                         shardings=shardings, reserve_bytes=reserve, network=network)
    model = next(iter(cache.values()))[0] if cache else None
    if args.json:
        print(json.dumps(_json_safe({
            "model": model.name if model else args.model, "device": device.name,
            "gpus": args.gpus, "global_batch": args.global_batch, "seq": args.seq,
            "network": {"intra_node": network.intra.name, "inter_node": network.inter.name,
                        "gpus_per_node": network.gpus_per_node},
            "plans": [c.as_dict() for c in plans]})))
        return 0
    print(plan_report(plans, model=model.name if model else args.model, device=device,
                             gpus=args.gpus, global_batch=args.global_batch, seq=args.seq,
                             network=network, top=args.top), end="")
    return 0


def _link(text: str | None):
    """--intra-node / --inter-node: a link name, or a bandwidth in GB/s."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def cmd_sweep(args: argparse.Namespace) -> int:
    batches = _int_list(args.batch, "--batch")
    seqs = _int_list(args.seq, "--seq")
    dtype, autocast = _precision(args)
    config = _training_config(args)
    efficiency = _efficiency(args)
    device = _roofline_device(args)
    budget, budget_line = _budget(args, device)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise CliError(f"--plot {args.plot!r} must end in .png")
    for option, path in (("--csv", args.csv), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(path))) if path else None
        if folder and not os.path.isdir(folder):  # before the traces, not after
            raise CliError(f"{option} {path!r}: folder {folder!r} does not exist; create it first")
    rows, model, unsupported = [], None, ""
    for seq in seqs:
        for batch in batches:
            model, analysis = _analysis(_with(args, batch=batch, seq=seq), dtype, autocast)
            step = training_step_time(analysis, device, config, efficiency)
            peak = training_timeline(analysis, config).peak_bytes
            rows.append({"batch": batch, "seq": model.seq, "tokens": step.tokens,
                         "step_time_s": step.step_time_s, "mfu": step.mfu, "hfu": step.hfu,
                         "tokens_per_s": step.tokens_per_s, "peak_bytes": peak,
                         "fits": None if budget is None else peak <= budget})
            unsupported = unsupported or unsupported_line(analysis)
            del analysis
    title = f"{model.name} on {device.name}, {_setting(model, autocast, config, shape=False)}"
    if args.csv:
        try:
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
                writer.writeheader()
                for r in rows:
                    writer.writerow({**r, "fits": "" if r["fits"] is None else
                                     str(r["fits"]).lower()})
        except OSError as exc:
            raise CliError(f"cannot write --csv {args.csv!r}: {exc.strerror}") from None
    if args.plot:
        try:
            from graphcost.report.plot import sweep_mfu_png
            sweep_mfu_png(rows, args.plot, title=f"{title}: MFU by batch")
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install matplotlib") from None
        except OSError as exc:
            raise CliError(f"cannot write --plot {args.plot!r}: {exc.strerror}") from None
    if args.json:
        print(json.dumps({"model": model.name, "device": device.name,
                          "precision": "bf16-mixed" if autocast else model.dtype,
                          "optimizer": config.optimizer,
                          "checkpoint": str(parse_policy(config.checkpoint)),
                          "grad_accumulation": config.grad_accumulation,
                          "efficiency": dict(efficiency.__dict__), "budget_bytes": budget,
                          "rows": rows}))
        return 0
    lines = [f"graphcost sweep: {title}", f"  {budget_line}", "", sweep_table(rows), "",
             "step time, MFU, HFU and tokens/s per optimizer step from the roofline; peak: the "
             "training steps' memory peak.", UNITS_NOTE]
    lines += [f"csv: {args.csv}"] if args.csv else []
    lines += [f"plot: {args.plot}"] if args.plot else []
    lines += ["", unsupported] if unsupported else []
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------- devices

DEVICE_FLAGS = ("--device-memory", "--device-bandwidth", "--device-flops", "--device-vector-flops")


def _tflops(items: list[str], option: str, bare: tuple[torch.dtype, ...]) -> dict:
    """['250', 'fp32=60'] (TFLOP/s) -> {bf16: 2.5e14, fp16: 2.5e14, fp32: 6e13}: a bare number
    stands for the dtypes in `bare`."""
    out = {}
    for item in items:
        name, sep, number = item.rpartition("=")
        try:
            dtypes = (dtype_key(name),) if sep else bare
            value = float(number)
        except (GraphcostError, ValueError):
            raise CliError(f"bad {option} {item!r}; write TFLOPS or DTYPE=TFLOPS, e.g. "
                           f"{option} 312 or {option} float32=19.5") from None
        if not 0 < value < math.inf:
            raise CliError(f"{option} {item!r} must be a positive number of TFLOP/s")
        out.update(dict.fromkeys(dtypes, value * 1e12))
    return out


def device_from_args(args: argparse.Namespace, name: str | None = None) -> Device:
    """--device (a preset name or a device file), with the --device-* flags laid over it: the
    one place the command line becomes a Device. `name` replaces args.device."""
    device = get_device(args.device if name is None else name)
    memory = bandwidth = None
    if args.device_memory is not None:
        memory = parse_bytes(args.device_memory, "--device-memory")
        if memory <= 0:
            raise CliError(f"--device-memory {args.device_memory!r} must be more than 0 bytes")
    if args.device_bandwidth is not None:
        try:
            bandwidth = float(args.device_bandwidth) * 1e9
        except ValueError:
            bandwidth = -1.0
        if not 0 < bandwidth < math.inf:
            raise CliError(f"bad --device-bandwidth {args.device_bandwidth!r}; give GB/s "
                           "(10^9 bytes/s) as a positive number, e.g. 2039")
    matmul = _tflops(args.device_flops, "--device-flops", (torch.bfloat16, torch.float16))
    vector = _tflops(args.device_vector_flops, "--device-vector-flops",
                     (torch.float32, torch.bfloat16, torch.float16))
    if memory is None and bandwidth is None and not matmul and not vector:
        return device
    return device.with_figures(memory_bytes=memory, bandwidth_bytes_per_s=bandwidth,
                               matmul_flops_per_s=matmul, vector_flops_per_s=vector)


def _device_flags_given(args: argparse.Namespace) -> bool:
    return (args.device_memory is not None or args.device_bandwidth is not None
            or bool(args.device_flops) or bool(args.device_vector_flops))


def _ridge(d: Device) -> float | None:
    """bf16 matmul FLOP per byte of memory traffic, where the device has both figures."""
    try:
        return d.ridge_point(torch.bfloat16)
    except GraphcostError:
        return None


DEVICES_NOTE = (
    "units: memory binary (1 GiB = 2^30 B); bandwidth decimal as vendors quote it (1 TB/s = "
    "10^12 B/s);\npeaks are dense matmul peaks (no 2:4 sparsity); ridge = bf16 peak / bandwidth, "
    "in FLOP per byte.\n\nAnother device, wherever --device goes:\n"
    "  a device file        --device my-gpu.json (schema: docs/devices.md)\n"
    "  flags over a preset  --device a100-80gb --device-memory 48GiB --device-bandwidth 1500 "
    "--device-flops 250\n"
    "  this machine         graphcost calibrate --out cpu.json, then --device cpu.json\n")


def cmd_devices(args: argparse.Namespace) -> int:
    if args.names:
        devices = [device_from_args(args, name) for name in args.names]
    elif _device_flags_given(args):
        raise CliError("name the device the --device-* flags change, e.g. 'graphcost devices "
                       "a100-80gb --device-memory 48GiB'")
    else:
        devices = list(PRESETS.values())
    if args.json:
        print(json.dumps({"devices": [{
            "name": d.name, "kind": d.kind, "memory_bytes": d.memory_bytes,
            "bandwidth_bytes_per_s": d.bandwidth_bytes_per_s,
            "peak_flops_per_s": {dtype_name(k): v for k, v in d.peak_flops_per_s.items()},
            "vector_flops_per_s": {dtype_name(k): v
                                   for k, v in d.vector_peak_flops_per_s.items()},
            "ridge_flops_per_byte": _ridge(d), "source": d.source,
            "description": d.description} for d in devices]}))
        return 0

    def peak(d: Device, dtype: torch.dtype) -> str:
        x = d.peak_flops_per_s.get(dtype)
        return format_flops_per_s(x) if x else "-"

    rows = [[d.name, d.kind, format_bytes(d.memory_bytes) if d.memory_bytes else "-",
             format_bandwidth(d.bandwidth_bytes_per_s) if d.bandwidth_bytes_per_s
             else "-", peak(d, torch.float32), peak(d, torch.bfloat16),
             f"{_ridge(d):.0f}" if _ridge(d) else "-", d.description] for d in devices]
    print(table(["device", "kind", "memory", "bandwidth", "fp32 peak", "bf16 peak",
                        "ridge", "description"], rows, align="llrrrrrl"))
    print("\n" + DEVICES_NOTE, end="")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from graphcost.hardware.calibrate import calibrate
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if not all(dtypes):
        raise CliError(f"--dtypes {args.dtypes!r} has an empty name; write e.g. "
                       "--dtypes float32,bfloat16")
    try:
        dtypes = [dtype_key(d) for d in dtypes]
    except GraphcostError as exc:
        raise CliError(f"{exc}, in --dtypes") from None
    copy_bytes = None
    if args.copy_bytes is not None:
        copy_bytes = parse_bytes(args.copy_bytes, "--copy-bytes")
        if copy_bytes < 4:
            raise CliError(f"--copy-bytes {args.copy_bytes!r} must be at least 4 bytes")
    out = args.out or f"{kind}.json"
    if not out.lower().endswith(".json"):
        raise CliError(f"--out {out!r} must end in .json (so that --device reads it as a file)")
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(out)))
    if not os.path.isdir(folder):
        raise CliError(f"--out {out!r}: folder {folder!r} does not exist; create it first")
    start = time.perf_counter()
    result = calibrate(kind, seconds=args.seconds, dtypes=dtypes, matmul_size=args.matmul_size,
                       copy_bytes=copy_bytes, threads=args.threads, name=args.name)
    elapsed = time.perf_counter() - start
    device = result.device
    save_device_file(device, out)
    if args.json:
        print(json.dumps({
            "out": out, "name": device.name, "kind": device.kind,
            "memory_bytes": device.memory_bytes,
            "bandwidth_bytes_per_s": device.bandwidth_bytes_per_s,
            "matmul_flops_per_s": {dtype_label(k): v for k, v in device.peak_flops_per_s.items()},
            "vector_flops_per_s": {dtype_label(k): v
                                   for k, v in device.vector_peak_flops_per_s.items()},
            "matmul_size": {dtype_label(k): t.size for k, t in result.matmul.items()},
            "copy_bytes": result.bandwidth.size, "threads": result.threads,
            "elapsed_s": elapsed}))
        return 0
    rows = [[f"matmul {dtype_label(d)}", t.what.split(" ", 1)[1].rsplit(" ", 1)[0], str(t.runs),
             f"{t.best_s * 1e3:.2f} ms", format_flops_per_s(t.rate)]
            for d, t in result.matmul.items()]
    b = result.bandwidth
    rows += [["vector (non-matmul)", "= float32 matmul", "", "",
              format_flops_per_s(device.vector_flops_per_s(torch.float32))],
             ["memory bandwidth", f"copy_ {format_bytes(b.size)}", str(b.runs),
              f"{b.best_s * 1e3:.2f} ms", format_bandwidth(b.rate)]]
    print(f"calibrated {device.name}: {device.description}; torch {torch.__version__}, "
          f"{elapsed:.1f} s")
    print(table(["measured", "size", "runs", "best", "achieved"], rows,
                       align="llrrr"))
    ridge = _ridge(device)
    print(f"\nmemory {format_bytes(device.memory_bytes)}"
          + (f"; ridge point {ridge:.1f} bf16 FLOP/byte" if ridge else ""))
    print("bandwidth counts bytes read + written; FLOPs are 2 per multiply-add.")
    print(f"wrote {out}: pass --device {out} wherever a preset name goes")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"models": list_models()}))
    else:
        print("\n".join(list_models()))
    return 0


# ---------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one message, exit status 2 (argparse would print usage)
        raise CliError(f"{message}; see '{self.prog} --help'")


def _model_options(p: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """MODEL and the options that pick its shape, dtype and device (shared by the verbs)."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--batch", type=_positive, default=None, help="batch size (default 1)")
    p.add_argument("--seq", type=_positive, default=None,
                   help="sequence length, or image size for the CNN (default: the zoo "
                   "model's own; LLaMA presets: 2048)")
    if dtype:
        p.add_argument("--dtype", default=None,
                       help="cast the model's floating parameters: fp32, bf16 or fp16 "
                       "(default: fp32 for zoo models, as built for file models)")
    _device_options(p)
    p.add_argument("--no-targets", action="store_true",
                   help="zoo models: no targets, so the backward starts from the sum of the "
                   "outputs instead of the model's own cross-entropy loss")
    _rule_options(p)


def _rule_options(p: argparse.ArgumentParser) -> None:
    """--set, --strict and --rules: how the model is configured and costed (every verb)."""
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="zoo models: override a config field, e.g. --set n_layers=2 (repeatable)")
    p.add_argument("--strict", action="store_true",
                   help="an op without a cost rule is an error (default: listed and warned)")
    p.add_argument("--rules", action="append", default=[], metavar="FILE.py",
                   help="a Python file registering your own op rules with "
                   "graphcost.register_rule (repeatable; docs/rules.md)")


def _device_override_options(p: argparse.ArgumentParser) -> None:
    """The --device-* flags: figures laid over the device (see device_from_args)."""
    g = p.add_argument_group("device figures", "override or add figures of --device (a "
                             "preset or a device file); the result is named DEVICE+custom")
    g.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="device memory, e.g. 48GiB or 48e9")
    g.add_argument("--device-bandwidth", default=None, metavar="GB/S",
                   help="memory bandwidth in GB/s (10^9 bytes/s), e.g. 2039")
    g.add_argument("--device-flops", action="append", default=[], metavar="[DTYPE=]TFLOPS",
                   help="dense matmul peak in TFLOP/s; a bare number sets bfloat16 and "
                   "float16, DTYPE=TFLOPS one dtype (float32, bfloat16, float16, "
                   "float8_e4m3fn); repeatable")
    g.add_argument("--device-vector-flops", action="append", default=[],
                   metavar="[DTYPE=]TFLOPS",
                   help="non-matmul (vector unit) peak in TFLOP/s; a bare number sets float32, "
                   "bfloat16 and float16; repeatable")


def _device_options(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """--device and the --device-* flags (shared by every verb that takes a device)."""
    p.add_argument("--device", required=required, default=None if required else DEFAULT_DEVICE,
                   help="device preset, or a device file such as cpu.json (docs/devices.md)"
                   + ("" if required else f"; default {DEFAULT_DEVICE!r}, the CPU kernels' "
                      "saved tensors") + ". A GPU preset such as h100-sxm sizes saved "
                   "activations for that GPU's kernels. See 'graphcost devices'")
    _device_override_options(p)


def _training_options(p: argparse.ArgumentParser) -> None:
    """How the model trains: precision and optimizer (shared by memory and fit)."""
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "bf16-mixed"],
                   help="fp32, pure bf16, or bf16-mixed: fp32 weights with the ops under "
                   "torch.autocast(bfloat16) (default: the model's own dtypes)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="optimizer with PyTorch's defaults (default adamw)")
    p.add_argument("--optimizer-impl", default="auto", choices=OPTIMIZER_IMPLS,
                   help="optimizer implementation (default auto, PyTorch's: single-tensor on the "
                   "CPU, foreach on GPU presets)")


POLICY_HELP = ("none, full, every-K, sqrt, selective, save-matmuls, per-block:OPT,OPT,... or "
               "modules:PATTERN[,PATTERN][+save:OP[,OP]]")


def _checkpoint_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--checkpoint", default="none", metavar="POLICY",
                   help=f"activation-checkpointing policy for {what}: {POLICY_HELP} "
                   "(default none; 'graphcost checkpoint' compares them)")


def _efficiency_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("efficiency", "fractions of the device's peaks that kernels "
                             "reach, in (0, 1] (default 1, the physical limit)")
    g.add_argument("--matmul-efficiency", type=_fraction, default=1.0, metavar="F",
                   help="of the dense matmul peak (linear, matmul, attention, convolution)")
    g.add_argument("--vector-efficiency", type=_fraction, default=1.0, metavar="F",
                   help="of the vector peak (the other ops with FLOPs, the optimizer)")
    g.add_argument("--bandwidth-efficiency", type=_fraction, default=1.0, metavar="F",
                   help="of the memory bandwidth")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphcost", description=(
        "A graph-based cost model for PyTorch: parameters, FLOPs per step and per token, what "
        "autograd saves for backward, per module and per op, from one trace of the model."))
    from graphcost import __version__
    parser.add_argument("--version", action="version", version=f"graphcost {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    a = verbs.add_parser(
        "analyze", help="costs of one training step of MODEL",
        description="Trace MODEL once on the meta device and cost one training step: "
        "parameters, forward/backward FLOPs per step (and per token), activations saved for "
        "backward, per module and per op.",
        epilog="MODEL is a zoo name (see 'graphcost models') or path/to/file.py:factory, where "
        "factory() returns (module, example_inputs) and is called under "
        "torch.device('meta') so nothing is allocated; a factory with batch/seq parameters "
        "receives --batch/--seq; or hf:path/to/config.json, a Hugging Face config built by "
        "transformers on the meta device. Exit status 2 on a user error (bad option, unknown model or "
        "device, untraceable model, --strict with an unsupported op).")
    _model_options(a)
    a.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout instead of the text report")
    a.add_argument("--depth", type=_positive, default=2,
                   help="module path depth of the per-module table/JSON (default 2)")
    a.add_argument("--top", type=_positive, default=10,
                   help="rows of the per-op table (default 10)")
    a.set_defaults(run=cmd_analyze)

    mem = verbs.add_parser(
        "memory", help="peak memory of training steps of MODEL, when it happens, what is alive",
        description="Walk two training steps of MODEL over its costed graph (forward, backward, "
        "optimizer step; the optimizer state appears in the first step) and report the peak "
        "bytes, the event at which it happens, and what is alive then by category.",
        epilog="--precision fp32/bf16 casts the model, bf16-mixed keeps fp32 weights and runs "
        "the ops under torch.autocast (default: the model's own parameter dtypes). "
        "Memory a kernel allocates and frees inside one op and allocator rounding are not "
        "modelled. Exit status 2 on a user error.")
    _model_options(mem, dtype=False)
    _training_options(mem)
    mem.add_argument("--grad-accumulation", type=_positive, default=1,
                     help="micro-batches per optimizer step (default 1)")
    mem.add_argument("--steps", type=_positive, default=2,
                     help="training steps to walk (default 2: the state appears in step 1)")
    mem.add_argument("--inference", action="store_true",
                     help="inference instead: a prefill of --context tokens per sequence with "
                     "a KV cache holding them (no gradients, no optimizer)")
    mem.add_argument("--context", type=_positive, default=None,
                     help="with --inference: tokens per sequence in the KV cache (default --seq)")
    _checkpoint_option(mem, "the training step: the peak, recompute FLOPs and saved bytes "
                       "follow it")
    _parallel_options(mem)
    mem.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    mem.add_argument("--plot", metavar="FILE.png", default=None,
                     help="save the memory timeline with the peak marked (needs matplotlib)")
    mem.set_defaults(run=cmd_memory)

    f = verbs.add_parser(
        "fit", help="largest batch and context of MODEL that fit on a device",
        description="The largest micro-batch at --seq and the largest context at batch 1 that "
        "fit in the device's memory less a reserve, for training (two steps with the "
        "optimizer) and for inference (prefill with a KV cache). Exact for the model: the "
        "per-event memory polynomials in batch (linear) and length (quadratic) are recovered "
        "from a few traces, not extrapolated from one.",
        epilog="The reserve stands for the CUDA context (0.3-1.5 GiB) and allocator slack. "
        "File models need a factory with a batch parameter, and a seq parameter for the "
        "context search. Exit status 2 on a user error.")
    f.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _device_options(f, required=True)
    f.add_argument("--seq", type=_positive, default=None,
                   help="context for the batch search (default: the model's default)")
    _training_options(f)
    f.add_argument("--reserve", default=f"{DEFAULT_RESERVE_BYTES // 2**30}GiB",
                   help="memory kept free for the CUDA context and allocator "
                   f"(default {DEFAULT_RESERVE_BYTES // 2**30}GiB)")
    f.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="zoo models: override a config field (repeatable)")
    _checkpoint_option(f, "the training answers (inference ignores it: no backward)")
    f.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _parallel_options(f)
    f.set_defaults(run=cmd_fit)

    c = verbs.add_parser(
        "checkpoint", help="compare activation-checkpointing policies; the best under a budget",
        description="Walk a training step of MODEL once per checkpoint policy and compare "
        "them side by side: peak memory, activations kept for backward, FLOPs recomputed in "
        "the backward and FLOPs the device runs per step, and whether each fits. With "
        "--budget, also find the per-block mix (none / selective / save-matmuls / full for "
        "each block of the main stack) with the least recomputation whose peak is within "
        "the budget, exactly (an integer program over the walks).",
        epilog=f"Policies: {POLICY_HELP}. Without --policies the built-ins "
        f"({', '.join(BUILTIN_POLICIES)}) are compared and those that do not apply to the "
        "model (selective without attention, block policies without a stack of blocks) are "
        "skipped with a note; a policy named in --policies that does not apply is an error. "
        "'fits?' is judged against --budget, else the --device's memory less --reserve. "
        "Exit status 2 on a user error; a budget nothing fits in is an answer (status 0).")
    _model_options(c, dtype=False)
    _training_options(c)
    c.add_argument("--grad-accumulation", type=_positive, default=1,
                   help="micro-batches per optimizer step (default 1); FLOPs are per step")
    c.add_argument("--policies", default=None, metavar="P1,P2,...",
                   help="comma-separated policies to compare, in this order (default: the "
                   "built-ins)")
    c.add_argument("--budget", default=None, metavar="SIZE",
                   help="memory budget, e.g. 40GiB or 40e9: search the per-block mix with the "
                   "least recompute that fits it")
    c.add_argument("--reserve", default=None,
                   help="without --budget: memory of --device kept free for the CUDA context "
                   f"and allocator (default {DEFAULT_RESERVE_BYTES // 2**30}GiB)")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.add_argument("--plot", metavar="FILE.png", default=None,
                   help="save peak memory vs recompute FLOPs per policy, with the Pareto front "
                   "and the budget (needs matplotlib)")
    c.set_defaults(run=cmd_checkpoint)

    r = verbs.add_parser(
        "roofline", help="time of a training step of MODEL on a device: MFU, HFU, tokens/s",
        description="Roofline time of one training step of MODEL on --device: every op takes "
        "max(FLOPs / peak, bytes moved / bandwidth), the step is its forward, backward, the "
        "recomputation of --checkpoint and the optimizer update. Prints the split, MFU and "
        "HFU, tokens/s, the share of time in compute- and memory-bound ops and the slowest "
        "ops. With --inference: a prefill, a decode step and where decoding turns "
        "memory-bound.",
        epilog="Needs a device with a bandwidth and peaks: a GPU preset, a device file, or "
        "this machine as 'graphcost calibrate' measures it (the default cpu has no figures). "
        "Efficiencies default to 1, the physical limit no kernel reaches. Exit status 2 on a "
        "user error.")
    _model_options(r, dtype=False)
    _training_options(r)
    r.add_argument("--grad-accumulation", type=_positive, default=1,
                   help="micro-batches per optimizer step (default 1)")
    _checkpoint_option(r, "the training step: its recomputation is timed and counted in HFU")
    _efficiency_options(r)
    r.add_argument("--sort", default="time", choices=ROOFLINE_SORTS,
                   help="order of the per-op table, largest first (default time)")
    r.add_argument("--top", type=_non_negative, default=20,
                   help="rows of the per-op table (default 20; 0: all)")
    r.add_argument("--compute-bound-batch", action="store_true",
                   help="also the smallest batch at which the step spends more time in "
                   "compute- than in memory-bound ops, at --seq (two more traces)")
    r.add_argument("--inference", action="store_true",
                   help="inference instead: a prefill of --seq tokens per sequence, a decode "
                   "step attending to --context cached tokens, and the context beyond which "
                   "decoding is memory-bound at any batch")
    r.add_argument("--context", type=_positive, default=None,
                   help="with --inference: tokens in the KV cache at the decode step (default "
                   "--seq)")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout, with "
                   "every op")
    r.set_defaults(run=cmd_roofline)

    co = verbs.add_parser(
        "cost", help="time and money to train MODEL on N tokens, next to 6ND and 8ND",
        description="Time, GPU-hours and dollars of training MODEL on --tokens with --gpus "
        "devices: FLOPs per token from the graph (forward + backward), at the MFU the "
        "roofline predicts for a step at --batch/--seq (or --mfu), side by side with the "
        "6ND and 8ND rules of thumb at the same MFU.",
        epilog="Data parallel with no communication cost. Exit status 2 on a user error.")
    _model_options(co, dtype=False)
    _training_options(co)
    co.add_argument("--grad-accumulation", type=_positive, default=1,
                    help="micro-batches per optimizer step (default 1)")
    _checkpoint_option(co, "the step whose MFU is predicted")
    co.add_argument("--tokens", type=parse_count, required=True, metavar="N",
                    help="training tokens, e.g. 1.4e12, 1.4T or 300B")
    co.add_argument("--inference", action="store_true",
                    help="the forward only over --tokens (evaluation, prefill), next to 2ND")
    co.add_argument("--gpus", type=_positive, default=1, help="devices (default 1)")
    co.add_argument("--usd-per-hour", type=_positive_number, default=None, metavar="USD",
                    help="price of one device per hour (default: no dollar figure)")
    co.add_argument("--mfu", type=_fraction, default=None,
                    help="assume this MFU, in (0, 1], instead of the roofline's prediction")
    _efficiency_options(co)
    co.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    co.set_defaults(run=cmd_cost)

    s = verbs.add_parser(
        "sweep", help="roofline MFU, tokens/s and peak memory over batch sizes and lengths",
        description="For every --batch x --seq combination: the roofline step time, MFU, "
        "HFU, tokens/s, the training peak memory and whether it fits the device. A table, "
        "and optionally a CSV and a plot of MFU against batch size.",
        epilog="One trace per combination. 'fits?' is judged against --budget, else the "
        "device's memory less --reserve. Exit status 2 on a user error.")
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--batch", default="1", metavar="B1,B2,...",
                   help="batch sizes, comma-separated (default 1)")
    s.add_argument("--seq", default=None, metavar="T1,T2,...",
                   help="sequence lengths, comma-separated (default: the model's own)")
    _device_options(s)
    _training_options(s)
    s.add_argument("--grad-accumulation", type=_positive, default=1,
                   help="micro-batches per optimizer step (default 1)")
    _checkpoint_option(s, "every training step of the sweep")
    _efficiency_options(s)
    s.add_argument("--budget", default=None, metavar="SIZE",
                   help="judge 'fits?' against this memory budget, e.g. 40GiB")
    s.add_argument("--reserve", default=None,
                   help="without --budget: memory of --device kept free for the CUDA context "
                   f"and allocator (default {DEFAULT_RESERVE_BYTES // 2**30}GiB, as fit's)")
    _rule_options(s)
    s.add_argument("--csv", metavar="FILE.csv", default=None, help="write the table as CSV")
    s.add_argument("--plot", metavar="FILE.png", default=None,
                   help="save MFU against batch size, one line per --seq (needs matplotlib)")
    s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    s.set_defaults(run=cmd_sweep, no_targets=False)

    cov = verbs.add_parser(
        "coverage", help="every op in MODEL's trace with the rule that costs it, or UNSUPPORTED",
        description="List each ATen op of the traced model: how many nodes run it and which "
        "rule costs it; ops without a rule are listed first and are not counted anywhere.",
        epilog="Exit status 1 with --strict when an op is unsupported; 2 on a user error.")
    _model_options(cov)
    cov.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    cov.set_defaults(run=cmd_coverage)

    pl = verbs.add_parser(
        "plan", help="rank parallel plans (dp x tp x pp, sharding, checkpointing) by step time",
        description="Every dp x tp x pp that multiplies to --gpus, with each --micro-batch, "
        "--sharding and --checkpoint policy: per-device memory (estimate) and roofline step "
        "time with the plan's collectives and pipeline bubble; the plans that fit ranked by "
        "step time, and why the others were rejected.",
        epilog="Tensor parallelism stays inside a node with sequence parallelism on; see "
        "docs/parallel.md for the model. Exit status 2 on a user error.")
    pl.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    pl.add_argument("--gpus", type=_positive, required=True, help="devices in all")
    pl.add_argument("--global-batch", type=_positive, required=True,
                    help="sequences per optimizer step, all data-parallel ranks")
    pl.add_argument("--seq", type=_positive, default=None,
                    help="sequence length (default: the model's own)")
    _device_options(pl)
    _training_options(pl)
    pl.add_argument("--micro-batch", default="1,2,4", metavar="B1,B2,...",
                    help="micro-batch sizes to try (default 1,2,4)")
    pl.add_argument("--checkpoint", default="none,full", metavar="P1,P2,...",
                    help="checkpoint policies to try (default none,full)")
    pl.add_argument("--sharding", default="zero-1,fsdp", metavar="S1,S2,...",
                    help="data-parallel sharding to try: none, zero-1, zero-2, zero-3, fsdp "
                    "(default zero-1,fsdp)")
    pl.add_argument("--intra-node", default=None, metavar="LINK|GB/s",
                    help="link inside a node (default: the device's, e.g. nvlink4)")
    pl.add_argument("--inter-node", default=None, metavar="LINK|GB/s",
                    help="link between nodes (default: the device's, e.g. ib-ndr)")
    pl.add_argument("--gpus-per-node", type=_positive, default=None,
                    help="GPUs per node (default 8)")
    pl.add_argument("--reserve", default=f"{DEFAULT_RESERVE_BYTES}",
                    help="memory kept free per device (default 2GiB)")
    pl.add_argument("--top", type=_positive, default=10, help="plans to list (default 10)")
    _rule_options(pl)
    pl.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    pl.set_defaults(run=cmd_plan, no_targets=False, batch=1)

    d = verbs.add_parser("devices", help="list device presets (or the devices named)",
                         description="Device presets: memory, bandwidth, dense fp32 and bf16 "
                         "matmul peaks and the ridge point (bf16 FLOP per byte). With DEVICE "
                         "names or device files, just those, with any --device-* flags "
                         "applied: a way to check a file or a set of flags.",
                         epilog="A device is a preset, a device file (docs/devices.md), a "
                         "preset or file with --device-* flags over it, or this machine as "
                         "'graphcost calibrate' measures it.")
    d.add_argument("names", nargs="*", metavar="DEVICE", help="preset name or FILE.json")
    _device_override_options(d)
    d.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    d.set_defaults(run=cmd_devices)

    cal = verbs.add_parser(
        "calibrate", help="measure this machine's CPU or GPU and write a device file",
        description="Measure the local device with PyTorch's own kernels: dense matmul FLOP/s "
        "per dtype (torch.mm, n doubling to fit the time budget, best of several runs after "
        "a warm-up), and memory bandwidth (a copy well beyond the last-level cache, bytes "
        "read + written). The vector (non-matmul) figure is the float32 matmul one. Writes a "
        "device file that --device takes wherever a preset name goes.",
        epilog="Timings depend on the thread count (torch.get_num_threads(), recorded in the "
        "file) and on what else runs on the machine. Exit status 2 on a user error.")
    cal.add_argument("--out", default=None, metavar="FILE.json",
                     help="device file to write (default: cpu.json or cuda.json)")
    cal.add_argument("--device", default=None, choices=["cpu", "cuda"],
                     help="what to measure (default: cuda when available, else cpu)")
    cal.add_argument("--seconds", type=float, default=3.0,
                     help="time budget, about (default 3); more gives steadier figures")
    cal.add_argument("--dtypes", default="float32,bfloat16", metavar="D1,D2",
                     help="matmul dtypes: float32, bfloat16, float16 (default "
                     "float32,bfloat16; float32 is always measured)")
    cal.add_argument("--threads", type=_positive, default=None,
                     help="CPU threads for the measurement (default: torch's, "
                     f"{torch.get_num_threads()} here)")
    cal.add_argument("--name", default=None, help="device name (default cpu-calibrated or "
                     "cuda-calibrated)")
    cal.add_argument("--matmul-size", type=_positive, default=None, metavar="N",
                     help="fix the matmul side n instead of searching it (small n: quick, "
                     "low figures)")
    cal.add_argument("--copy-bytes", default=None, metavar="SIZE",
                     help="fix the copy buffer, e.g. 64MiB (default: 8x the last-level "
                     "cache, at least 256 MiB on a CPU)")
    cal.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    cal.set_defaults(run=cmd_calibrate)

    m = verbs.add_parser("models", help="list zoo model names",
                         description="Names accepted as MODEL, besides path/to/file.py:factory.")
    m.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    m.set_defaults(run=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        for path in getattr(args, "rules", None) or []:
            from graphcost.analysis.coverage import load_rule_file

            load_rule_file(path)
        return args.run(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except GraphcostError as exc:
        print(f"graphcost: error: {str(exc).strip()}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
