"""The Python examples in the docs run as written (their asserts check against PyTorch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


@pytest.mark.parametrize("doc", ["docs/rules.md", "docs/graph.md", "docs/checkpoint.md",
                                 "README.md"])
def test_python_examples_run(doc):
    from graphcost.rules import REGISTRY

    code = python_blocks(ROOT / doc)
    assert code.strip()
    rules = dict(REGISTRY._rules)  # an example may register a rule: leave the table as it was
    try:
        exec(compile(code, doc, "exec"), {"__name__": f"docs_{Path(doc).stem}"})
    finally:
        REGISTRY._rules = rules


def test_ci_runs_the_readme_test_command():
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2
    assert all(c.count("pip install torch==2.13.0 &&") == 1 for c in commands)
    assert commands[0].endswith("graphcost analyze llama-7b --batch 1 --seq 2048")
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
