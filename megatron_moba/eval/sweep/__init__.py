"""Scaling sweeps: one description -> MoBA and full-attention training runs per model size, their
positional-loss evaluation, and one table of loss against training compute.

    from megatron_moba.eval import sweep
    desc = sweep.load_description("examples/sweeps/cpu-tiny.yaml")
    runs = sweep.plan_runs(desc, "runs/sweeps/cpu-tiny")        # one Run per (model size, variant)
    print(sweep.launch_command(runs[0], desc))                 # python -m megatron_moba.pretrain ...

Compute is C = 6·N·D FLOPs (N non-embedding parameters, D training tokens) in PFLOP/s-days
(8.64e19 FLOPs).  ``tools/scaling_sweep.py`` is the command line and documents the description.

One module per step: ``spec`` (the description's schema and validation), ``plan`` (runs, their
flags, N and D), ``data`` (the stdlib corpus datasets), ``launch`` (commands, Slurm script, local
training), ``results`` (evaluation, table, fits).  Importing the package does not import torch.
"""
from megatron_moba.eval.sweep.data import prepare_data
from megatron_moba.eval.sweep.launch import launch_command, slurm_script, train_locally
from megatron_moba.eval.sweep.plan import PFLOPS_DAY, Run, data_paths, non_embedding_params, plan_runs
from megatron_moba.eval.sweep.results import (
    TABLE_FIELDS,
    compare_pairs,
    evaluate_runs,
    job_compute,
    publish,
    summarize,
    table_rows,
    write_table,
)
from megatron_moba.eval.sweep.spec import MODEL_KEYS, SCHEMA, load_description, validate

__all__ = ["MODEL_KEYS", "PFLOPS_DAY", "Run", "SCHEMA", "TABLE_FIELDS", "compare_pairs", "data_paths",
           "evaluate_runs", "job_compute", "launch_command", "load_description", "non_embedding_params", "plan_runs",
           "prepare_data", "publish", "slurm_script", "summarize", "table_rows", "train_locally", "validate",
           "write_table"]
