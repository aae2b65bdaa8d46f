# Every target installs what it needs first, so each works alone on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench gpu-wheels lint leaderboard reproduce clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) run.py $(ARGS)

# One torch thread per xdist worker: small tensor ops thrash with more on few cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

# The wheels a GPU machine without registry access lacks (CPython 3.12 manylinux x86-64),
# into the ignored .whl/ for benchmarks/gpu_check.sh; idempotent. Needs pip and PyPI only.
gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

leaderboard: $(STAMP)
	@test -n "$(RUNS)" || { echo 'usage: make leaderboard RUNS="outputs/... multirun/..." [ARGS="--out DIR --reference fam"]'; exit 2; }
	$(PY) -m evaluation.reporting $(RUNS) $(ARGS)

reproduce: $(STAMP)
	@test -n "$(DATA)" || { echo 'usage: make reproduce DATA=/path/to/datasets [ARGS="--out DIR trainer.max_steps=..."]'; exit 2; }
	$(PY) -m experiments.reproduce --data-root "$(DATA)" $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .cache
