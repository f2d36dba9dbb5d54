"""Memory as text: the peak of a training step and what is alive then, fit's largest batch and
context, and inference with its KV cache."""

from __future__ import annotations

from graphcost.report.units import format_bytes, format_count, format_flops, format_share, table


def memory_report(timeline, *, model: str, device: str,
                  approximate: dict[str, int] | None = None) -> str:
    """The peak of a training step, when it happens, and what is alive then; `approximate`:
    the ops whose backward memory is only approximated (a note says so)."""
    from graphcost.passes.memory.training import CATEGORIES

    peak, config = timeline.peak, timeline.config
    lines = [
        f"graphcost memory: {model} on {device}, optimizer {config.optimizer} "
        f"({timeline.optimizer_impl}), "
        f"{config.steps} steps x {config.grad_accumulation} micro-batch(es)"
        f"{', torch.compile' if config.compile else ''}",
        "",
        f"  peak        {format_bytes(peak.total_bytes)}  ({format_count(peak.total_bytes)} bytes)",
        f"  when        step {peak.step}, {peak.phase}, {peak.op}"
        f"{' in ' + peak.module_path if peak.module_path else ''}",
    ]
    policy = timeline.plan.policy if timeline.plan is not None else config.checkpoint
    if str(policy) != "none":
        recompute = timeline.recompute_flops * config.grad_accumulation
        lines += [f"  checkpoint  {policy}: {len(timeline.plan.regions)} regions, "
                  f"recompute {format_flops(recompute)} per step, saved activations "
                  f"{format_bytes(timeline.saved_activation_bytes)}"]
    lines += [
        "",
        "alive at the peak:",
    ]
    rows = [[c.replace("_", " "), format_bytes(getattr(peak, c)),
             format_share(getattr(peak, c), peak.total_bytes)] for c in CATEGORIES]
    lines.append(table(["category", "bytes", "share"], rows, align="lrr"))
    lines += ["", "peak per phase:"]
    rows = [[str(step), phase, format_bytes(b)]
            for (step, phase), b in timeline.phase_peaks().items()]
    lines.append(table(["step", "phase", "peak"], rows, align="llr"))
    if approximate:
        ops = ", ".join(f"{op} (x{n})" for op, n in sorted(approximate.items()))
        lines += ["", f"note: the memory the backward of {ops} uses is not modelled exactly: "
                      "peaks around it are approximate (docs/validation.md)"]
    return "\n".join(lines) + "\n"


def fit_report(result, *, model: str, dtype: str | None, optimizer: str,
               checkpoint: str = "none", compile: bool = False) -> str:
    """What fits on the device: largest batch at the context, largest context at batch 1."""
    def ctx(n):
        if n is None:
            return "-"
        if n == 0:
            return "does not fit"
        limit = " (the model's limit)" if n == result.model_max_seq else ""
        return f"{format_count(n)} tokens{limit}"

    def batch(n):
        return format_count(n) if n else "does not fit"

    at = f"max batch @ {result.seq}" if result.seq else "max batch"
    setting = f"{optimizer}, {dtype or 'model dtype'}"
    if checkpoint != "none":
        setting += f", checkpoint {checkpoint}"
    if compile:  # inference stays eager: --compile models the training step
        setting += ", torch.compile"
    rows = [["training", setting, batch(result.train_max_batch),
             ctx(result.train_max_seq)],
            ["inference", "prefill + KV cache", batch(result.infer_max_batch),
             ctx(result.infer_max_seq)]]
    lines = [
        f"graphcost fit: {model} on {result.device}",
        f"  memory {format_bytes(result.memory_bytes)} - reserve "
        f"{format_bytes(result.reserve_bytes)} = budget {format_bytes(result.budget_bytes)}",
        "",
        table(["", "setting", at, "max context @ batch 1"], rows,
              align="llrr"),
    ]
    return "\n".join(lines) + "\n"


def inference_report(mem, *, model: str, device: str, batch: int | None,
                     context: int | None) -> str:
    """Peak of a prefill with the KV cache, and what is alive then."""
    rows = [["params", format_bytes(mem.weight_bytes), format_share(mem.weight_bytes,
                                                                     mem.peak_bytes)],
            ["kv cache", format_bytes(mem.kv_cache_bytes), format_share(mem.kv_cache_bytes,
                                                                         mem.peak_bytes)],
            ["activations", format_bytes(mem.activation_peak_bytes),
             format_share(mem.activation_peak_bytes, mem.peak_bytes)]]
    lines = [
        f"graphcost memory --inference: {model} on {device}"
        + (f", batch {batch} x context {context}" if context else ""),
        "",
        f"  peak        {format_bytes(mem.peak_bytes)}  ({format_count(mem.peak_bytes)} bytes)",
        f"  when        prefill, {mem.peak_op}"
        f"{' in ' + mem.peak_module if mem.peak_module else ''}",
        f"  KV cache    {format_bytes(mem.kv_cache_bytes_per_token)} per token (K and V, all "
        "layers)",
        "",
        table(["category", "bytes", "share"], rows, align="lrr"),
    ]
    return "\n".join(lines) + "\n"


def compiled_report(analysis, step) -> str:
    """`graphcost memory --compile` (and `analyze --compile`): what torch.compile keeps for
    backward, against eager, what its backward recomputes, and its forward and backward's
    fullest above the step's start."""
    eager, compiled = analysis.saved_activation_bytes, step.saved_activation_bytes
    change = f" ({(compiled - eager) / eager:+.1%} against eager)" if eager else ""
    peak = (format_bytes(step.peak_bytes) if step.peak_bytes is not None
            else "not available (Inductor's code generation failed)")
    lines = [f"torch.compile (Inductor, default settings): {analysis.shape.name} on "
             f"{analysis.device.name}", "",
             f"  saved for backward    {format_bytes(compiled)} in {len(step.saved):,} "
             f"tensors{change}; eager keeps {format_bytes(eager)}",
             f"  recomputed            {step.recomputed_ops:,} forward ops run again in the "
             f"backward, {format_flops(step.recompute_flops)}",
             f"  forward + backward    {peak} at the most above the step's start", "",
             "Inductor's own partitioner split the joint graph; the forward and backward "
             "replay the buffers of the code Inductor generates, the step's start and the "
             "optimizer are eager's (docs/compile.md: fp32 training peaks of transformers "
             "within 1.4% of real compiled runs on this CPU; kernels' own temporaries, "
             "oneDNN's bf16 matmul scratch and convolution reorders, not modelled)."]
    if step.graph_breaks is None:
        lines += ["", "NB: whether torch.compile would break the model into several graphs is "
                  "not known (dynamo cannot run it on fake tensors); it is costed as one."]
    elif step.graph_breaks:
        lines += ["", f"NB: torch.compile would break the model into several graphs; it is "
                  f"costed as one, so what is kept and held around the breaks is approximate. "
                  f"Graph breaks ({len(step.graph_breaks)}):",
                  *(f"  {b}" for b in step.graph_breaks)]
    if analysis.device.kind != "cpu":
        lines += ["", f"NB: the graphs are those Inductor makes for the CPU, standing in for "
                  f"{analysis.device.name}'s: CUDA's attention kernels, Triton's fusion and "
                  "memory planning, cuBLAS workspaces and the caching allocator are not "
                  "modelled (docs/compile.md)."]
    return "\n".join(lines) + "\n"


def compiled_dict(analysis, step) -> dict:
    """The JSON of `compiled_report`."""
    return {"model": analysis.shape.name, "device": analysis.device.name,
            "eager_saved_activation_bytes": analysis.saved_activation_bytes,
            **step.to_dict()}
