#!/usr/bin/env python
"""Scaling sweep: MoBA and full-attention training runs per model size, positional loss, one table, fits.

    python tools/scaling_sweep.py --preset cpu-tiny --out runs/sweeps/cpu-tiny     # end to end on CPU
    python tools/scaling_sweep.py --preset cpu-long --out runs/sweeps/cpu-long \
        --publish benchmarks/results/scaling_cpu_long                              # the README's headline
    python tools/scaling_sweep.py --preset cpu-small --out runs/sweeps/cpu-small \
        --publish benchmarks/results/scaling_cpu_small                             # the 2K-context study
    python tools/scaling_sweep.py examples/sweeps/gpu-small.yaml --print          # the commands only
    python tools/scaling_sweep.py my_sweep.yaml --slurm sweep.sbatch              # a Slurm array script

Steps: data (built for `stdlib_corpus`), training of every (model, variant) run through
`python -m megatron_moba.pretrain` (or torchrun with --nproc-per-node > 1; runs whose final
checkpoint exists are skipped, so a sweep resumes where it stopped), the positional loss of each
final checkpoint (megatron_moba.eval.positional_loss), then OUT/table.csv (variant, bucket,
compute_pflops_days, loss, model, non_embedding_params, train_tokens, layers, hidden, ...: the
input of tools/fit_scaling.py), OUT/positional_loss.png, OUT/positional.png (the largest
MoBA/full pair), the fits against 6ND (OUT/fits.json, OUT/scaling.png/.pdf) and against the FLOPs
the job counts, attention included (OUT/fits_job_flops.json, OUT/scaling_job_flops.png), and
OUT/comparison.json (the MoBA/full loss ratio at the largest compute, fitted and measured, with
95% intervals).  Compute C = 6·N·D (N non-embedding parameters, D training tokens) in
PFLOP/s-days (8.64e19 FLOPs).  After `--slurm`, submit the script; once its tasks are done run the
same command without --slurm to evaluate, tabulate and fit.

The description (YAML or JSON; examples/sweeps/*.yaml):
  name, out                       sweep name, default output directory
  models: [{layers, hidden, heads, [name, query_groups, ffn_hidden, tokens | train_iters, lr]}]
  variants: [moba, full, hybrid]  seq_length, global_batch, micro_batch (hybrid: the moba run continued with full
                                  attention from hybrid.switch of its iterations, the MoBA paper's recipe)
  tokens | train_iters            per model (D = train_iters x global_batch x seq_length)
  tokens_per_param                or D = this ratio x N for every model (rounded up to whole iterations)
  lr, min_lr (lr/10), warmup_iters (iters/10), seed
  moba: {chunk, topk, full_attn_layers}
  data: {stdlib_corpus: {max_bytes, vocab_size, eval_every, include_tests, eval_min_bytes}}   the stdlib's
        sources, no download; every eval_every-th file (of eval_min_bytes or more) held out for evaluation
      | {train: PREFIX, eval: PREFIX, tokenizer_type, tokenizer_model, vocab_size, split}
      | {mock: true, vocab_size, eval: PREFIX}
  eval: {bucket_width, trailing_tokens, num_docs, micro_batch, min_tokens: documents shorter are not evaluated}
  curve: {points: [fractions of the iterations]}   learning curves: checkpoints saved and evaluated there;
        OUT/curves.csv, curve_fits.json, curves_BUCKET.png (x: 6ND, the job's FLOPs, training time), ratios.json
  hybrid: {switch: fraction of the iterations with MoBA (0.9), models: [names; default all]}
  fit: {buckets: [names to fit; default all], ratio_at: PFLOP/s-days, panels: [buckets drawn; default the
        first and the trailing], extend_decades: projections past the largest run (1)}
  extra_args: [more pretraining flags, e.g. --bf16 --swiglu]
  launch: {nproc_per_node, env: {VAR: value}}
  slurm: {partition, account, time, gpus_per_task, cpus_per_task, extra}
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from megatron_moba.eval import sweep  # no torch: the evaluation imports it when the runs are trained
from megatron_moba.training.logs import quiet_absent_backend_warnings

quiet_absent_backend_warnings()

PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "sweeps")


def main(argv=None) -> int:
    presets = sorted(f[:-5] for f in os.listdir(PRESETS) if f.endswith(".yaml")) if os.path.isdir(PRESETS) else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("description", nargs="?", help="sweep description (YAML or JSON)")
    p.add_argument("--preset", choices=presets, help="a description from examples/sweeps/")
    p.add_argument("--out", default=None, help="output directory (default: the description's out, or runs/sweeps/NAME)")
    p.add_argument("--print", action="store_true", help="print the training commands and stop")
    p.add_argument("--slurm", metavar="FILE",
                   help="build the data, write a Slurm array script (one task per run), stop")
    p.add_argument("--nproc-per-node", type=int, default=None, help="launch training with torchrun on N processes")
    p.add_argument("--publish", metavar="DIR", help="at the end, copy the table, fits, figures, every run's metrics "
                   "and a summary.json (settings, data, wall times, commits, versions) to DIR, "
                   "e.g. benchmarks/results/scaling_cpu_small")
    args = p.parse_args(argv)
    if bool(args.description) == bool(args.preset):
        p.error("give a description file or --preset NAME (one of them)")
    path = args.description or os.path.join(PRESETS, args.preset + ".yaml")
    t0 = time.time()
    try:
        desc = sweep.load_description(path)
        if args.nproc_per_node:
            desc["launch"]["nproc_per_node"] = args.nproc_per_node
        out = args.out or desc["out"] or os.path.join("runs", "sweeps", desc["name"])
        runs = sweep.plan_runs(desc, out)
        print(f"sweep {desc['name']!r}: {len(runs)} runs, sequence {desc['seq_length']}, output {out}")
        for r in runs:
            print(f"  {r.name:>16}: N {r.params:>12,}  D {r.tokens:>14,}  C {r.compute_pflops_days:.3e} PFLOP/s-days  "
                  f"({r.train_iters} iterations)")
        if args.print:
            if desc["data"]["stdlib_corpus"] is not None:
                print(f"# data: built under {os.path.abspath(out)}/data by the first local or --slurm run")
            env = "".join(f"{k}={shlex.quote(v)} " for k, v in desc["launch"]["env"].items())
            for r in runs:
                print(env + shlex.join(sweep.launch_command(r, desc)))
            return 0
        sweep.prepare_data(desc, out)
        if args.slurm:
            os.makedirs(os.path.join(out, "slurm"), exist_ok=True)       # for the tasks' --output files
            with open(args.slurm, "w") as f:
                f.write(sweep.slurm_script(runs, desc, out, path, os.path.dirname(sys.executable)))
            print(f"wrote {args.slurm}: sbatch it, then run this command again without --slurm to evaluate and fit")
            return 0
        sweep.train_locally(runs, desc, sys.executable)
        from megatron_moba.training.compat import apply_patches
        apply_patches("torch")          # the evaluation, without CUDA: megatron-core's CPU shim
        if desc["curve"]["points"]:
            from megatron_moba.eval.sweep.curves import summarize_curves
            summarize_curves(runs, desc, out)
        sweep.summarize(runs, desc, out)
        if args.publish:
            sweep.publish(runs, desc, out, args.publish)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep {desc['name']!r} finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
