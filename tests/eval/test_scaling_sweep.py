"""tools/scaling_sweep.py and megatron_moba.eval.sweep: the cpu-tiny preset end to end (table, fits, plots,
resume), N against the built model, --print / --slurm, clear errors for bad descriptions."""
import csv
import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import megatron_cases as mc
from helpers import tool_exit_code

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
TOOL = os.path.join(ROOT, "tools", "scaling_sweep.py")
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def _sweep(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "tools/scaling_sweep.py" if cwd == ROOT else TOOL, *args],
                          capture_output=True, text=True, env=ENV, cwd=cwd)



@pytest.mark.slow
def test_cpu_tiny_preset_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "sweep"
    r = _sweep("--preset", "cpu-tiny", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    desc = yaml.safe_load(open(os.path.join(ROOT, "examples", "sweeps", "cpu-tiny.yaml")))
    rows = list(csv.DictReader(open(out / "table.csv")))
    buckets = ["0-64", "64-128", "128-192", "192-256", "all", "last 64"]
    runs = {(row["model"], row["variant"]) for row in rows}
    assert len(runs) == 6 and len(rows) == 6 * len(buckets)
    for row in rows:
        n, d = int(row["non_embedding_params"]), int(row["train_tokens"])
        model = next(m for m in desc["models"] if f"L{m['layers']}-H{m['hidden']}" == row["model"])
        assert d == model["train_iters"] * desc["global_batch"] * desc["seq_length"]
        assert math.isclose(float(row["compute_pflops_days"]), 6 * n * d / 8.64e19, rel_tol=1e-9)
        result = json.load(open(out / "runs" / f"{row['model']}-{row['variant']}" / "positional_loss.json"))["result"]
        if row["kind"] == "bucket":
            b = next(b for b in result["buckets"] if b["bucket"] == row["bucket"])
            assert float(row["loss"]) == b["loss"] and int(row["eval_documents"]) == b["documents"]
        assert 0 < float(row["loss"]) < math.log(512) + 1
    assert sorted({row["bucket"] for row in rows}) == sorted(buckets)
    fits = json.load(open(out / "fits.json"))
    for variant in ("moba", "full"):                    # the fit is least squares of the table's points, log-log
        for bucket in buckets:
            pts = [(float(x["compute_pflops_days"]), float(x["loss"])) for x in rows
                   if x["variant"] == variant and x["bucket"] == bucket]
            slope, _ = np.polyfit(np.log([c for c, _ in pts]), np.log([loss for _, loss in pts]), 1)
            assert abs(fits[variant][bucket]["b"] - slope) < 1e-9 and fits[variant][bucket]["n"] == 3
            assert slope < 0                            # bigger, longer-trained models reach a lower loss
    for png in ("scaling.png", "positional_loss.png"):
        assert os.path.getsize(out / png) > 20_000
    stamp = {p: os.path.getmtime(out / "runs" / p / "ckpt" / "latest_checkpointed_iteration.txt")
             for p in os.listdir(out / "runs")}
    again = _sweep("--preset", "cpu-tiny", "--out", str(out))      # resumes: nothing left to train or evaluate
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("final checkpoint exists, skipped") == 6 and "evaluating" not in again.stdout
    assert stamp == {p: os.path.getmtime(out / "runs" / p / "ckpt" / "latest_checkpointed_iteration.txt")
                     for p in stamp}
    assert list(csv.DictReader(open(out / "table.csv"))) == rows


def _count_params(argv):
    from megatron_moba.training.arguments import parse_args
    from megatron_moba.training.model import build_model
    from megatron_moba.training.tokenizer import build_tokenizer
    model = build_model(parse_args(argv, world_size=1), build_tokenizer("NullTokenizer", None, 200))
    return sum(p.numel() for name, p in model.named_parameters()
               if "embedding" not in name and "output_layer" not in name)


BASE = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--train-iters", "1", "--mock-data", "--vocab-size", "200"]
SHAPES = [  # extra flags, sweep.non_embedding_params keywords
    ([], dict(layers=3, hidden=64, heads=4)),
    (["--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm", "--num-query-groups", "2"],
     dict(layers=3, hidden=64, heads=4, query_groups=2, swiglu=True, bias=False, layernorm=False)),
    (["--ffn-hidden-size", "96", "--normalization", "RMSNorm"],
     dict(layers=3, hidden=64, heads=4, ffn_hidden=96, layernorm=False)),
]


def test_non_embedding_params_match_the_built_model():
    from megatron_moba.eval.sweep import non_embedding_params
    for (extra, kw) in SHAPES:
        counted = mc.run_distributed(_count_params, BASE + extra)[0]
        assert non_embedding_params(**{"layernorm": True, **kw}) == counted, (extra, counted)


def test_print_gpu_small_and_torchrun():
    from megatron_moba.training.arguments import parse_args
    r = _sweep("--preset", "gpu-small", "--print", "--out", "/nonexistent/sweep", "--nproc-per-node", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    cmds = [line.split() for line in r.stdout.splitlines() if line.startswith("torchrun")]
    assert len(cmds) == 6 and not os.path.exists("/nonexistent/sweep")        # --print builds nothing
    desc = yaml.safe_load(open(os.path.join(ROOT, "examples", "sweeps", "gpu-small.yaml")))
    assert desc["eval"]["bucket_width"] == 2048
    for cmd in cmds:
        assert cmd[:5] == ["torchrun", "--nproc-per-node", "8", "-m", "megatron_moba.pretrain"]
        a = parse_args(cmd[5:], world_size=8)
        assert a.seq_length >= 16384 and a.bf16 and a.seq_length % 2048 == 0
        assert a.global_batch_size * a.seq_length * a.train_iters in [m["tokens"] for m in desc["models"]]
        if a.attention == "moba":
            assert (a.moba_chunk_size, a.moba_topk) == (512, 3)
    assert {a for c in cmds for a in c if a in ("moba", "full")} == {"moba", "full"}


def _description(tmp_path, **changes):
    from megatron_moba.training.preprocess import build_indexed_dataset
    prefix = str(tmp_path / "docs")
    if not os.path.exists(prefix + ".idx"):
        build_indexed_dataset(iter([" ".join(["7"] * 80)] * 3), prefix, "NullTokenizer", vocab_size=50, progress=False)
    desc = dict(name="t", models=[dict(layers=1, hidden=16, heads=2), dict(layers=2, hidden=16, heads=2)],
                seq_length=64, global_batch=2, train_iters=3, eval=dict(bucket_width=16),
                data=dict(train=prefix, tokenizer_type="NullTokenizer", vocab_size=50))
    desc.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(desc))
    return str(path)


def test_slurm_script_one_task_per_run_skips_finished_runs(tmp_path, monkeypatch):
    script, out = tmp_path / "sweep.sbatch", tmp_path / "out"
    argv = [_description(tmp_path), "--out", str(out), "--slurm", str(script)]
    assert tool_exit_code(monkeypatch, "scaling_sweep.py", *argv) == 0
    text = script.read_text()
    assert f"\ncd {shlex.quote(ROOT)}\n" in text                  # the tasks start in the checkout
    assert "#SBATCH --array=0-3" in text and subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(script)]).returncode == 0
    assert os.path.isdir(out / "slurm")                          # Slurm writes the tasks' output there
    assert text.count("python -m megatron_moba.pretrain") == 4 and "--attention full" in text
    ckpt = out / "runs" / "L1-H16-moba" / "ckpt"                 # task 0 finished: the task does nothing
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    from megatron_moba.eval import sweep
    assert [r.done() for r in sweep.plan_runs(sweep.load_description(_description(tmp_path)), str(out))] == \
        [True, False, False, False]
    done = subprocess.run(["bash", str(script)], env=dict(ENV, SLURM_ARRAY_TASK_ID="0"), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "L1-H16-moba: done"
    none = subprocess.run(["bash", str(script)], env=dict(ENV, SLURM_ARRAY_TASK_ID="4"), capture_output=True, text=True)
    assert none.returncode == 1 and "no run for task 4" in none.stderr


@pytest.mark.parametrize("changes,text", [
    (dict(modles=[]), "unknown key 'modles' in the sweep description"),
    (dict(moba=dict(chunck=64)), "unknown key 'chunck' under 'moba'"),
    (dict(models=[dict(layers=1, hidden=16, heads=2, width=3)]), "unknown key 'width' in models[0]"),
    (dict(models=[dict(layers=1, hidden=16)]), "missing key 'heads' in models[0]"),
    (dict(models=[dict(layers=1, hidden=18, heads=4)]), "models[0]: hidden (18) must be divisible by heads (4)"),
    (dict(models=[]), "models must be a non-empty list"),
    (dict(tokens=1000), "give exactly one of tokens, train_iters (at the top level or per model) and tokens_per_param"),
    (dict(train_iters=None, tokens_per_param=0), "tokens_per_param must be a positive number, got 0"),
    (dict(train_iters=None, tokens_per_param=1e-6), "tokens_per_param 1e-06 gives 1 iteration(s)"),
    (dict(fit=dict(panels="0-16")), "fit.panels must be a list of bucket names"),
    (dict(fit=dict(extend_decades=-1)), "fit.extend_decades must be a number >= 0, got -1"),
    (dict(variants=["moba", "sparse"]), "variants must be a list of moba, full and/or hybrid"),
    (dict(variants=["full", "hybrid"]), "variants: hybrid (MoBA, then full attention from hybrid.switch on) continues"),
    (dict(hybrid=dict(switch=1.0)), "hybrid.switch must be a fraction of the training tokens in (0, 1), got 1.0"),
    (dict(hybrid=dict(models=["L9-H9"])),
     "hybrid.models must be a list of model names (L1-H16, L2-H16), got ['L9-H9']"),
    (dict(curve=dict(points=[0.5, 1.5])), "curve.points must be a list of fractions of the training in (0, 1]"),
    (dict(eval=dict(bucket_width=16, min_tokens=0)), "eval.min_tokens must be a positive integer, got 0"),
    (dict(eval=dict(bucket_width=128)), "eval.bucket_width (128) is larger than seq_length (64)"),
    (dict(global_batch=3, micro_batch=2), "global_batch (3) must be a multiple of micro_batch (2)"),
    (dict(data=dict(train="/nonexistent/x", tokenizer_type="NullTokenizer", vocab_size=50)),
     "data.train: /nonexistent/x.bin/.idx not found"),
    (dict(data=dict(mock=True, vocab_size=50)), "mock training data needs an eval dataset prefix"),
    (dict(extra_args=["--no-such-flag"]), "run L1-H16-moba: the pretraining job rejects its flags"),
    (dict(fit=dict(ratio_at=0)), "fit.ratio_at must be a positive number"),
    (dict(fit=dict(buckets="all")), "fit.buckets must be a list of bucket names"),
])
def test_bad_descriptions_fail_clearly(tmp_path, capsys, monkeypatch, changes, text):
    argv = [_description(tmp_path, **changes), "--out", str(tmp_path / "o"), "--slurm", str(tmp_path / "s")]
    assert tool_exit_code(monkeypatch, "scaling_sweep.py", *argv) == 2
    assert text in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s")


def test_missing_description_and_empty_table(tmp_path, capsys, monkeypatch):
    assert tool_exit_code(monkeypatch, "scaling_sweep.py", str(tmp_path / "none.yaml")) == 2
    assert "none.yaml: no such sweep description" in capsys.readouterr().err
    from megatron_moba.eval import scaling_fit, sweep
    with pytest.raises(ValueError, match="the sweep produced no table rows"):
        sweep.write_table([], str(tmp_path / "t.csv"))
    (tmp_path / "t.csv").write_text(",".join(sweep.TABLE_FIELDS) + "\n")
    with pytest.raises(ValueError, match="the table is empty"):
        scaling_fit.fit_table(str(tmp_path / "t.csv"), str(tmp_path))


def test_help_from_any_directory(tmp_path):
    r = _sweep("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--preset {cpu-long,cpu-small,cpu-tiny,gpu-small}" in r.stdout and "slurm: {partition, account" in r.stdout


def test_tokens_per_param_sets_each_models_tokens(tmp_path):
    from megatron_moba.eval import sweep
    desc = sweep.load_description(_description(tmp_path, train_iters=None, tokens_per_param=20))
    runs = sweep.plan_runs(desc, str(tmp_path / "o"))
    for r in runs:      # D = ceil(20 N / tokens per iteration) iterations (N: checked against built models above)
        n = sweep.non_embedding_params(r.model["layers"], 16, 2, layernorm=True)
        assert r.params == n and r.train_iters == math.ceil(20 * n / 128) and r.tokens == r.train_iters * 128
        assert f"--train-iters {r.train_iters} " in shlex.join(r.argv) + " "
    assert runs[0].train_iters < runs[2].train_iters            # the deeper model trains on more tokens
