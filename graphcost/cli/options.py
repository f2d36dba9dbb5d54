"""The command line's vocabulary, defined once: argument converters and the argparse parents the
verbs share (docs/cli.md lists every flag and the verbs that take it)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from graphcost.api.options import parse_precision
from graphcost.errors import GraphcostError
from graphcost.hardware.devices import DEFAULT_DEVICE
from graphcost.load.model import CliError
from graphcost.passes.memory.training import OPTIMIZER_IMPLS, OPTIMIZERS
from graphcost.sizing.fit import DEFAULT_RESERVE_BYTES

MODEL_HELP = "zoo name, path/to/file.py:factory or hf:path/to/config.json"
POLICY_HELP = ("none, full, every-K, sqrt, selective, save-matmuls, per-block:OPT,OPT,..., "
               "modules:PATTERN[,PATTERN][+save:OP[,OP]], or model (the checkpoints the "
               "model's own forward makes, which a model that has them always uses)")
RESERVE_GIB = DEFAULT_RESERVE_BYTES // 2**30


# ---------------------------------------------------------------- converters


def argument(convert, ok, expected: str):
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


positive = argument(int, lambda v: v >= 1, "a positive integer")
non_negative = argument(int, lambda v: v >= 0, "0 or a positive integer")
fraction = argument(float, lambda v: 0 < v <= 1, "a fraction in (0, 1], e.g. 0.5")
positive_number = argument(float, lambda v: 0 < v < math.inf, "a positive number")


def precision(text: str) -> str:
    """--precision / --dtype: fp32, bf16, fp16 or bf16-mixed (float32, bfloat16, ... too)."""
    try:
        return parse_precision(text)
    except GraphcostError:
        raise argparse.ArgumentTypeError(f"unknown precision {text!r}; use one of fp32, bf16, "
                                         "fp16 or bf16-mixed") from None


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


def int_list(text: str | None, option: str) -> list[int | None]:
    """'1,2,4,8' -> [1, 2, 4, 8] (order kept, repeats dropped); None -> [None]."""
    if text is None:
        return [None]
    items = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() and int(t) > 0 for t in items):
        raise CliError(f"bad {option} {text!r}; give positive integers separated by commas, "
                       f"e.g. {option} 1,2,4,8")
    return list(dict.fromkeys(int(t) for t in items))


def link(text: str | None):
    """--intra-node / --inter-node: a link name, or a bandwidth in GB/s."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


# ---------------------------------------------------------------- the shared parents


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


@dataclass(frozen=True)
class Parents:
    """The option sets the verbs share, each defined once (argparse `parents=`)."""

    json: argparse.ArgumentParser
    model: argparse.ArgumentParser  # MODEL
    shape: argparse.ArgumentParser  # --batch, --seq
    precision: argparse.ArgumentParser  # --precision (alias --dtype)
    targets: argparse.ArgumentParser  # --no-targets
    device: argparse.ArgumentParser  # --device (default cpu) and the --device-* figures
    gpu: argparse.ArgumentParser  # --device, required, and the --device-* figures
    device_figures: argparse.ArgumentParser  # the --device-* figures alone
    set: argparse.ArgumentParser  # --set
    rules: argparse.ArgumentParser  # --strict, --rules
    training: argparse.ArgumentParser  # --optimizer, --optimizer-impl
    grad_accumulation: argparse.ArgumentParser
    checkpoint: argparse.ArgumentParser  # one policy
    efficiency: argparse.ArgumentParser
    parallel: argparse.ArgumentParser  # a parallel plan
    budget: argparse.ArgumentParser  # --budget
    reserve: argparse.ArgumentParser  # --reserve

    def loading(self) -> list[argparse.ArgumentParser]:
        """MODEL and its options on the verbs that trace it once at one shape."""
        return [self.model, self.shape, self.precision, self.device, self.targets, self.set,
                self.rules]


