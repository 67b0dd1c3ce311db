# megatron-moba: `make help` lists the targets. Every target creates/reuses .venv itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The tested versions (setup.py itself declares ranges); `make install CONSTRAINTS=` drops them.
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=
# make test-fast: the op (reference/torch/triton backends, gate, argument checks, layout cache), the
# megatron layer in one process (MoBA vs full attention, hybrid layers, packed THD), config and flag
# checks, and the packaging; no multi-process parallelism, training, tool or launch-script tests.
MEGATRON_ONE_PROCESS := $(addprefix tests/core/test_megatron_gpt.py::test_,moba_covering_all_blocks_equals_full_attention_gpt \
    hybrid_layers_really_run_full_attention packed_thd_equals_documents_one_by_one bad_config_names_the_flag \
    seq_length_must_divide_by_twice_cp context_parallel_rejects_sequences_it_cannot_split \
    spec_choice_without_transformer_engine)
FAST_TESTS := tests/kernels/test_reference.py tests/kernels/test_torch_backend.py tests/kernels/test_triton_backend.py tests/kernels/test_errors.py \
    tests/kernels/test_host_cache.py tests/test_packaging.py tests/test_import_rules.py $(MEGATRON_ONE_PROCESS) \
    tests/training/test_training.py::test_cli_rejects_contradictions tests/training/test_launch.py::test_single_node_command_parses_with_the_trainer \
    $(addprefix tests/training/test_job_ux.py::test_,help_parses_before_importing_torch_or_megatron \
      new_flags_reject_contradictions_naming_the_flag new_flags_resolve_like_megatron_lm)
# (test_triton_backend.py's megatron GPT under context parallelism spawns 2 processes: full tier only)
FAST_DESELECT := not under_context_parallel

.PHONY: help install demo demo-op test test-fast test-mcore-latest test-mcore-latest-all test-mcore-018 test-mcore-017 scaling-cpu-long scaling-cpu bench lint \
    docker clean

help:  ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $@

install: $(STAMP)  ## create .venv and install the project (editable) with test tools

demo: $(STAMP)  ## pretrain a tiny MoBA GPT and a full-attention twin on CPU (runs/demo/)
	PYTHON=$(BIN)/python bash examples/pretrain_tiny_cpu.sh

demo-op: $(STAMP)  ## a tour of the MoBA attention op
	$(BIN)/python examples/moba_op_demo.py

test: $(STAMP)  ## run the test suite (fails if no test runs)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)  ## quick tier: kernels, gate, one-process megatron layers, argument checks (~3 min)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) -m 'not slow' -k '$(FAST_DESELECT)' $(FAST_TESTS)

# make test-mcore-latest: the tests that run megatron-core's own code paths (models at TP/SP/CP/PP, schedules,
# DDP/optimizer, dist_checkpointing, datasets, HF import/export, the job's logging, and HybridModel:
# test_hybrid_*.py, which skip on 0.16.1) against the newest supported release, 0.19.x, in .venv-mcore-latest
# (built/reused by .ci/mcore_latest_venv.sh: the cp312 wheel's Python code, helpers_cpp rebuilt for 3.11).
# MCORE_TOOL_TESTS (the evaluation tools, the other HF families, the data checks) reach megatron-core only
# through those same paths; they run against 0.16.1 in `make test`, and against 0.19.x with
# `make test-mcore-latest-all` (not in CI: about 10 more minutes).
MCORE_TESTS := tests/training/test_compat.py tests/core/test_megatron_gpt.py tests/training/test_megatron_optimizer.py tests/training/test_training.py \
    tests/hf/test_hf_convert.py tests/training/test_preprocess.py tests/training/test_checkpoint_safety.py tests/training/test_job_ux.py \
    tests/core/test_hybrid_model.py tests/training/test_hybrid_job.py
MCORE_TOOL_TESTS := tests/hf/test_hf_families.py tests/eval/test_positional_loss.py tests/eval/test_needle.py \
    tests/eval/test_block_selection.py tests/training/test_data_checks.py
test-mcore-latest:  ## the tests of megatron-core's code paths against megatron-core 0.19.x (own venv: .venv-mcore-latest)
	PYTHON=$(PYTHON) bash .ci/mcore_latest_venv.sh
	.venv-mcore-latest/bin/python -m pytest -q $(PYTEST_ARGS) $(MCORE_TESTS)

test-mcore-latest-all:  ## test-mcore-latest plus the evaluation-tool, HF-family and data-check tests (0.19.x)
	PYTHON=$(PYTHON) bash .ci/mcore_latest_venv.sh
	.venv-mcore-latest/bin/python -m pytest -q $(PYTEST_ARGS) $(MCORE_TESTS) $(MCORE_TOOL_TESTS)

