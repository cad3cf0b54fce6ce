"""`python -m bench` runs every benchmark; `python -m bench NAME [options]` one of them
(`export`, `inventory`, `orchestration`)."""

from __future__ import annotations

import argparse
import sys

from bench import export, inventory, orchestration

BENCHMARKS = {"export": export, "inventory": inventory, "orchestration": orchestration}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="v2k benchmarks; figures go to docs/benchmarks.md"
    )
    sub = parser.add_subparsers(dest="name")
    for name, module in BENCHMARKS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    if args.name:
        return BENCHMARKS[args.name].run_from_args(args)
    # Every benchmark with its default options.
    status = 0
    for name, module in BENCHMARKS.items():
        status |= module.run_from_args(sub.choices[name].parse_args([]))
    return status


if __name__ == "__main__":
    sys.exit(main())
