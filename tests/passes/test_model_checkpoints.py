"""torch.utils.checkpoint called inside the model's own forward (trace/checkpoints.py): the regions
are found, costed like graphcost's own policies, and checked against PyTorch running them:

- saved bytes: autograd's saved tensors on a real CPU run (the checkpoint frame's inputs are
  saved through autograd too);
- backward + recomputation FLOPs: FlopCounterMode around `loss.backward()` on meta, which counts
  what the checkpoint really re-runs (early stop included);
- the training peak and every phase peak: the live tracker on real CPU steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode

from graphcost import analyze
from graphcost.errors import ConfigError
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from tests.helpers import run_cli
from validation.groundtruth import measure_saved_bytes, scalar_loss
from validation.memtrack import measure_training_peak

torch.set_num_threads(1)
D, BATCH, SEQ = 32, 4, 16
TOLERANCE = 0.005


class Block(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 4 * D)
        self.down = nn.Linear(4 * D, D)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


class Checkpointed(nn.Module):
    """A stem, `n` blocks run as `how` says, a head."""

    def __init__(self, how: str, n: int = 5, dropout: float = 0.0) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Linear(D, D)
        self.blocks = nn.ModuleList(Block(dropout) for _ in range(n))
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        x = self.stem(x)
        if self.how == "sequential":
            x = checkpoint_sequential(nn.Sequential(*self.blocks), 2, x, use_reentrant=False)
        else:
            for i, block in enumerate(self.blocks):
                if self.how == "every-other" and i % 2:
                    x = block(x)
                elif self.how == "no-early-stop":
                    x = checkpoint(block, x, use_reentrant=False, early_stop=False)
                else:
                    x = checkpoint(block, x, use_reentrant=self.how == "reentrant")
        return self.head(x).pow(2).mean()


CASES = {
    "per-block": dict(how="per-block"),
    "reentrant": dict(how="reentrant"),
    "no-early-stop": dict(how="no-early-stop"),
    "sequential": dict(how="sequential", n=6),  # the last segment is not checkpointed
    "every-other": dict(how="every-other", n=6),  # the parent decides per block
    "dropout": dict(how="per-block", dropout=0.1),
}


def _build(device: str, **kw):
    torch.manual_seed(0)
    with torch.device(device):
        return Checkpointed(**kw), torch.randn(BATCH, SEQ, D)


@pytest.mark.parametrize("case", list(CASES))
def test_regions_match_pytorch(case):
    kw = CASES[case]
    model, x = _build("meta", **kw)
    analysis = analyze(model, (x,))
    timeline = training_timeline(analysis, TrainingConfig())
    assert timeline.plan.policy.kind == "model"
    assert not analysis.unsupported_ops

    # backward + recomputation, as the real backward runs it (on meta: no data needed)
    loss = scalar_loss(model(x))
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    assert analysis.backward_flops + timeline.recompute_flops == counter.get_total_flops()
    assert timeline.recompute_flops > 0

    model, x = _build("cpu", **kw)
    assert analysis.saved_activation_bytes == measure_saved_bytes(model, (x,))
    model, x = _build("cpu", **kw)
    measured = measure_training_peak(model, (x,))
    assert timeline.peak_bytes == pytest.approx(measured.peak_bytes, rel=TOLERANCE)
    predicted: dict = {}
    for (step, phase), value in timeline.phase_peaks().items():  # recomputation: in backward
        key = (step, "backward" if phase == "recompute" else phase)
        predicted[key] = max(predicted.get(key, 0), value)
    for key, value in predicted.items():
        assert value == pytest.approx(measured.step_phase_peaks[key], rel=TOLERANCE), key


def test_without_the_checkpoints_saved_bytes_are_higher():
    """The same model without its checkpoint calls saves far more: the check above is not
    vacuous."""
    model, x = _build("meta", how="per-block")
    checkpointed = analyze(model, (x,)).saved_activation_bytes
    model.how = "every-other"  # odd blocks plain; then all plain
    half = analyze(model, (x,)).saved_activation_bytes
    with torch.device("meta"):
        plain = analyze(nn.Sequential(model.stem, *model.blocks), (x,)).saved_activation_bytes
    assert checkpointed < half < plain


def test_a_policy_on_top_is_an_error(capsys, tmp_path):
    model, x = _build("meta", how="per-block")
    analysis = analyze(model, (x,))
    with pytest.raises(ConfigError, match="already checkpoints 5 region"):
        training_timeline(analysis, TrainingConfig(checkpoint="full"))
    assert training_timeline(analysis, TrainingConfig(checkpoint="model")).plan.regions
    factory = tmp_path / "ckpt.py"
    factory.write_text(
        "import torch\n"
        "from tests.passes.test_model_checkpoints import Checkpointed\n"
        "def build():\n"
        "    return Checkpointed('per-block'), (torch.empty(4, 16, 32),)\n")
    code, out, err = run_cli(capsys, "memory", f"{factory}:build", "--checkpoint", "full")
    assert code == 2 and out == "" and "already checkpoints" in err and "Traceback" not in err


def test_model_policy_without_regions_is_an_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 1))
    analysis = analyze(model, (torch.empty(BATCH, D, device="meta"),))
    with pytest.raises(ConfigError, match="calls no torch.utils.checkpoint"):
        training_timeline(analysis, TrainingConfig(checkpoint="model"))


def test_selective_context_is_flagged():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default \
            else CheckpointPolicy.PREFER_RECOMPUTE

    class Selective(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False,
                              context_fn=lambda: create_selective_checkpoint_contexts(policy))

    with torch.device("meta"):
        model = Selective()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analyze(model, (torch.empty(BATCH, SEQ, D, device="meta"),))
    assert any("selective checkpoint context" in str(w.message) for w in caught)


def test_recording_leaves_torch_as_it_was():
    from graphcost.trace.checkpoints import recording_checkpoints

    generator = torch_checkpoint._checkpoint_without_reentrant_generator
    apply = torch_checkpoint.CheckpointFunction.apply
    with recording_checkpoints():
        assert torch_checkpoint._checkpoint_without_reentrant_generator is not generator
    assert torch_checkpoint._checkpoint_without_reentrant_generator is generator
    assert torch_checkpoint.CheckpointFunction.apply == apply
    assert "apply" not in torch_checkpoint.CheckpointFunction.__dict__


def test_compare_and_optimize_show_the_models_own_plan(capsys, tmp_path):
    """`graphcost checkpoint` on a model that checkpoints itself: one row, the model's own
    checkpoints, the other policies skipped with the reason; a budget judges that row."""
    factory = tmp_path / "ckpt_cli.py"
    factory.write_text(
        "import torch\n"
        "from tests.passes.test_model_checkpoints import Checkpointed\n"
        "def build():\n"
        "    return Checkpointed('per-block'), (torch.empty(4, 16, 32),)\n")
    code, out, err = run_cli(capsys, "checkpoint", f"{factory}:build", "--json")
    assert code == 0, err
    import json
    result = json.loads(out)
    assert [r["policy"] for r in result["rows"]] == ["model"]
    assert result["rows"][0]["recompute_flops"] > 0
    assert {s["policy"] for s in result["skipped"]} >= {"full", "save-matmuls"}
    peak = result["rows"][0]["peak_bytes"]
    for budget, fits in ((peak + 1, True), (peak - 1, False)):
        code, out, err = run_cli(capsys, "checkpoint", f"{factory}:build", "--json",
                                 "--budget", str(budget))
        assert code == 0, err
        assert json.loads(out)["fits"] is fits
