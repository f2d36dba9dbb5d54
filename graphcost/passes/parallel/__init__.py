"""Many devices: a parallel plan's memory per device (plan.py: data, tensor, pipeline and expert
parallel, ZeRO and FSDP) and its step time with collectives and the pipeline bubble
(step_time.py)."""
