# Two entry points, each installing what it needs into .venv first:
#   make demo   Selective-DPO on the bundled model and data (CPU; 3 min 17 s on 2 cores, first use included)
#   make test   the test suite
#   make docs   the documentation site, served at http://127.0.0.1:8000 (the tests build it with --strict)
# torch is installed on its own, first, so that no other requirement pulls a multi-GB CUDA build;
# on another machine pick its wheel index, e.g. `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.selective-po-installed
# bitsandbytes (4- and 8-bit loading, which runs on CPUs too) for the quantization tests only. It goes to a folder
# of its own that only the pytest process puts on its path: peft imports it wherever it is installed, which costs
# every process the suite starts about 1.3 s here.
EXTRAS := $(VENV)/extras
BITSANDBYTES ?= bitsandbytes==0.50.2

.PHONY: demo test docs install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(EXTRAS) "$(BITSANDBYTES)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selective-po demo

test: $(STAMP)
	$(BIN)/python -m pytest

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve
