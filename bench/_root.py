"""The repository root on sys.path, so that `python bench/NAME.py` (which puts bench/ there
instead) finds validation/, the ground-truth tools that live in the repository and are not
installed. A bench script that imports validation imports this first."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
