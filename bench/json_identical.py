"""The `--json` of every verb on the zoo, recorded and compared: a refactor must not change a figure.

    python bench/json_identical.py record before.json   # on the old code
    python bench/json_identical.py record after.json    # on the new code
    python bench/json_identical.py compare before.json after.json

`record` runs each command below as `python -m graphcost ... --json` (a fresh process each, two at
a time) and keeps its parsed output with its exit status (and a failure's message). Two things are
made comparable between checkouts: wall-clock timings of graphcost itself (`TIMING_KEYS`) are
dropped, and the checkout's own path in the ops' `source` lines is written as `<checkout>/`, with
the zoo's old folder `graphcost/models/` as its new one, `models/` (`MOVED`). `compare` prints
every command whose output differs, key by key, and exits 1 if any does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

# Wall-clock seconds graphcost spent, not figures it computed.
TIMING_KEYS = {"search_seconds", "total_seconds", "elapsed_s"}
# Files that moved between layouts: the same source line under its old and its new path.
MOVED = {"<checkout>/graphcost/models/": "<checkout>/models/"}

COMMANDS = [
    "analyze gpt2",
    "analyze llama-7b --batch 1 --seq 2048",
    "analyze llama3-8b --dtype bf16 --device h100-sxm --seq 8192 --depth 1 --top 5",
    "analyze mixtral-8x7b --seq 1024",
    "analyze resnet-cnn --batch 8",
    "analyze cs336-gpt2-xl --seq 256",
    "analyze gpt2 --no-targets --set n_layer=2",
    "memory gpt2",
    "memory gpt2 --batch 4 --checkpoint full",
    "memory llama-7b --precision bf16 --device h100-sxm",
    "memory llama-7b --precision bf16 --device h100-sxm --inference --batch 4",
    "memory resnet-cnn --batch 16 --optimizer sgd",
    "memory llama3-70b --precision bf16 --seq 8192 --device h100-sxm --gpus 64 --tp 8 --pp 4 --fsdp --checkpoint full",
    "checkpoint gpt2 --batch 4",
    "checkpoint llama-7b --precision bf16 --budget 40GiB",
    "checkpoint gpt2-xl --budget 30GiB --batch 8",
    "roofline llama-7b --device a100-80gb --precision bf16 --top 3",
    "roofline llama3-8b --device h100-sxm --precision bf16 --inference --batch 8 --seq 8192",
    "roofline gpt2 --device h100-sxm --precision bf16 --checkpoint full --compute-bound-batch",
    "fit gpt2 --device h100-sxm --precision bf16",
    "fit llama-7b --device a100-80gb --precision bf16",
    "fit llama-7b --device a100-80gb --precision bf16 --inference",
    "fit llama3-70b --device h100-sxm --precision bf16 --gpus 64 --tp 8 --pp 4 --fsdp",
    "plan llama3-70b --gpus 64 --device h100-sxm --seq 8192 --global-batch 1024 --precision bf16",
    "cost llama-7b --tokens 1.4e12 --device a100-80gb --gpus 2048 --usd-per-hour 2 --precision bf16",
    "sweep gpt2 --device h100-sxm --precision bf16 --batch 1,4 --seq 256,1024",
    "devices",
    "models",
]


def run(command: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "graphcost", *command.split(), "--json"],
                          capture_output=True, text=True)
    try:
        output = json.loads(proc.stdout)
    except json.JSONDecodeError:
        output = proc.stdout
    result = {"returncode": proc.returncode, "output": comparable(output, os.getcwd() + os.sep)}
    if proc.returncode:
        result["stderr"] = proc.stderr.strip().splitlines()[-1:]  # the one message
    return result


def comparable(value, checkout: str):
    if isinstance(value, dict):
        return {k: comparable(v, checkout) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [comparable(v, checkout) for v in value]
    if isinstance(value, str) and value.startswith(checkout):
        value = "<checkout>/" + value[len(checkout):]
        for old, new in MOVED.items():
            value = value.replace(old, new, 1) if value.startswith(old) else value
    return value


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in {'first' if k in a else 'second'}"
               for k in sorted(set(a) ^ set(b))]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{where}: {str(a)[:120]!r} != {str(b)[:120]!r}"]


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "record":
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(COMMANDS, pool.map(run, COMMANDS)))
        for command, result in results.items():
            status = "ok" if result["returncode"] == 0 else f"exit {result['returncode']}"
            print(f"{status:>7}  {command}")
        with open(argv[1], "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        with open(argv[1]) as f:
            before = json.load(f)
        with open(argv[2]) as f:
            after = json.load(f)
        differing = 0
        for command in COMMANDS:
            found = differences(before.get(command), after.get(command))
            differing += bool(found)
            print(f"{'differs' if found else 'same':>7}  {command}")
            for line in found[:10]:
                print(f"           {line}")
        print(f"{len(COMMANDS) - differing} identical, {differing} differ")
        return 1 if differing else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
