"""The pretraining job as a user runs it: logging and start summary, step timing, Ctrl-C, the
Megatron-LM flags carried over (recomputation, fp16, warmup fraction, exit duration), quick --help."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest

import megatron_cases as mc
from megatron_moba.training.arguments import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
JOB = [sys.executable, "-m", "megatron_moba.pretrain"]


def _argv(**changes):
    argv = list(mc.TINY)
    for flag, value in changes.items():
        argv[argv.index("--" + flag.replace("_", "-")) + 1] = str(value)
    return argv


# ---------------------------------------------------------------- --help without torch/megatron

_HELP = """
import runpy, sys
target = sys.argv[1]
sys.argv = [target, "--help"]
code = 0
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code or 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "moba_kernels", "triton"))
print("HEAVY:" + ",".join(heavy[:5]))
sys.exit(code)
"""


@pytest.mark.parametrize("target", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tools", "*.py")))
                         + ["megatron_moba.pretrain"])
def test_help_parses_before_importing_torch_or_megatron(target):
    path = target if target.startswith("megatron_moba") else os.path.join(ROOT, "tools", target)
    run = subprocess.run([sys.executable, "-c", _HELP, path], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout
    assert run.stdout.rstrip().endswith("HEAVY:"), run.stdout[-300:]      # nothing heavy imported


# ---------------------------------------------------------------- new flags: parsing and errors

@pytest.mark.parametrize("extra,text", [
    (["--lr-warmup-fraction", "0.1"], "--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive"),
    (["--lr-warmup-iters", "0", "--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1)"),
    (["--train-iters", "1"], "--lr-warmup-iters (1) must be smaller than --train-iters (1)"),
    (["--lr-decay-iters", "1"], "--lr-warmup-iters (1) must be smaller than --lr-decay-iters (1)"),
    (["--recompute-method", "block"], "--recompute-method needs --recompute-granularity full"),
    (["--recompute-num-layers", "1"], "--recompute-num-layers needs --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "--recompute-num-layers applies to --recompute-granularity full only"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "3"],
     "--recompute-num-layers (3) must be between 1 and the layers per pipeline stage (2)"),
    (["--recompute-granularity", "partial"], "--recompute-granularity: invalid choice"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 are mutually exclusive"),
    (["--fp16", "--optimizer-impl", "torch"], "--fp16 needs --optimizer-impl megatron"),
    (["--loss-scale", "1024"], "--loss-scale needs --fp16"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be > 0"),
    (["--logging-level", "LOUD"], "--logging-level: 'LOUD' is not a logging level"),
])
def test_new_flags_reject_contradictions_naming_the_flag(extra, text, capsys):
    mc.assert_cli_rejects(extra, text, capsys)


def test_new_flags_resolve_like_megatron_lm():
    a = parse_args(_argv(lr_warmup_iters=0) + ["--lr-warmup-fraction", "0.5"], world_size=1)
    assert a.lr_warmup_iters == 3                                        # of --train-iters 6 (= decay iters)
    a = parse_args(_argv(lr_warmup_iters=0) + ["--lr-warmup-fraction", "0.5", "--lr-decay-iters", "4"], world_size=1)
    assert a.lr_warmup_iters == 2
    a = parse_args(mc.TINY + ["--recompute-granularity", "full"], world_size=1)
    assert (a.recompute_method, a.recompute_num_layers) == ("uniform", 1)
    assert parse_args(mc.TINY + ["--logging-level", "debug"], world_size=1).logging_level == 10
    assert parse_args(mc.TINY + ["--logging-level", "30"], world_size=1).logging_level == 30
    assert parse_args(mc.TINY, world_size=1).logging_level is None
    a = parse_args(mc.TINY + ["--fp16"], world_size=1)
    assert a.optimizer_impl == "megatron"                               # fp16 runs megatron's optimizer


# ---------------------------------------------------------------- activation recomputation

def recompute_grads(argv, variants):
    """Loss and gradients of one training step, per recompute variant, from the same weights and batch."""
    from megatron_moba.training.trainer import Trainer
    out = []
    for extra in variants:
        trainer = Trainer(parse_args(list(argv) + list(extra), world_size=1))
        trainer.optimizer.zero_grad()
        loss = trainer._run(trainer.train_batches, forward_only=False)
        out.append((loss, {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()},
                    trainer.config.recompute_granularity, trainer.config.recompute_method))
    return out


@pytest.mark.parametrize("base", [[], ["--document-attention"]], ids=["moba", "moba-packed-documents"])
def test_recompute_gives_the_same_loss_and_gradients(base):
    import torch
    variants = [[], ["--recompute-granularity", "full"],
                ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
                ["--recompute-granularity", "selective"]]
    argv = mc.TINY + ["--moba-full-attn-layers", "1"] + base            # MoBA and full core attention
    runs = mc.run_distributed(recompute_grads, argv, variants)[0]
    (loss0, grads0, g0, _), rest = runs[0], runs[1:]
    assert g0 is None and [r[2:] for r in rest] == [("full", "uniform"), ("full", "block"), ("selective", None)]
    assert all(g.abs().sum() > 0 for g in grads0.values())
    for loss, grads, *_ in rest:
        assert loss == loss0
        for name, g in grads0.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-8, msg=name)


# ---------------------------------------------------------------- fp16 with loss scaling

def fp16_run(argv):
    from megatron_moba.training.trainer import Trainer
    trainer = Trainer(parse_args(list(argv), world_size=1))
    losses = trainer.train()
    main = {str(p.dtype) for g in trainer.optimizer.optimizer.param_groups for p in g["params"]}
    return sorted({str(p.dtype) for p in trainer.model.parameters()}), sorted(main), losses


def test_fp16_trains_with_dynamic_loss_scaling(tmp_path):
    metrics = tmp_path / "m.jsonl"
    # the default initial loss scale (2**32) overflows the fp16 gradients of the first steps: skipped steps
    # that lower the scale, not non-finite steps that stop the run (--max-nonfinite-steps 2)
    argv = _argv(train_iters=40, lr=1e-2) + ["--fp16", "--max-nonfinite-steps", "2", "--metrics-file", str(metrics)]
    weights, main, losses = mc.run_distributed(fp16_run, argv)[0]
    assert weights == ["torch.float16"] and main == ["torch.float32"]
    rows = [r for r in map(json.loads, open(metrics)) if "step_time_s" in r]
    scales = [r["loss_scale"] for r in rows]
    assert scales[0] <= 2.0 ** 32 and scales[-1] < 2.0 ** 20 and scales == sorted(scales, reverse=True)
    skipped = sum(r["skipped"] for r in rows)
    assert 2 < skipped < 30
    assert losses[-1] < min(losses[:skipped + 1]) - 0.2


def test_fp16_resume_is_exact_with_the_loss_scale(tmp_path):
    ckpt, straight_m, resumed_m = str(tmp_path / "ckpt"), tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    argv = _argv(train_iters=10) + ["--fp16", "--max-nonfinite-steps", "2"]      # the scale drops from 2**32
    straight = mc.run_distributed(mc.run_pretrain, argv + ["--metrics-file", str(straight_m)])[0]
    first = mc.run_distributed(mc.run_pretrain, argv + ["--save", ckpt, "--exit-interval", "5",
                                                        "--metrics-file", str(resumed_m)])[0]
    second = mc.run_distributed(mc.run_pretrain, argv + ["--load", ckpt, "--metrics-file", str(resumed_m)])[0]
    assert first + second == straight
    scales = [[r["loss_scale"] for r in map(json.loads, open(m))] for m in (straight_m, resumed_m)]
    assert scales[0] == scales[1] and scales[0][5] < 2.0 ** 32


# ---------------------------------------------------------------- timing, consumed samples, summary

def timed_run(argv):
    """Train under a fake clock: each training step lasts 1 s, each save and evaluation 1000 s."""
    from megatron_moba.training.trainer import Trainer, count_parameters
    trainer = Trainer(parse_args(list(argv), world_size=1))
    now = [0.0]
    trainer.clock = lambda: now[0]

    def slow(fn, seconds):
        def run(*a, **k):
            now[0] += seconds
            return fn(*a, **k)
        return run
    trainer.train_step = slow(trainer.train_step, 1.0)
    trainer.save, trainer.evaluate = slow(trainer.save, 1000.0), slow(trainer.evaluate, 1000.0)
    trainer.train()
    return count_parameters(trainer.model), sum(p.numel() for p in trainer.model.parameters())


def test_step_time_excludes_saves_and_evaluation_and_consumed_samples_are_logged(tmp_path):
    metrics = tmp_path / "m.jsonl"
    argv = mc.TINY + ["--log-interval", "2", "--eval-interval", "1", "--eval-iters", "1", "--save", str(tmp_path / "c"),
                      "--save-interval", "1", "--metrics-file", str(metrics), "--split", "90,10,0"]
    counted, local = mc.run_distributed(timed_run, argv)[0]
    assert counted == local
    rows = [r for r in map(json.loads, open(metrics)) if "step_time_s" in r]
    assert [r["iteration"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert r["step_time_s"] == 1.0 and r["tokens_per_s"] == 4 * 64
        assert r["consumed_samples"] == 4 * r["iteration"]               # global batch x iterations


def parameter_count(argv):
    from megatron_moba.training.trainer import Trainer, count_parameters
    return count_parameters(Trainer(parse_args(list(argv), world_size=mc.dist.get_world_size())).model)


def test_parameter_count_is_the_whole_model_at_any_layout():
    single = mc.run_distributed(parameter_count, mc.TINY)[0]
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    assert mc.run_distributed(parameter_count, mc.TINY + layout, tp=2, pp=2) == [single] * 4


def _job(argv, **kw):
    return subprocess.run(JOB + argv, capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


def test_job_logs_megatron_info_a_summary_and_no_absent_backend_warnings(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run = _job(_argv(train_iters=3) + ["--save", ckpt, "--use-mcore-models", "--manual-gc"])
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "INFO megatron.core.datasets" in out                         # megatron-core's own INFO logging
    assert "world size 1: tensor parallel 1, pipeline parallel 1, context parallel 1, data parallel 1 | device cpu" \
        in run.stdout
    assert "tokens per step: 256 (global batch 4 x sequence length 64" in run.stdout
    assert "start: from scratch (seed 1234)" in run.stdout
    assert "positions: RoPE base 10000, max positions 64, sequence length 64" in run.stdout
    assert "--use-mcore-models: accepted, no effect (the job builds megatron-core models only)" in run.stdout
    assert "kernel fusions: on none; off masked_softmax_fusion (no CUDA)" in run.stdout
    assert ("--manual-gc: automatic garbage collection off, collecting before checkpoint saves and evaluations"
            in run.stdout)
    assert " parameters, 2 layers, attention moba, fp32" in run.stdout
    assert "iteration      3/3 | consumed samples: 12 | elapsed time per iteration (ms): " in run.stdout
    for notice in ("Apex is not installed", "Transformer Engine and Apex are not installed",
                   "full scope is deprecated"):
        assert notice not in run.stderr
    # a resume says what it loaded; --logging-level WARNING leaves megatron-core's INFO out
    run = _job(_argv(train_iters=4) + ["--load", ckpt, "--save", ckpt, "--logging-level", "WARNING"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"start: checkpoint {ckpt} at iteration 3" in run.stdout
    assert "INFO megatron.core" not in run.stdout + run.stderr


def test_exit_duration_saves_and_stops(tmp_path):
    from megatron_moba.training.checkpointing import read_latest
    ckpt = str(tmp_path / "ckpt")
    losses = mc.run_distributed(mc.run_pretrain, mc.TINY + ["--save", ckpt, "--exit-duration-in-mins", "1e-6"])[0]
    assert len(losses) == 1 and read_latest(ckpt) == 1


# ---------------------------------------------------------------- Ctrl-C

def _start(tmp_path):
    return subprocess.Popen(JOB + _argv(train_iters=1000) + ["--save", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_sigint_saves_and_exits_cleanly(tmp_path):
    from megatron_moba.training.checkpointing import read_latest
    proc = _start(tmp_path)
    for line in proc.stdout:
        if line.startswith("iteration      3/1000"):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGINT received: stopping after this iteration, saving a checkpoint (Ctrl-C again exits at once)" in rest
    assert "SIGINT: stopping at iteration" in rest and "(checkpoint saved)" in rest
    assert "KeyboardInterrupt" not in err
    assert 3 <= read_latest(str(tmp_path)) < 1000


def test_second_sigint_exits_at_once(tmp_path):
    proc = _start(tmp_path)
    for line in proc.stdout:
        if line.startswith("iteration      3/1000"):
            proc.send_signal(signal.SIGINT)
        if line.startswith("SIGINT received"):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err[-3000:])
    assert "second SIGINT: exiting at once, without saving" in err
    assert "stopping at iteration" not in rest
