"""Benchmarks of v2k, run on demand (`python -m bench`, `make bench`).

Results are in docs/benchmarks.md.

Not tests: they measure, print one summary line per figure with its target, and exit 0
unless `--strict` is given and a target is missed.
"""

from __future__ import annotations

import argparse
import json
from types import ModuleType
from typing import Any


def finish(args: argparse.Namespace, result: Any, report: str) -> int:
    """Print a benchmark's report, write its JSON (`--json`); the exit status (`--strict`)."""
    print(report, flush=True)
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 1 if args.strict and not result.passed else 0


def main(module: ModuleType, prog: str, argv: list[str] | None = None) -> int:
    """One benchmark on its own (`python -m bench.NAME`): its options, then its run."""
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__.split("\n")[0])
    module.add_arguments(parser)
    return module.run_from_args(parser.parse_args(argv))