# make test-mcore-018 / test-mcore-017: a subset of MCORE_TESTS against the newest 0.18 and 0.17 releases, each in
# its own venv built like .venv-mcore-latest: the CPU shims; GPT at TP x CP, PP, TP + SP and packed THD under CP;
# megatron's DDP and distributed optimizer (DP=2 overlapped, TP=2) and bf16 weights with fp32 main weights resumed;
# dist_checkpointing resume, also at TP=2; GPTDataset over indexed data (helpers_cpp); HF import at TP=2, export.
MCORE_SUBSET_TESTS := tests/training/test_compat.py \
    $(addprefix tests/core/test_megatron_gpt.py::test_,tensor_and_context_parallel_2x2_match_single_process \
      pipeline_parallel_2_matches_single_process packed_thd_under_context_parallel_matches_single_process \
      tensor_and_sequence_parallel_2_matches_single_process) \
    'tests/training/test_megatron_optimizer.py::test_megatron_optimizer_trains_like_torch_adamw[layout1-extra1]' \
    'tests/training/test_megatron_optimizer.py::test_megatron_optimizer_trains_like_torch_adamw[layout3-extra3]' \
    tests/training/test_megatron_optimizer.py::test_bf16_weights_with_fp32_main_weights_resume_exactly \
    tests/training/test_training.py::test_resume_is_exact \
    'tests/training/test_training.py::test_resume_at_another_layout_reproduces_single_process[layout0]' \
    tests/training/test_training.py::test_training_on_indexed_stdlib_data_reduces_loss \
    'tests/hf/test_hf_convert.py::test_imported_checkpoint_gives_hf_logits[untied-2]' \
    'tests/hf/test_hf_convert.py::test_export_round_trip_is_exact[untied]'
MCORE_018 ?= 0.18.2
MCORE_017 ?= 0.17.1
# $(call mcore_subset,RELEASE,VENV): build/reuse VENV with megatron-core RELEASE, run MCORE_SUBSET_TESTS there
define mcore_subset
MCORE_LATEST_VERSION=$(1) MCORE_LATEST_VENV=$(2) PYTHON=$(PYTHON) bash .ci/mcore_latest_venv.sh
$(2)/bin/python -m pytest -q $(PYTEST_ARGS) $(MCORE_SUBSET_TESTS)
endef

test-mcore-018:  ## a subset of the megatron tests against megatron-core 0.18.2 (own venv: .venv-mcore-018)
	$(call mcore_subset,$(MCORE_018),.venv-mcore-018)

test-mcore-017:  ## the same subset against megatron-core 0.17.1 (own venv: .venv-mcore-017)
	$(call mcore_subset,$(MCORE_017),.venv-mcore-017)

scaling-cpu-long: $(STAMP)  ## the README's headline study: positional loss at 16K, learning curves (about 4.5 h on 2 cores; resumes)
	$(BIN)/python tools/scaling_sweep.py --preset cpu-long --out runs/sweeps/cpu-long \
	    --publish benchmarks/results/scaling_cpu_long

scaling-cpu: $(STAMP)  ## the README's CPU scaling study, then its long-context run (about 1.5 h on 2 cores; resumes)
	$(BIN)/python tools/scaling_sweep.py --preset cpu-small --out runs/sweeps/cpu-small \
	    --publish benchmarks/results/scaling_cpu_small
	$(BIN)/python examples/continued_pretraining_cpu.py --sweep runs/sweeps/cpu-small --out runs/long_context_cpu \
	    --publish benchmarks/results/long_context_cpu

bench: $(STAMP)  ## attention benchmark on this machine (table + JSON in benchmarks/results/)
	$(BIN)/python tools/bench_attention.py --out benchmarks/results/bench_attention_$$(uname -n | tr -c 'a-zA-Z0-9\n' _).json

lint: $(STAMP)  ## ruff (pyproject.toml's rules) on the Python; bash -n and shellcheck on the launch scripts
	for f in examples/*.sh examples/slurm/*.sbatch benchmarks/*.sh .ci/run .ci/*.sh; do bash -n "$$f" || exit 1; done
	shellcheck -x examples/*.sh examples/slurm/*.sbatch benchmarks/*.sh .ci/run .ci/*.sh
	$(BIN)/ruff check kernels megatron_moba tools examples tests benchmarks setup.py

docker:  ## build the image on NVIDIA's PyTorch container (needs a Docker engine)
	docker build -f docker/Dockerfile -t megatron-moba:latest .

clean:  ## remove .venv, the .venv-mcore-* venvs and caches
	rm -rf $(VENV) .venv-mcore-latest .venv-mcore-018 .venv-mcore-017 build *.egg-info kernels/*.egg-info .pytest_cache runs
	find . -name __pycache__ -prune -exec rm -rf {} +
