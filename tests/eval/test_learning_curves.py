"""Learning curves and the MoBA/full hybrid in a scaling sweep (``curve.points``, variant ``hybrid``),
end to end on a tiny description: the checkpoints saved at the curve's points, the hybrid continuing
the moba run's checkpoint with full attention, curves.csv's three x axes, the fits, the paired loss
ratios, the training-data context statistics, the figures and a rerun that redoes nothing.

MoBA's top-k here covers every block, which makes MoBA compute full attention: the hybrid's losses
after its switch must then equal the moba run's at the same iterations, which holds only if the
switch kept the optimizer state, the LR schedule and the data position.
"""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
PFLOPS_DAY = 8.64e19

DESC = dict(name="curves", models=[dict(layers=1, hidden=16, heads=2, train_iters=6),
                                   dict(layers=1, hidden=32, heads=2, train_iters=8)],
            variants=["moba", "full", "hybrid"], seq_length=512, global_batch=1, lr=2.5e-3,
            moba=dict(chunk=64, topk=8),            # 8 blocks of 64 in 512 tokens: every block, = full attention
            data=dict(stdlib_corpus=dict(max_bytes=1_500_000, vocab_size=512, eval_every=2, eval_min_bytes=12000)),
            eval=dict(bucket_width=128, trailing_tokens=128, num_docs=2, min_tokens=513),
            curve=dict(points=[0.25, 0.5]), hybrid=dict(switch=0.5),
            extra_args=["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear"],
            launch=dict(env=dict(OMP_NUM_THREADS="1")))


