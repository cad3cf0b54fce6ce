# v2k: `make demo` runs a real migration in the test bed, `make test` runs the tests.
# Both run `make setup` first, which installs what is missing and is safe to repeat.
PY := .venv/bin/python

.PHONY: setup demo test test-fast lint bench serve clean

setup:
	bash testbed/setup.sh

demo: setup
	$(PY) -m testbed demo

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench: setup
	$(PY) -m bench

# A local Prefect server with the blocks, deployments and a worker, and a test bed to
# migrate from: prints the UI address, Ctrl-C stops it all.
serve: setup
	.venv/bin/v2k serve --testbed

clean:
	-$(PY) -m testbed down
	rm -rf .venv .pytest_cache .ruff_cache
