"""A non-editable install works, not only the editable one the checkout uses (about 30 s).

Builds the wheel (`pip wheel --no-deps --no-build-isolation`, from a copy of the sources so no
build/ folder is left in the checkout), checks what it holds (every module of graphcost and of
the zoo in models/ as graphcost.models, py.typed, no validation/, tests/ or bench/), installs
it into a fresh venv that borrows this environment's packages (torch is not installed again),
and from a folder outside the checkout imports graphcost.models and runs `graphcost models` and
a one-layer `graphcost analyze gpt2 ... --json` with that venv's interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

from graphcost.version import __version__

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "graphcost", "models", "validation"]  # validation: to see it left out

pytestmark = pytest.mark.packaging


def _run(argv: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the package's sources."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", out, src], cwd=out)
    (found,) = out.glob("graphcost-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no pip of its own: this environment's pip installs
    into it); a .pth file lends it this environment's site-packages (torch, networkx), after
    its own, and without running their .pth files (so no editable graphcost)."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False, system_site_packages=True)
    python = env / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=env).stdout.strip()
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(purelib) / "_borrowed.pth").write_text("".join(f"{p}\n" for p in borrowed))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "-q", wheel], cwd=env)
    return python


def test_the_wheel_holds_the_package_and_the_zoo_not_the_validation_tools(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = {n for n in names if n.endswith(".py")}
    expected = {f"graphcost/{p.relative_to(ROOT / 'graphcost').as_posix()}"
                for p in (ROOT / "graphcost").rglob("*.py")}
    expected |= {f"graphcost/models/{p.name}" for p in (ROOT / "models").glob("*.py")}
    assert modules == expected
    assert "graphcost/py.typed" in names
    assert not [n for n in names if n.split("/")[0] in ("validation", "tests", "bench", "models")]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.replace(".", "/") + "/__init__.py" for p in packages} <= modules
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert f"\nVersion: {__version__}\n" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_the_installed_package_runs_outside_the_checkout(installed, tmp_path, capsys):
    where = _run([installed, "-c", "import importlib.util, graphcost, graphcost.models; "
                  "print(graphcost.__file__); print(graphcost.models.__file__); "
                  "print(importlib.util.find_spec('validation')); print(graphcost.__version__)"],
                 cwd=tmp_path).stdout.split()
    package_file, models_file, validation, version = where
    assert ROOT not in Path(package_file).parents and ROOT not in Path(models_file).parents
    assert Path(models_file).parent.parent == Path(package_file).parent  # graphcost/models/
    assert validation == "None"
    assert version == __version__

    cli = installed.parent / "graphcost"
    listed = _run([cli, "models"], cwd=tmp_path).stdout
    assert "gpt2" in listed and "llama-7b" in listed
    argv = ["analyze", "gpt2", "--set", "n_layer=1", "--seq", "16", "--json"]
    result = json.loads(_run([cli, *argv], cwd=tmp_path).stdout)
    assert result["model"] == "gpt2" and result["unsupported_ops"] == {}
    from graphcost.cli.main import main  # the checkout's figures, the same by construction

    assert main(argv) == 0
    here = json.loads(capsys.readouterr().out)
    keys = ("params", "forward_flops", "backward_flops", "saved_activation_bytes")
    assert {k: result[k] for k in keys} == {k: here[k] for k in keys}
