"""Benchmarks of v2k, run on demand (`python -m bench`, `make bench`).

Results are in docs/benchmarks.md.

Not tests: they measure, print one summary line per figure with its target, and exit 0
unless `--strict` is given and a target is missed.
"""
