# megatron-moba: `make help` lists the targets. Every target creates/reuses .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install demo demo-op test bench clean

help:  ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)  ## create .venv and install the project (editable) with test tools

demo: $(STAMP)  ## pretrain a tiny MoBA GPT and a full-attention twin on CPU (runs/demo/)
	$(BIN)/python examples/demo_pretrain.py --out runs/demo

demo-op: $(STAMP)  ## a tour of the MoBA attention op
	$(BIN)/python examples/moba_op_demo.py

test: $(STAMP)  ## run the test suite (fails if no test runs)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)  ## attention benchmark on this machine (table + JSON in benchmarks/results/)
	$(BIN)/python tools/bench_attention.py --out benchmarks/results/bench_attention_$$(uname -n | tr -c 'a-zA-Z0-9\n' _).json

clean:  ## remove .venv and caches
	rm -rf $(VENV) build *.egg-info kernels/*.egg-info .pytest_cache runs
	find . -name __pycache__ -prune -exec rm -rf {} +