def _sweep(path, out, *more):
    return subprocess.run([sys.executable, "tools/scaling_sweep.py", str(path), "--out", str(out), *more],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def _metrics(out, run):
    with open(out / "runs" / run / "metrics.jsonl") as f:
        return {row["iteration"]: row for row in map(json.loads, f) if "loss" in row}


@pytest.mark.slow
def test_learning_curves_and_hybrid_end_to_end_then_resume(tmp_path):
    path, out = tmp_path / "curves.yaml", tmp_path / "sweep"
    path.write_text(yaml.safe_dump(DESC))
    r = _sweep(path, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # checkpoints at the curve's points (and the moba runs' at the hybrid's switch); the hybrid's own after it
    ckpts = {run: sorted(int(d[5:]) for d in os.listdir(out / "runs" / run / "ckpt") if d.startswith("iter_"))
             for run in os.listdir(out / "runs")}
    assert ckpts["L1-H16-moba"] == ckpts["L1-H16-full"] == [2, 3, 6]
    assert ckpts["L1-H32-moba"] == ckpts["L1-H32-full"] == [2, 4, 8]
    assert ckpts["L1-H16-hybrid"] == [3, 6] and ckpts["L1-H32-hybrid"] == [4, 8]
    log = open(out / "runs" / "L1-H32-hybrid" / "train.log").read()
    assert ("was trained with --attention moba --moba-chunk-size 64 --moba-topk 8; this run continues it with "
            "--attention full, keeping its weights, optimizer state, LR schedule, data position and random "
            "state") in log
    for size, switch, iters in (("L1-H16", 3, 6), ("L1-H32", 4, 8)):
        moba, hybrid = _metrics(out, f"{size}-moba"), _metrics(out, f"{size}-hybrid")
        assert sorted(hybrid) == list(range(switch + 1, iters + 1))
        for it in hybrid:
            assert hybrid[it]["consumed_samples"] == moba[it]["consumed_samples"] == it
            assert hybrid[it]["lr"] == pytest.approx(moba[it]["lr"], rel=1e-12)
            assert hybrid[it]["loss"] == pytest.approx(moba[it]["loss"], rel=1e-4), (size, it)
    rows = list(csv.DictReader(open(out / "curves.csv")))
    runs = {(x["model"], x["variant"]) for x in rows}
    assert len(runs) == 6 and {x["bucket"] for x in rows} >= {"0-128", "384-512"}
    by = {(x["model"], x["variant"], int(x["iteration"]), x["bucket"]): x for x in rows}
    for (model, variant, it, bucket), x in by.items():
        n, tokens = int(x["non_embedding_params"]), it * 512
        assert int(x["train_tokens"]) == tokens
        assert math.isclose(float(x["compute_pflops_days"]), 6 * n * tokens / PFLOPS_DAY, rel_tol=1e-9)
        if variant == "hybrid" and it <= int(x["switch_iteration"]):     # the moba run's own checkpoint
            assert x["loss"] == by[(model, "moba", it, bucket)]["loss"]
            assert x["train_hours"] == by[(model, "moba", it, bucket)]["train_hours"]
    for (model, variant) in runs:
        pts = sorted((int(x["iteration"]), float(x["train_hours"]), float(x["job_compute_pflops_days"]))
                     for x in rows if x["model"] == model and x["variant"] == variant and x["bucket"] == "0-128")
        assert [p[0] for p in pts] == ([2, 3, 6] if model == "L1-H16" else [2, 4, 8])
        assert all(a[1] < b[1] and a[2] < b[2] for a, b in zip(pts, pts[1:]))      # cumulative
    # the job's FLOPs: the hybrid's are MoBA's up to the switch, then full attention's
    from megatron_moba.eval.checkpoint import saved_args
    from megatron_moba.training.arguments import config_from_args
    from megatron_moba.training.flops import flops_per_iteration
    per = {v: flops_per_iteration(a, config_from_args(a)) for v, a in
           (("moba", saved_args(str(out / "runs" / "L1-H32-moba" / "ckpt"))),
            ("full", saved_args(str(out / "runs" / "L1-H32-full" / "ckpt"))))}
    hybrid_final = float(by[("L1-H32", "hybrid", 8, "0-128")]["job_compute_pflops_days"])
    assert math.isclose(hybrid_final, (4 * per["moba"] + 4 * per["full"]) / PFLOPS_DAY, rel_tol=1e-9)
    # fits of the final points, per x axis: least squares in log-log
    fits = json.load(open(out / "curve_fits.json"))
    for axis, column in (("6nd", "compute_pflops_days"), ("train_time", "train_hours")):
        for variant in ("moba", "full", "hybrid"):
            final = [(float(x[column]), float(x["loss"])) for x in rows
                     if x["variant"] == variant and x["bucket"] == "384-512" and x["final"] == "True"]
            slope, _ = np.polyfit(np.log([c for c, _ in final]), np.log([y for _, y in final]), 1)
            assert len(final) == 2 and fits[axis][variant]["384-512"]["b"] == pytest.approx(slope, abs=1e-9)
    ratios = json.load(open(out / "ratios.json"))
    assert ratios["model"] == "L1-H32"
    for bucket in ("0-128", "384-512"):
        for pair in ("moba/full", "hybrid/full"):
            entry = ratios["buckets"][bucket][pair]
            assert entry["ratio"] == pytest.approx(1.0, abs=2e-3) and entry["ci"][0] <= entry["ratio"] <= entry["ci"][1]
    context = json.load(open(out / "context.json"))["buckets"]
    assert [c["positions"] for c in context] == [[0, 128], [128, 256], [256, 384], [384, 512]]
    assert all(0 <= c["whole_document_fraction"] <= 1 and c["attention_crosses_documents"] for c in context)
    assert context[0]["mean_own_document_context"] < context[-1]["mean_own_document_context"]
    assert "| 0-128 | " in open(out / "fits_vs_paper.md").read()
    for png in ("curves_0-128.png", "curves_384-512.png", "curves_all.png", "curves_all_job_flops.png",
                "curves_all_train_time.png"):
        assert os.path.getsize(out / png) > 10_000, png
    dest = tmp_path / "published"
    again = _sweep(path, out, "--publish", str(dest))        # nothing left to train or evaluate
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("final checkpoint exists, skipped") == 6 and "evaluating" not in again.stdout
    assert list(csv.DictReader(open(out / "curves.csv"))) == rows
    summary = json.load(open(dest / "summary.json"))
    docs = summary["evaluation_documents"]
    assert docs["evaluated"] == 2 and docs["min_tokens"] == 513 and docs["reaching_min_tokens"] >= 2
    assert summary["wall_s"]["evaluation"] > 0 and len(summary["runs"]) == 6
    for name in ("curves.csv", "curve_fits.json", "fits_vs_paper.md", "ratios.json", "context.json",
                 "curves_0-128.png", "curves_all_train_time.png", "metrics/L1-H32-hybrid.jsonl"):
        assert os.path.isfile(dest / name), name


def test_plan_of_curves_and_hybrid(tmp_path):
    from megatron_moba.eval import sweep
    desc = sweep.validate(json.loads(json.dumps(DESC)))
    runs = {r.name: r for r in sweep.plan_runs(desc, str(tmp_path))}
    moba, full, hybrid = runs["L1-H32-moba"], runs["L1-H32-full"], runs["L1-H32-hybrid"]

    def flag(run, name, n=1):
        i = run.argv.index(name)
        return run.argv[i + 1:i + 1 + n]
    assert flag(moba, "--save-iterations", 2) == ["2", "4"] and flag(full, "--save-iterations", 2) == ["2", "4"]
    assert "--save-iterations" not in hybrid.argv           # its only point after the switch is the last
    assert flag(hybrid, "--attention") == ["full"] and "--moba-topk" not in hybrid.argv
    assert hybrid.source is moba and hybrid.switch_iteration == 4 and hybrid.curve == [2, 4, 8]
    from megatron_moba.eval.sweep.curves import curve_points
    assert curve_points(hybrid) == [(moba, 2), (moba, 4), (hybrid, 8)]
    assert [r.variant for r in runs.values()] == ["moba", "full", "hybrid"] * 2
    only = sweep.validate(dict(json.loads(json.dumps(DESC)), hybrid=dict(models=["L1-H16"])))
    assert [r.name for r in sweep.plan_runs(only, str(tmp_path)) if r.variant == "hybrid"] == ["L1-H16-hybrid"]
