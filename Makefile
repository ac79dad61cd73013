# The README's commands. Every target installs into .venv first, through the
# exact versions of constraints.txt (torch first: a bare `torch` requirement
# would pull a multi-gigabyte CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help install reproduce test lab clean

help:
	@echo "make reproduce   train the DMoE and baselines, print Table 1, write results/"
	@echo "make test        run the whole test suite"
	@echo "make lab         start JupyterLab on notebooks/"
	@echo "make install     only create .venv and install (done by the others)"
	@echo "Pass options to reproduce with ARGS, e.g. make reproduce ARGS='--seeds 0,1'"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e ".[dev,lab]"
	touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/dmoe-edu reproduce $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# Root (as in containers) must say so explicitly to Jupyter.
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=$(if $(wildcard notebooks),notebooks,.) \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
