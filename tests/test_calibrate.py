"""`graphcost calibrate`: plausible figures in a few seconds with small sizes, a device file that
every verb reads back, and user errors as one message with exit status 2."""

from __future__ import annotations

import json
import time

import pytest
import torch

from graphcost.cli.main import main
from graphcost.errors import ConfigError
from graphcost.hardware.calibrate import calibrate
from graphcost.hardware.devices import get_device
from graphcost.rules.registry import FLOPS_PER_FMA

# small sizes: quick, and still well above any timer resolution
QUICK = dict(seconds=0.5, matmul_size=256, copy_bytes=16 * 2**20)
QUICK_ARGS = ["--seconds", "0.5", "--matmul-size", "256", "--copy-bytes", "16MiB"]


def test_calibrate_gives_plausible_figures_quickly():
    threads = torch.get_num_threads()
    start = time.perf_counter()
    result = calibrate("cpu", dtypes=["float32", "bfloat16"], **QUICK)
    assert time.perf_counter() - start < 20  # ~1 s alone; the machine may be shared
    d = result.device
    assert (d.kind, d.name, d.source) == ("cpu", "cpu-calibrated", "calibrate")
    for dtype in (torch.float32, torch.bfloat16):
        t = result.matmul[dtype]
        assert t.size == 256 and t.runs >= 3
        assert t.rate == FLOPS_PER_FMA * 256**3 / t.best_s
        assert 1e8 < d.matmul_flops_per_s(dtype) == t.rate < 1e14
    assert d.vector_flops_per_s(torch.bfloat16) == d.matmul_flops_per_s(torch.float32)
    assert result.bandwidth.size == 16 * 2**20
    assert 1e8 < d.memory_bandwidth_bytes_per_s() == 2 * 16 * 2**20 / result.bandwidth.best_s \
        < 1e13
    assert 2**28 < d.memory_bytes < 2**50
    assert d.calibration["threads"] == result.threads == threads
    assert torch.get_num_threads() == threads


def test_threads_are_set_for_the_measurement_only():
    threads = torch.get_num_threads()
    result = calibrate("cpu", dtypes=["float32"], threads=1, **QUICK)
    assert result.threads == result.device.calibration["threads"] == 1
    assert torch.get_num_threads() == threads


def test_float32_is_always_measured():
    result = calibrate("cpu", dtypes=["bf16"], seconds=0.2, matmul_size=128,
                       copy_bytes=2**20)
    assert list(result.matmul) == [torch.float32, torch.bfloat16]


def test_matmul_size_search_stays_in_bounds():
    result = calibrate("cpu", dtypes=["float32"], seconds=0.3, copy_bytes=2**20)
    n = result.matmul[torch.float32].size
    assert 256 <= n <= 4096 and n & (n - 1) == 0


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(dtypes=["float8_e4m3fn"]), "not float8_e4m3fn"),
    (dict(seconds=0), "--seconds must be more than 0"),
    (dict(kind="tpu"), "'cpu' or 'cuda', not 'tpu'"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        calibrate(**{"kind": "cpu", **kwargs})


def test_calibrated_file_works_wherever_a_preset_does(tmp_path, capsys):
    path = tmp_path / "cpu.json"
    code = main(["calibrate", "--device", "cpu", "--out", str(path), *QUICK_ARGS, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    data = json.loads(path.read_text())
    assert summary["out"] == str(path) and summary["matmul_size"] == {"float32": 256,
                                                                      "bfloat16": 256}
    assert data["kind"] == "cpu" and data["calibration"]["threads"] == torch.get_num_threads()
    assert set(data["matmul_flops_per_s"]) == {"float32", "bfloat16"}
    d = get_device(str(path))
    assert d.matmul_flops_per_s("bf16") == summary["matmul_flops_per_s"]["bfloat16"]
    assert d.memory_bandwidth_bytes_per_s() == summary["bandwidth_bytes_per_s"]
    assert d.memory_bytes == summary["memory_bytes"]

    code = main(["memory", "gpt2", "--device", str(path), "--set", "n_layer=1", "--seq", "16",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    memory = json.loads(out)
    assert memory["device"] == "cpu-calibrated" and memory["peak_bytes"] > 0
    # the CPU kernels are the preset's: the calibrated device saves the same tensors
    code = main(["memory", "gpt2", "--device", "cpu", "--set", "n_layer=1", "--seq", "16",
                 "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == memory["peak_bytes"]


def test_text_summary(tmp_path, capsys):
    path = tmp_path / "mine.json"
    code = main(["calibrate", "--out", str(path), "--device", "cpu", "--name", "bench-box",
                 "--dtypes", "float32", *QUICK_ARGS])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "matmul float32" in out and "256x256 @ 256x256" in out
    assert "memory bandwidth" in out and "GB/s" in out
    assert f"wrote {path}" in out
    assert get_device(str(path)).name == "bench-box"


@pytest.mark.parametrize("argv,fragment", [
    (["--dtypes", "fp64"], "unknown dtype 'fp64'"),
    (["--dtypes", "float32,,bf16"], "empty name"),
    (["--out", "cpu.txt"], "must end in .json"),
    (["--out", "no/such/folder/cpu.json"], "does not exist"),
    (["--copy-bytes", "lots"], "bad size 'lots' in --copy-bytes"),
    (["--seconds", "-1"], "--seconds must be more than 0"),
])
def test_bad_options_exit_2(capsys, argv, fragment):
    code = main(["calibrate", "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("graphcost: error: ") and err.count("\n") == 1, err
    assert fragment in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_a_user_error(capsys):
    assert main(["calibrate", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
