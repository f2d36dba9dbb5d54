"""MODEL as the command line names it: a zoo name, `path/to/file.py:factory` or
`hf:path/to/config.json` (a Hugging Face config, graphcost.hf), built on the meta device, with
the dtype and shape options applied. Errors are `CliError`s: one message."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphcost.errors import ConfigError, GraphcostError
from graphcost.models import UnknownModelError, list_models, load

HF_PREFIX = "hf:"  # MODEL = hf:path/to/config.json, a Hugging Face config (graphcost.hf)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                 "float": "fp32"}


class CliError(GraphcostError):
    """A bad command line or model file; printed as one message, exit status 2."""


@dataclass(frozen=True)
class LoadedModel:
    """What MODEL named: the module on the meta device, its example inputs, and the shape asked."""

    name: str
    module: nn.Module
    inputs: tuple
    batch: int | None
    seq: int | None
    tokens: int | None  # batch * seq when the first input is a (batch, seq) tensor of token ids
    dtype: str | None


# ---------------------------------------------------------------- options


def parse_dtype(text: str) -> str:
    key = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if key not in DTYPES:
        raise CliError(f"unknown dtype {text!r}, in --dtype; use one of {', '.join(DTYPES)}")
    return key


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set n_layers=2 --set bias=False` -> {"n_layers": 2, "bias": False}."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"bad --set {item!r}, expected FIELD=VALUE; e.g. --set n_layers=2")
        try:
            out[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = text.strip()
    return out


# ---------------------------------------------------------------- loading MODEL


def load_model(spec: str, *, batch: int | None = None, seq: int | None = None,
               dtype: str | None = None, targets: bool = True,
               overrides: dict[str, Any] | None = None) -> LoadedModel:
    """A zoo name, `path/to/file.py:factory` or `hf:CONFIG`, built on the meta device."""
    if spec.startswith(HF_PREFIX):
        return _load_hf(spec, batch=batch, seq=seq, dtype=dtype, targets=targets,
                        overrides=overrides or {})
    if spec in list_models() or not (":" in spec or spec.endswith(".py")):
        return _load_zoo(spec, batch=batch, seq=seq, dtype=dtype, targets=targets,
                         overrides=overrides or {})
    if overrides:
        raise CliError(f"--set applies to zoo models only, not to {spec!r}; set the fields in "
                       "your factory instead")
    return _load_file(spec, batch=batch, seq=seq, dtype=dtype, targets=targets)


def _load_zoo(name, *, batch, seq, dtype, targets, overrides) -> LoadedModel:
    batch = 1 if batch is None else batch
    dtype = dtype or "fp32"
    try:
        module, inputs = load(name, batch=batch, seq=seq, dtype=DTYPES[dtype],
                              with_targets=targets, **overrides)
    except UnknownModelError as exc:
        raise CliError(f"{exc}; or pass path/to/file.py:factory or hf:path/to/config.json") from None
    except (ValueError, TypeError) as exc:
        raise CliError(f"bad --batch/--seq/--set for {name!r}: {exc}") from None
    # seq: the token count of an LM's (batch, seq) ids, the image size of the CNN's images
    return LoadedModel(name, module, tuple(inputs), batch, int(inputs[0].shape[-1]),
                       _tokens(inputs), dtype)


def _load_hf(spec, *, batch, seq, dtype, targets, overrides) -> LoadedModel:
    """`hf:path/to/config.json` or `hf:path/to/model_dir`: transformers builds the model of the
    config on the meta device; `--set FIELD=VALUE` sets config fields."""
    from graphcost.load.hf import load_hf

    path = spec[len(HF_PREFIX):]
    if not path:
        raise CliError(f"no config named in {spec!r}; give hf:path/to/config.json or "
                       "hf:path/to/model_dir")
    batch = 1 if batch is None else batch
    dtype = dtype or "fp32"
    try:
        hf = load_hf(path, batch=batch, seq=seq, dtype=DTYPES[dtype], targets=targets,
                     overrides=overrides)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    return LoadedModel(hf.name, hf.module, hf.inputs, batch, int(hf.inputs[0].shape[-1]),
                       _tokens(hf.inputs), dtype)


def _tokens(inputs: tuple) -> int | None:
    """batch * seq when the first input is a (batch, seq) tensor of token ids, else None."""
    x = inputs[0] if inputs else None
    if isinstance(x, torch.Tensor) and x.dim() == 2 and not (
            x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        return int(x.shape[0] * x.shape[1])
    return None


def _load_file(spec, *, batch, seq, dtype, targets) -> LoadedModel:
    path_text, _, factory_name = spec.rpartition(":")
    if not path_text:  # "model.py" without ":factory"
        path_text, factory_name = spec, ""
    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"model file {str(path)!r} not found (from MODEL {spec!r}); give a path "
                       "to an existing .py file, relative to the current directory, as "
                       "path/to/file.py:factory")
    namespace = _import_file(path)
    factories = sorted(n for n, v in vars(namespace).items()
                       if inspect.isfunction(v) and v.__module__ == namespace.__name__
                       and not n.startswith("_"))
    if not factory_name or not callable(getattr(namespace, factory_name, None)):
        what = (f"no factory named in {spec!r}" if not factory_name
                else f"no function {factory_name!r} in {path}")
        raise CliError(f"{what}; pass {path}:FACTORY where FACTORY() returns (module, "
                       f"example_inputs); functions in {path}: {', '.join(factories) or 'none'}")
    factory = getattr(namespace, factory_name)
    kwargs = _factory_kwargs(factory, f"{path}:{factory_name}", batch=batch, seq=seq,
                             targets=targets)
    try:
        with torch.device("meta"):
            result = factory(**kwargs)
    except Exception as exc:  # the user's code: say where it failed
        raise CliError(f"{path}:{factory_name}() raised {_describe(exc, path)}; fix the "
                       "factory so that it returns (module, example_inputs)") from None
    module, inputs = _check_factory_result(result, f"{path}:{factory_name}")
    if dtype is not None:
        module = module.to(DTYPES[dtype])  # NB: .to(dtype) casts floating params/buffers only
        inputs = tuple(x.to(DTYPES[dtype]) if isinstance(x, torch.Tensor)
                       and x.is_floating_point() else x for x in inputs)
    else:
        dtype = next((dtype_name(p.dtype) for p in module.parameters()
                      if p.is_floating_point()), None)
    tokens = _tokens(inputs)
    if tokens is not None:  # the factory's own shape, whether or not --batch/--seq set it
        batch, seq = (int(n) for n in inputs[0].shape)
    return LoadedModel(spec, module, inputs, batch, seq, tokens, dtype)


def _import_file(path: Path):
    name = f"graphcost_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot import {str(path)!r} as Python; give a .py file as "
                       "path/to/file.py:factory")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise CliError(f"syntax error in {exc.filename}:{exc.lineno}: {exc.msg}; fix the "
                       "model file") from None
    except Exception as exc:  # the user's code: say where it failed
        del sys.modules[name]
        raise CliError(f"importing {path} raised {_describe(exc, path)}; fix the model "
                       "file") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def _describe(exc: BaseException, path: Path) -> str:
    """'ValueError: bad width, at model.py:12: raise ValueError(...)', innermost line in `path`."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            where = f", at {path}:{frame.lineno}: {frame.line}"
    return f"{type(exc).__name__}: {exc}{where}"


