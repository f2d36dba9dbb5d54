"""The layout the code promises (docs/pipeline.md): packages along the data flow, no import cycle
(imports inside functions included), no private name imported from another module, no module far
over 500 lines, and the product apart from the validation tools."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 520  # "about 500": a module reads in one sitting


def _modules() -> dict[str, Path]:
    """Every module of the shipped package (graphcost.models lives in models/) and validation/."""
    found = {}
    for base, name in ((ROOT / "graphcost", "graphcost"), (ROOT / "models", "graphcost.models"),
                       (ROOT / "validation", "validation")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if base.name == "graphcost" and parts[:1] == ("models",):
                continue
            found[".".join((name, *parts))] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def _import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for module, path in MODULES.items():
        g.add_node(module)
        for target, names, _ in _imports(module, path):
            for name in names or [None]:
                full = f"{target}.{name}" if name else target
                dest = full if full in MODULES else target
                if dest in MODULES and dest != module:
                    g.add_edge(module, dest)
    return g


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_import_graph()))
    assert cycles == [], f"import cycles: {cycles[:5]}"


def test_no_private_name_crosses_a_module():
    crossing = [f"{MODULES[m].relative_to(ROOT)}:{line}: {name} from {target}"
                for m, path in MODULES.items() for target, names, line in _imports(m, path)
                if target.split(".")[0] in ("graphcost", "validation") and target != m
                for name in names if name.startswith("_") and not name.startswith("__")]
    assert crossing == []


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_the_product_does_not_import_validation():
    product = [m for m in MODULES if m.startswith("graphcost")]
    reached = {m for m in product for d in nx.descendants(_import_graph(), m)
               if d.startswith("validation")}
    assert reached == set()


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py" and m.startswith("graphcost")}
    assert set(config["packages"]) == packages
    assert config["package-dir"] == {"graphcost.models": "models"}


@pytest.mark.parametrize("folder", ["trace", "graph", "rules", "analysis", "passes", "report",
                                    "cli", "hardware", "load", "sizing"])
def test_the_pipeline_folders_exist(folder):
    assert (ROOT / "graphcost" / folder / "__init__.py").is_file()
