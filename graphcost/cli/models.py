"""`graphcost models`: the zoo's names, accepted as MODEL."""

from __future__ import annotations

import argparse
import json

from graphcost.cli.options import Parents
from graphcost.models import list_models


def add_parser(verbs, parents: Parents) -> None:
    m = verbs.add_parser("models", help="list zoo model names", parents=[parents.json],
                         description="Names accepted as MODEL, besides path/to/file.py:factory.")
    m.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"models": list_models()}))
    else:
        print("\n".join(list_models()))
    return 0
