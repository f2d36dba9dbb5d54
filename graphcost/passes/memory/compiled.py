"""The memory timeline of training steps under torch.compile: the step's start and the
optimizer are eager's (walk.py), the forward and the backward are the compiled graphs'
(graphcost.passes.compiled: what the code Inductor generates holds, by category).

Per micro-batch, four events replace the eager walk's op-by-op forward and backward: the
compiled forward at its fullest, the forward's end with the loss taken, the backward at its
fullest, and the backward's return, where it hands every parameter's gradient to autograd's
AccumulateGrad at once (the compiled backward is one autograd node): a gradient becomes `.grad`,
or is added to an existing one in place and freed. Then the optimizer runs as in eager.
"""

from __future__ import annotations

from graphcost.analysis.analyze import Analysis
from graphcost.errors import ConfigError
from graphcost.passes.compiled import CompiledStep
from graphcost.passes.inductor_code import HELD, Held
from graphcost.passes.memory.training import MemoryTimeline, TrainingConfig
from graphcost.passes.memory.walk import Walk

# the graph attributes it reads (graphcost/graph/schema.py): the eager walk's, for the start
# and the optimizer
READS: tuple[str, ...] = ()

FORWARD, BACKWARD = "compiled forward", "compiled backward"  # the events' module column


def compiled_timeline(analysis: Analysis, config: TrainingConfig,
                      step: CompiledStep) -> MemoryTimeline:
    """`config.steps` training steps of `analysis`'s model trained as torch.compile(model), the
    compiled forward and backward being `step` (compiled_step(..., peak=True))."""
    if step.forward_peak is None:
        raise ConfigError("the compiled step's memory is not available: Inductor's code "
                          "generation failed on this model (docs/compile.md)")
    return _CompiledWalk(analysis.graph, config, step).run()


class _CompiledWalk(Walk):
    def __init__(self, g, config: TrainingConfig, step: CompiledStep) -> None:
        super().__init__(g, config)
        self.step = step

    def run(self) -> MemoryTimeline:
        timeline = super().run()
        s = self.step
        return MemoryTimeline(self.config, timeline.table, timeline.optimizer_impl,
                              plan=self.plan, recompute_flops=s.recompute_flops,
                              saved_activation_bytes=s.saved_activation_bytes,
                              kept=timeline.kept)

    def _hold(self, held: Held, step: int, phase: str, where: str, op: str | None = None) -> None:
        for category in HELD:
            self.live.drop(("compiled", category))
            self.live.add(("compiled", category), getattr(held, category), category)
        self.sample(step, phase, where, where=where, op=op or held.op)

    def forward(self, step: int) -> None:
        self._hold(self.step.forward_peak, step, "forward", FORWARD)
        self._hold(self.step.forward_end, step, "forward", FORWARD, op="sum (the loss)")

    def backward(self, step: int) -> None:
        self._hold(self.step.backward_peak, step, "backward", BACKWARD)
        self._hold(self.step.backward_end, step, "backward", BACKWARD, op="gradients returned")
        for category in HELD:
            self.live.drop(("compiled", category))
        for sid, nbytes in self.f.updated:  # AccumulateGrad: stolen, or added in place
            self.live.add(("grad", sid), nbytes, "grads")
