"""Run every benchmark: ``python -m benchmarks [--device cuda] [--quick] [--only NAME]
[--out DIR]`` (``bench_e2e`` also takes ``--e2e-episodes N --e2e-queries Q``).

Prints each Markdown table and writes it to ``DIR/<name>-<device>.md`` (``DIR``:
``benchmarks/results/`` unless ``--out`` names another).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from benchmarks import device_name

BENCHMARKS = ["bench_explainers", "bench_metrics", "bench_e2e", "bench_content_hash"]
RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--only", choices=BENCHMARKS, action="append", help="run only these benchmarks"
    )
    parser.add_argument(
        "--e2e-episodes", type=int, help="bench_e2e: episodes of the miniImageNet-protocol run"
    )
    parser.add_argument(
        "--e2e-queries", type=int, help="bench_e2e: queries per class of that run (protocol: 15)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the tables")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"device: {device_name(args.device)}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        table = f"## {name}\n\n{header}\n\n{module.main(args)}\n"
        print(table, flush=True)
        suffix = "-quick" if args.quick else ""
        (args.out / f"{name}-{args.device}{suffix}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
