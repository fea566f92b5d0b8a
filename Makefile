# dorat: two commands on a fresh machine, `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dorat-installed
TORCH  ?= torch==2.13.0

.PHONY: demo test notebook lint data install clean results bench slurm docs wheel-check

$(PY):
	python3 -m venv $(VENV)

# torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then the project.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[dev,all]'
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	PY=$(PY) bash scripts/ensure-data.sh fashion-mnist

# PGD-AT vs DONE on real Fashion-MNIST; finished runs are kept, so a second call only re-reports.
demo: data
	$(PY) -m dorat compare demo --out runs/demo --workers 2

# The multi-seed comparison behind docs/RESULTS.md: many hours on 2 CPU cores; resumable (run it
# again after a stop, on any clone: finished runs are committed under benchmarks/results/grid).
# WORKERS=N processes share it (default 2); OUT=dir to place the runs elsewhere.
results: data
	PY=$(PY) bash benchmarks/results/run.sh

# Training throughput of dorat's loop vs a textbook loop, side by side; rewrites the table in
# docs/PERFORMANCE.md (a few minutes on 2 cores; needs Fashion-MNIST).
bench: data
	$(PY) benchmarks/perf.py --json docs/perf.json --doc docs/PERFORMANCE.md

# One pytest-xdist worker a core (one thread each), a test file to one worker (its module-scoped
# training runs once); the 10 slowest tests at the end. The Slurm
# tests skip with a reason unless a cluster answers (`make slurm`; CI starts one).
test: data
	$(PY) -m pytest -q -n auto --dist loadfile --durations=10 -m "not notebook"

# examples/tutorial.ipynb executed in a real Jupyter kernel, its printed numbers checked (~3 min)
notebook: data
	$(PY) -m pytest -q -s -m notebook tests/test_notebook.py

# The documentation site (MkDocs, Material theme, mkdocstrings API reference) into site/; strict:
# a broken link, a link to a repository file that does not exist or a missing reference fails.
DOCSTAMP := $(VENV)/.dorat-docs-installed
$(DOCSTAMP): $(STAMP)
	$(PY) -m pip install -e '.[docs]'
	touch $(DOCSTAMP)

docs: $(DOCSTAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The wheel installs and runs alone: build, a fresh venv (CPU torch first), dorat from outside the
# checkout (scripts/wheel-check.sh; CI runs it).
wheel-check: $(STAMP)
	PY=$(PY) TORCH=$(TORCH) bash scripts/wheel-check.sh

# A single-node Slurm cluster on this machine for tests/test_slurm.py: installs Debian's slurm-wlm
# and munge, writes /etc/slurm/slurm.conf and starts munged, slurmctld and slurmd (needs root).
slurm:
	bash scripts/slurm-up.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts examples

clean:
	rm -rf runs .pytest_cache .ruff_cache
