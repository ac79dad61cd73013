# The README's commands. Every target installs into .venv first, through the
# exact versions of constraints.txt (torch first: a bare `torch` requirement
# would pull a multi-gigabyte CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help install reproduce test lab notebooks book clean

help:
	@echo "make reproduce   train the DMoE and baselines, print Table 1, write results/"
	@echo "make test        run the whole test suite"
	@echo "make lab         start JupyterLab on the course notebooks"
	@echo "make notebooks   re-execute every notebook's .ipynb from its .py source"
	@echo "make book        build the course as a static site in book/_build/html"
	@echo "make install     only create .venv and install (done by the others)"
	@echo "Pass options to reproduce with ARGS, e.g. make reproduce ARGS='--seeds 0,1'"

install: $(STAMP)

# constraints.txt pins versions that need Python 3.11 or newer. TORCH_INDEX, if
# set, is an extra index for torch, e.g. PyTorch's CPU-only wheel index.
TORCH_INDEX ?=
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "make: $(PYTHON) is Python $$($(PYTHON) -V 2>&1 | cut -d' ' -f2);" \
		"constraints.txt needs 3.11 or newer: make PYTHON=python3.11 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch
	$(PIP) -e ".[dev,lab,book]"
	touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/dmoe-edu reproduce $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# Write the assignments' student versions from their solutions, then re-run
# every notebook from its .py into its .ipynb (outputs, no widget state).
# One notebook: make notebooks ARGS=notebooks/03_collapse_and_balance.py
notebooks: $(STAMP)
	$(BIN)/python tools/make_assignments.py
	$(BIN)/python tools/execute_notebooks.py --jobs 2 $(ARGS)

# The static book: re-runs every notebook (a few minutes), warnings are errors.
book: $(STAMP)
	$(BIN)/python tools/build_book.py

# Root (as in containers) must say so explicitly to Jupyter.
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=$(if $(wildcard notebooks),notebooks,.) \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis book/_build book/course