def _factory_kwargs(factory, where: str, *, batch, seq, targets) -> dict[str, Any]:
    """--batch/--seq reach a factory that has `batch`/`seq` parameters; else they are an error."""
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {}
    for option, name, value in (("--batch", "batch", batch), ("--seq", "seq", seq)):
        if value is None:
            continue
        if name not in params and not takes_any:
            raise CliError(f"{option} was given but {where}() has no {name!r} parameter; add "
                           f"one ({name}=...) to the factory, or drop {option}")
        kwargs[name] = value
    if not targets and ("with_targets" in params or takes_any):
        kwargs["with_targets"] = False
    return kwargs


def _check_factory_result(result: Any, where: str) -> tuple[nn.Module, tuple]:
    ok = isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0],
                                                                               nn.Module)
    if not ok:
        got = type(result).__name__
        if isinstance(result, (tuple, list)):
            got += " of (" + ", ".join(type(x).__name__ for x in result) + ")"
        raise CliError(f"{where}() returned a {got}; it must return (module, example_inputs), "
                       "an nn.Module and a tuple of example input tensors")
    module, inputs = result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise CliError(f"{where}() returned example_inputs of type {type(inputs).__name__}; "
                       "return a tuple of tensors, e.g. (module, (x,))")
    return module, tuple(inputs)


def dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in DTYPES.items()}
    return names.get(dtype, str(dtype).removeprefix("torch."))
