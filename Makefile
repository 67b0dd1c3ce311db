# megatron-moba: `make help` lists the targets. Every target creates/reuses .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install demo demo-op test bench lint docker clean

help:  ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)  ## create .venv and install the project (editable) with test tools

demo: $(STAMP)  ## pretrain a tiny MoBA GPT and a full-attention twin on CPU (runs/demo/)
	PYTHON=$(BIN)/python bash examples/pretrain_tiny_cpu.sh

demo-op: $(STAMP)  ## a tour of the MoBA attention op
	$(BIN)/python examples/moba_op_demo.py

test: $(STAMP)  ## run the test suite (fails if no test runs)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)  ## attention benchmark on this machine (table + JSON in benchmarks/results/)
	$(BIN)/python tools/bench_attention.py --out benchmarks/results/bench_attention_$$(uname -n | tr -c 'a-zA-Z0-9\n' _).json

lint: $(STAMP)  ## bash -n and shellcheck on the launch scripts, byte-compile the Python
	for f in examples/*.sh examples/slurm/*.sbatch benchmarks/*.sh .ci/run; do bash -n "$$f" || exit 1; done
	shellcheck -x examples/*.sh examples/slurm/*.sbatch benchmarks/*.sh .ci/run
	$(BIN)/python -m compileall -q kernels megatron_moba tools examples tests

docker:  ## build the image on NVIDIA's PyTorch container (needs a Docker engine)
	docker build -f docker/Dockerfile -t megatron-moba:latest .

clean:  ## remove .venv and caches
	rm -rf $(VENV) build *.egg-info kernels/*.egg-info .pytest_cache runs
	find . -name __pycache__ -prune -exec rm -rf {} +
