"""The optional extras (pyproject.toml): scipy (`optimize`) for the checkpoint optimizer,
matplotlib (`plot`) for --plot. Without one, the command that needs it exits 2 with one line
saying what to pip install; everything else, the Quickstart's full report first, runs without
either."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.helpers import assert_user_error, run_cli

SMALL = ["--set", "n_layer=2", "--seq", "64"]
EXTRAS = {"scipy": "optimize", "matplotlib": "plot"}


@pytest.fixture
def hide(monkeypatch):
    """hide(name): `import name` (and of any of its submodules) fails until the test ends."""

    def hide(name: str) -> None:
        for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)

    return hide


def test_the_checkpoint_optimizer_without_scipy_says_what_to_install(capsys, hide):
    hide("scipy")
    argv = ["checkpoint", "gpt2", *SMALL, "--budget", "1GiB"]
    assert_user_error(capsys, argv, "pip install 'graphcost[optimize]' (or pip install scipy)")
    _, _, err = run_cli(capsys, *argv)
    assert len(err.strip().splitlines()) == 1
    assert "the checkpoint optimizer" in err


@pytest.mark.parametrize("verb", [["memory"], ["checkpoint"]])
def test_plot_without_matplotlib_says_what_to_install(capsys, hide, tmp_path, verb):
    hide("matplotlib")
    argv = [*verb, "gpt2", *SMALL, "--plot", str(tmp_path / "plot.png")]
    assert_user_error(capsys, argv, "pip install 'graphcost[plot]' (or pip install matplotlib)")
    _, _, err = run_cli(capsys, *argv)
    assert len(err.strip().splitlines()) == 1
    assert "--plot" in err
    assert not (tmp_path / "plot.png").exists()


def test_the_full_report_needs_neither(capsys, hide):
    """The Quickstart's first command installs no extra; `analyze` prints its whole report."""
    for name in EXTRAS:
        hide(name)
    code, out, err = run_cli(capsys, "analyze", "gpt2", "--set", "n_layer=1", "--seq", "16")
    assert code == 0 and "error" not in err
    assert "parameters" in out and "per module" in out


def test_importing_graphcost_imports_no_extra():
    """Only the code that needs an extra imports it (a fresh interpreter: nothing cached)."""
    code = ("import sys, graphcost, graphcost.cli.main, graphcost.report.plot, "
            "graphcost.passes.checkpoint.search, graphcost.models; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(EXTRAS)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pyproject_keeps_them_optional():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert module not in required
        assert any(d.startswith(module) for d in extras[extra])
        assert any(d.startswith(module) for d in extras["test"])  # .ci/run tests both
