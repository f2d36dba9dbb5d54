"""Parallel plans as text: memory per device and pipeline stage, and `plan`'s ranked table."""

from __future__ import annotations

from graphcost.report.units import UNITS_NOTE, format_bytes, format_count, format_seconds, table


def parallel_memory_report(stages, busiest, *, model: str, device) -> str:
    """Per-device memory of a parallel plan (parallel.DeviceMemory per pipeline stage)."""
    plan = busiest.plan
    shard = "FSDP" if plan.fsdp else (f"ZeRO-{plan.zero}" if plan.zero else "no sharding")
    extras = [x for x, on in (("sequence parallel", plan.sequence_parallel),
                              ("partitioned activations", plan.partition_activations)) if on]
    lines = [f"graphcost memory: {model} on {plan.gpus} x {device.name}: dp {plan.dp} x tp "
             f"{plan.tp} x pp {plan.pp}, {shard}" + (", " + ", ".join(extras) if extras else ""),
             "",
             f"  peak        {format_bytes(busiest.peak_bytes)} per device (estimate; stage "
             f"{busiest.stage}, {busiest.peak_phase})"]
    if device.memory_bytes:
        fits = "fits" if busiest.peak_bytes <= device.memory_bytes else "does NOT fit"
        lines.append(f"  device      {format_bytes(device.memory_bytes)}: {fits}")
    rows = [[str(d.stage), str(d.in_flight), format_bytes(d.states.params_bytes),
             format_bytes(d.states.grads_bytes), format_bytes(d.states.optimizer_state_bytes),
             format_bytes(d.activation_bytes), format_bytes(d.gather_bytes),
             format_bytes(d.training_peak_bytes), format_bytes(d.optimizer_peak_bytes),
             format_bytes(d.peak_bytes)] for d in stages]
    lines += ["", table(["stage", "in flight", "params", "grads", "optimizer", "activations",
                         "FSDP buffers", "backward peak", "optimizer peak", "peak"], rows,
                        align="r" * 10), "",
              "per device (rank 0 of its tensor- and data-parallel groups); activations: what "
              "the in-flight micro-batches keep for backward,",
              "divided by tensor/sequence parallelism; the peaks add the one-device walk's "
              "transients, scaled. See docs/parallel.md.", UNITS_NOTE]
    return "\n".join(lines) + "\n"


def plan_report(plans, *, model: str, device, gpus: int, global_batch: int, seq, network,
                top: int = 10) -> str:
    """Parallel plans ranked by step time (plan_search.Candidate), and the rejected ones by
    reason."""
    feasible = [c for c in plans if not c.rejected]
    rows = []
    for c in feasible[:top]:
        p, st = c.plan, c.step
        rows.append([str(p.dp), str(p.tp), str(p.pp), c.sharding, c.checkpoint,
                     str(c.micro_batch), format_count(p.in_flight),
                     format_seconds(st.step_time_s), f"{100 * st.mfu:.1f}%",
                     f"{st.tokens_per_s:,.0f}", format_bytes(c.memory.peak_bytes),
                     format_seconds(st.bubble_s), format_seconds(st.dp_exposed_s)])
    lines = [f"graphcost plan: {model} on {gpus} x {device.name}, global batch {global_batch}"
             + (f" x {seq} tokens" if seq else ""),
             f"  network     {network.intra.name} inside a node of {network.gpus_per_node}, "
             f"{network.inter.name} between nodes", ""]
    if rows:
        lines += [table(["dp", "tp", "pp", "sharding", "ckpt", "mb", "micro-batches",
                         "step time", "MFU", "tokens/s", "memory/device", "bubble",
                         "exposed DP comm"], rows, align="rrrllrrrrrrrr")]
        if len(feasible) > top:
            lines.append(f"... {len(feasible) - top} more plans fit")
    else:
        lines.append("!! NO PLAN FITS: see the reasons below; try more GPUs, a smaller "
                     "--global-batch or --seq, or checkpointing (--checkpoint full)")
    reasons: dict[str, int] = {}
    for c in plans:
        if c.rejected:
            key = "needs more memory than the device has" if c.rejected.startswith("needs") \
                else c.rejected
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines += ["", f"rejected {sum(reasons.values())} plans:"]
        lines += [f"  {n:4d}  {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])]
    lines += ["", "memory/device: the busiest device's estimated peak; step time: roofline "
              "compute per stage, TP all-reduces and pipeline",
              "sends on the critical path, the 1F1B bubble, data-parallel collectives beyond "
              "the compute they overlap. See docs/parallel.md.", UNITS_NOTE]
    return "\n".join(lines) + "\n"