def build_parents() -> Parents:
    p = {name: _parent() for name in Parents.__dataclass_fields__}
    p["json"].add_argument("--json", action="store_true",
                           help="print one JSON object on stdout instead of the text report")
    p["model"].add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p["shape"].add_argument("--batch", type=positive, default=None, help="batch size (default 1)")
    p["shape"].add_argument("--seq", type=positive, default=None,
                            help="sequence length, or image size for the CNN (default: the zoo "
                            "model's own; LLaMA presets: 2048)")
    p["precision"].add_argument(
        "--precision", "--dtype", dest="precision", type=precision, default=None,
        help="fp32, bf16 or fp16 cast the model's floating parameters; bf16-mixed keeps fp32 "
        "weights and runs the ops under torch.autocast(bfloat16) (default: fp32 for zoo "
        "models, as built for file models). --dtype is the same option")
    p["targets"].add_argument("--no-targets", action="store_true",
                              help="zoo models: no targets, so the backward starts from the sum "
                              "of the outputs instead of the model's own cross-entropy loss")
    for name, required in (("device", False), ("gpu", True)):
        p[name].add_argument(
            "--device", required=required, default=None if required else DEFAULT_DEVICE,
            help="device preset, or a device file such as cpu.json (docs/devices.md)"
            + ("" if required else f"; default {DEFAULT_DEVICE!r}, the CPU kernels' saved "
               "tensors") + ". A GPU preset such as h100-sxm sizes saved activations for that "
            "GPU's kernels. See 'graphcost devices'")
    for name in ("device", "gpu", "device_figures"):
        _device_figures(p[name])
    p["set"].add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                          help="zoo models: override a config field, e.g. --set n_layers=2 "
                          "(repeatable)")
    p["rules"].add_argument("--strict", action="store_true",
                            help="an op without a cost rule is an error (default: listed and "
                            "warned)")
    p["rules"].add_argument("--rules", action="append", default=[], metavar="FILE.py",
                            help="a Python file registering your own op rules with "
                            "graphcost.register_rule (repeatable; docs/rules.md)")
    p["training"].add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                               help="optimizer with PyTorch's defaults (default adamw)")
    p["training"].add_argument("--optimizer-impl", default="auto", choices=OPTIMIZER_IMPLS,
                               help="optimizer implementation (default auto, PyTorch's: "
                               "single-tensor on the CPU, foreach on GPU presets)")
    p["training"].add_argument("--compile", action="store_true",
                               help="trained as torch.compile(model) (Inductor, its defaults): "
                               "what its partitioner keeps for backward and recomputes, and "
                               "the buffers of the code it generates (CPU kernels; "
                               "docs/compile.md)")
    p["grad_accumulation"].add_argument("--grad-accumulation", type=positive, default=1,
                                        help="micro-batches per optimizer step (default 1); "
                                        "FLOPs are per step")
    p["checkpoint"].add_argument("--checkpoint", default="none", metavar="POLICY",
                                 help=f"activation-checkpointing policy of the training step: "
                                 f"{POLICY_HELP} (default none; 'graphcost checkpoint' "
                                 "compares them)")
    _efficiency(p["efficiency"])
    _parallel(p["parallel"])
    p["budget"].add_argument("--budget", default=None, metavar="SIZE",
                             help="memory budget, e.g. 40GiB or 40e9 (default: --device's "
                             "memory less --reserve)")
    p["reserve"].add_argument("--reserve", default=None, metavar="SIZE",
                              help="memory of --device kept free for the CUDA context and "
                              f"allocator (default {RESERVE_GIB}GiB; not with --budget)")
    return Parents(**p)


def _device_figures(p: argparse.ArgumentParser) -> None:
    """The --device-* flags: figures laid over the device (see common.device_from_args)."""
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


def _efficiency(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("efficiency", "fractions of the device's peaks that kernels "
                             "reach, in (0, 1] (default 1, the physical limit)")
    g.add_argument("--matmul-efficiency", type=fraction, default=1.0, metavar="F",
                   help="of the dense matmul peak (linear, matmul, attention, convolution)")
    g.add_argument("--vector-efficiency", type=fraction, default=1.0, metavar="F",
                   help="of the vector peak (the other ops with FLOPs, the optimizer)")
    g.add_argument("--bandwidth-efficiency", type=fraction, default=1.0, metavar="F",
                   help="of the memory bandwidth")


def _parallel(p: argparse.ArgumentParser) -> None:
    """A parallel plan (graphcost.passes.parallel): per-device memory instead of one device."""
    g = p.add_argument_group("parallel plan (memory per device: docs/parallel.md)")
    g.add_argument("--gpus", type=positive, default=1, help="devices in all (default 1)")
    g.add_argument("--dp", type=positive, default=None,
                   help="data-parallel size (default: --gpus / (--tp x --pp))")
    g.add_argument("--tp", type=positive, default=1, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=positive, default=1, help="pipeline stages (default 1)")
    g.add_argument("--ep", type=positive, default=1, help="expert-parallel size (default 1)")
    g.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (default 0)")
    g.add_argument("--fsdp", action="store_true",
                   help="PyTorch FSDP (fully_shard) across the data-parallel ranks")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split the norms' and dropouts' activations across --tp ranks too")
    g.add_argument("--partition-activations", action="store_true",
                   help="split checkpointed activations across --tp ranks")
    g.add_argument("--micro-batches", type=positive, default=None,
                   help="micro-batches per pipeline flush (default --pp)")
