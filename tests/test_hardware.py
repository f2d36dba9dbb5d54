"""Devices: the presets against the reference table, the figures a roofline reads, device files,
the --device-* flags and `graphcost devices`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from graphcost.cli.main import main
from graphcost.errors import ConfigError
from graphcost.hardware.devices import (
    GB,
    GIB,
    PRESETS,
    TERA,
    Device,
    get_device,
    load_device_file,
    save_device_file,
)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference" / "hardware.md"

# The table of ../shared/reference/hardware.md ("Accelerator reference figures (dense, no 2:4
# sparsity)"), copied verbatim so that the test runs without the shared folder;
# test_reference_table_is_current checks the copy against the file where it exists.
HARDWARE_MD = """\
| device | memory | bandwidth | FP32 (non-tensor) | TF32 | BF16/FP16 tensor | FP8 |
|---|---|---|---|---|---|---|
| A100 40GB SXM | 40 GB HBM2 | 1,555 GB/s | 19.5 | 156 | 312 | – |
| A100 80GB SXM | 80 GB HBM2e | 2,039 GB/s | 19.5 | 156 | 312 | – |
| A100 80GB PCIe | 80 GB HBM2e | 1,935 GB/s | 19.5 | 156 | 312 | – |
| H100 SXM5 | 80 GB HBM3 | 3,350 GB/s | 67 | 494.7 | 989.4 | 1,979 |
| H100 PCIe | 80 GB HBM2e | 2,000 GB/s | 51 | 378 | 756 | 1,513 |
| H200 SXM | 141 GB HBM3e | 4,800 GB/s | 67 | 494.5 | 989 | 1,979 |
| B200 | 180 GB HBM3e | 8,000 GB/s | 80 | 1,100 | 2,250 | 4,500 |
| RTX 3090 | 24 GB GDDR6X | 936 GB/s | 35.6 | 35.6 | 71 (FP32 accumulate; 142 with FP16 accumulate) | – |
| RTX 4090 | 24 GB GDDR6X | 1,008 GB/s | 82.6 | 82.6 | 165.2 (FP32 accumulate; 330.3 with FP16 accumulate) | 330.3 |
| L4 | 24 GB GDDR6 | 300 GB/s | 30.3 | 60 | 121 | 242.5 |
| L40S | 48 GB GDDR6 | 864 GB/s | 91.6 | 183 | 362 | 733 |
| MI300X | 192 GB HBM3 | 5,300 GB/s | 163.4 | 653.7 | 1,307.4 | 2,614.9 |
"""
PRESET_OF = {"A100 40GB SXM": "a100-40gb", "A100 80GB SXM": "a100-80gb",
             "A100 80GB PCIe": "a100-80gb-pcie", "H100 SXM5": "h100-sxm", "H100 PCIe": "h100-pcie",
             "H200 SXM": "h200", "B200": "b200", "RTX 3090": "rtx3090", "RTX 4090": "rtx4090",
             "L4": "l4", "L40S": "l40s", "MI300X": "mi300x"}


def number(cell: str) -> float | None:
    """'1,979' -> 1979.0; '71 (FP32 accumulate; ...)' -> 71.0 (the first figure); '–' -> None."""
    match = re.match(r"[0-9][0-9,.]*", cell.strip())
    return float(match.group().replace(",", "")) if match else None


def reference_rows(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    return {row[0]: row[1:] for row in rows[2:]}


def test_reference_table_is_current():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is outside the repository and not present here")
    assert reference_rows(REFERENCE.read_text()) == reference_rows(HARDWARE_MD)


def test_every_preset_has_a_reference_row():
    assert set(PRESET_OF.values()) == set(PRESETS) - {"cpu"}
    assert set(PRESET_OF) == set(reference_rows(HARDWARE_MD))


@pytest.mark.parametrize("label", list(PRESET_OF))
def test_preset_equals_reference(label):
    memory, bandwidth, fp32, tf32, bf16, fp8 = reference_rows(HARDWARE_MD)[label]
    d = PRESETS[PRESET_OF[label]]
    assert d.kind == "cuda"
    # "80 GB" on a datasheet is binary: the card holds ~80 GiB (see hardware.py)
    assert d.memory_bytes == number(memory) * GIB
    assert d.bandwidth_bytes_per_s == number(bandwidth) * GB
    assert d.memory_bandwidth_bytes_per_s() == number(bandwidth) * GB
    expected_matmul = {torch.float32: number(fp32) * TERA, torch.bfloat16: number(bf16) * TERA,
                       torch.float16: number(bf16) * TERA}
    if number(fp8) is not None:
        expected_matmul[torch.float8_e4m3fn] = number(fp8) * TERA
    assert d.peak_flops_per_s == pytest.approx(expected_matmul, rel=1e-12)
    for dtype, peak in expected_matmul.items():
        assert d.matmul_flops_per_s(dtype) == pytest.approx(peak, rel=1e-12)
    # vector units: the FP32 (non-tensor) column, for fp32 and half precision alike
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert d.vector_flops_per_s(dtype) == pytest.approx(number(fp32) * TERA, rel=1e-12)
    assert f"TF32 {tf32.replace(',', '')} TFLOP/s" in d.description


def test_ridge_points_match_the_cross_check():
    # hardware.md: "Ridge points (bf16 FLOP per byte): H100 SXM ≈ 295, A100 80GB ≈ 153"
    assert round(get_device("h100-sxm").ridge_point()) == 295
    assert round(get_device("a100-80gb").ridge_point(torch.bfloat16)) == 153


def test_missing_figures_are_errors_never_zero():
    with pytest.raises(ConfigError, match=r"'a100-80gb' has no matmul FLOP/s for float8_e4m3fn"):
        get_device("a100-80gb").matmul_flops_per_s(torch.float8_e4m3fn)
    with pytest.raises(ConfigError, match="no vector"):
        get_device("h100-sxm").vector_flops_per_s("float8_e4m3fn")
    cpu = get_device("cpu")
    for ask in (lambda: cpu.matmul_flops_per_s(torch.float32),
                lambda: cpu.vector_flops_per_s(torch.bfloat16),
                cpu.memory_bandwidth_bytes_per_s):
        with pytest.raises(ConfigError, match=r"run `graphcost calibrate` and pass --device "
                           r"cpu\.json"):
            ask()


def test_integer_work_uses_the_float32_vector_figure():
    h100 = get_device("h100-sxm")
    assert h100.vector_flops_per_s(torch.int64) == h100.vector_flops_per_s(torch.float32)
    assert h100.vector_flops_per_s(torch.bool) == 67 * TERA


def test_dtype_names():
    h100 = get_device("h100-sxm")
    assert h100.matmul_flops_per_s("bf16") == h100.matmul_flops_per_s("bfloat16") == \
        h100.matmul_flops_per_s(torch.bfloat16) == 989.4 * TERA
    with pytest.raises(ConfigError, match="unknown dtype 'int4'"):
        h100.matmul_flops_per_s("int4")


def test_with_figures_merges_over_the_device():
    base = get_device("a100-80gb")
    d = base.with_figures(memory_bytes=48 * GIB, bandwidth_bytes_per_s=1.5e12,
                          matmul_flops_per_s={"bf16": 250e12},
                          vector_flops_per_s={torch.float32: 20e12})
    assert (d.name, d.kind, d.memory_bytes, d.bandwidth_bytes_per_s) == (
        "a100-80gb+custom", "cuda", 48 * GIB, 1.5e12)
    assert d.peak_flops_per_s == {**base.peak_flops_per_s, torch.bfloat16: 250e12}
    assert d.vector_peak_flops_per_s[torch.float32] == 20e12
    assert base.memory_bytes == 80 * GIB  # the preset is untouched
    with pytest.raises(ConfigError, match="memory must be a positive number"):
        base.with_figures(memory_bytes=-1)


# ---------------------------------------------------------------- device files


def write(tmp_path: Path, data, name: str = "dev.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


GOOD = {"name": "my-gpu", "kind": "cuda", "memory": "48GiB", "bandwidth_bytes_per_s": 9.6e11,
        "matmul_flops_per_s": {"bfloat16": 1.5e14, "float32": 3e13},
        "vector_flops_per_s": {"float32": 3e13}, "description": "a card not in the presets"}


def test_device_file_reads_every_field(tmp_path):
    path = write(tmp_path, GOOD)
    d = get_device(str(path))
    assert d == Device("my-gpu", "cuda", 48 * GIB, 9.6e11,
                       {torch.bfloat16: 1.5e14, torch.float32: 3e13},
                       "a card not in the presets", {torch.float32: 3e13})
    assert d.source == str(path)
    assert d.ridge_point() == 1.5e14 / 9.6e11
    assert get_device(path) == d  # a Path too
    with pytest.raises(ConfigError, match="no vector .* for float16"):
        d.vector_flops_per_s(torch.float16)


@pytest.mark.parametrize("name", list(PRESET_OF.values()))
def test_preset_round_trips_through_a_file(tmp_path, name):
    path = save_device_file(PRESETS[name], tmp_path / f"{name}.json")
    assert load_device_file(path) == PRESETS[name]


def test_paths_are_files_and_names_are_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, GOOD, "cpu.json")
    assert get_device("cpu.json").name == "my-gpu"
    assert get_device("./cpu.json").name == "my-gpu"
    assert get_device("CPU") is PRESETS["cpu"]
    with pytest.raises(ConfigError, match="device file 'sub/x' not found"):
        get_device("sub/x")


BAD_FILES = [
    ('{"name": "x",', "is not valid JSON"),
    ("[1, 2]", "must hold one JSON object"),
    ({k: v for k, v in GOOD.items() if k != "memory"}, "missing field 'memory'"),
    ({k: v for k, v in GOOD.items() if k != "matmul_flops_per_s"},
     "missing field 'matmul_flops_per_s'"),
    ({**GOOD, "bandwidth_bytes_per_s": -1}, "field 'bandwidth_bytes_per_s' must be a positive"),
    ({**GOOD, "bandwidth_bytes_per_s": "fast"}, "field 'bandwidth_bytes_per_s' must be a "
     "positive"),
    ({**GOOD, "memory": "48 bananas"}, "field 'memory' must be bytes or a size"),
    ({**GOOD, "memory": 0}, "field 'memory' must be a positive"),
    ({**GOOD, "kind": "tpu"}, "field 'kind' must be one of cpu, cuda, got 'tpu'"),
    ({**GOOD, "matmul_flops_per_s": {"int8": 1e15}},
     "field 'matmul_flops_per_s' has unknown dtype 'int8'"),
    ({**GOOD, "matmul_flops_per_s": {}}, "field 'matmul_flops_per_s' is empty"),
    ({**GOOD, "vector_flops_per_s": {"float32": -5}},
     "field 'vector_flops_per_s.float32' must be a positive"),
    ({**GOOD, "bandwith_bytes_per_s": 1}, "unknown field 'bandwith_bytes_per_s' (did you mean "
     "'bandwidth_bytes_per_s'?)"),
]


@pytest.mark.parametrize("data,fragment", BAD_FILES)
def test_bad_device_file_names_the_file_and_the_field(tmp_path, data, fragment):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        get_device(str(path))
    assert f"device file {str(path)!r}" in str(info.value)
    assert fragment in str(info.value)


def assert_one_error(capsys, code, *fragments):
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("graphcost: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize("data,fragment", BAD_FILES[:3] + BAD_FILES[4:5])
def test_bad_device_file_exits_2_with_one_message(tmp_path, capsys, data, fragment):
    path = write(tmp_path, data)
    code = main(["analyze", "gpt2", "--device", str(path)])
    assert_one_error(capsys, code, str(path), fragment)


def test_missing_device_file_says_how_to_make_one(tmp_path, capsys):
    code = main(["memory", "gpt2", "--device", str(tmp_path / "cpu.json")])
    assert_one_error(capsys, code, "not found", "graphcost calibrate --out")


# ---------------------------------------------------------------- the --device-* flags

SMALL = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set",
         "vocab_size=64", "--set", "block_size=16", "--seq", "16"]


def run_json(capsys, *argv):
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_flags_lay_figures_over_the_device(capsys):
    out = run_json(capsys, "devices", "a100-80gb", "--device-memory", "48GiB",
                   "--device-bandwidth", "1500", "--device-flops", "250",
                   "--device-flops", "float32=40", "--device-vector-flops", "30")
    (d,) = out["devices"]
    assert d["name"] == "a100-80gb+custom" and d["kind"] == "cuda"
    assert d["memory_bytes"] == 48 * GIB
    assert d["bandwidth_bytes_per_s"] == 1500 * GB
    assert d["peak_flops_per_s"] == {"fp32": 40 * TERA, "bf16": 250 * TERA,
                                     "fp16": 250 * TERA}
    assert d["vector_flops_per_s"] == {"fp32": 30 * TERA, "bf16": 30 * TERA, "fp16": 30 * TERA}
    assert d["ridge_flops_per_byte"] == pytest.approx(250 / 1.5)


@pytest.mark.parametrize("verb", ["analyze", "memory", "checkpoint"])
def test_every_model_verb_takes_the_flags(capsys, verb):
    out = run_json(capsys, verb, "gpt2", *SMALL, "--device", "rtx3090",
                   "--device-memory", "12GiB")
    assert out["device"] == "rtx3090+custom"
    if verb == "checkpoint":  # the budget follows the overridden memory
        assert out["budget_bytes"] == 12 * GIB - 2 * GIB


def test_fit_takes_a_device_file(tmp_path, capsys):
    path = write(tmp_path, {**GOOD, "memory": "1GiB"})
    out = run_json(capsys, "fit", "gpt2", *SMALL, "--device", str(path),
                   "--reserve", "0GiB", "--device-memory", "2GiB")
    assert out["device"] == "my-gpu+custom" and out["memory_bytes"] == 2 * GIB


@pytest.mark.parametrize("argv,fragment", [
    (["--device-flops", "bf=3"], "bad --device-flops 'bf=3'"),
    (["--device-flops", "-3"], "--device-flops '-3' must be a positive"),
    (["--device-vector-flops", "float32=x"], "bad --device-vector-flops"),
    (["--device-bandwidth", "fast"], "bad --device-bandwidth 'fast'"),
    (["--device-memory", "0"], "--device-memory '0' must be more than 0"),
    (["--device-memory", "lots"], "bad size 'lots' in --device-memory"),
])
def test_bad_flags_exit_2(capsys, argv, fragment):
    code = main(["analyze", "gpt2", *argv])
    assert_one_error(capsys, code, fragment)


# ---------------------------------------------------------------- graphcost devices


def test_devices_lists_ridge_points_and_how_to_add_one(capsys):
    code = main(["devices"])
    out, _ = capsys.readouterr()
    assert code == 0
    h100 = next(line for line in out.splitlines() if line.startswith("h100-sxm "))
    assert " 295 " in h100 and "989.40 TFLOP/s" in h100 and "67.00 TFLOP/s" in h100
    a100 = next(line for line in out.splitlines() if line.startswith("a100-80gb "))
    assert " 153 " in a100
    assert "graphcost calibrate" in out and "--device-memory" in out and ".json" in out
    out = run_json(capsys, "devices")
    ridge = {d["name"]: d["ridge_flops_per_byte"] for d in out["devices"]}
    assert ridge["cpu"] is None and round(ridge["h100-sxm"]) == 295


def test_devices_shows_a_file(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    (d,) = run_json(capsys, "devices", str(path))["devices"]
    assert d["name"] == "my-gpu" and d["source"] == str(path)


def test_devices_flags_need_a_device(capsys):
    assert_one_error(capsys, main(["devices", "--device-memory", "1GiB"]), "name the device")
