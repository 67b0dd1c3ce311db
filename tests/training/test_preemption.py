"""Preemption as Slurm delivers it: SIGTERM to torchrun (srun's task), which passes it to its ranks; every rank
saves and exits within the shutdown timeout the launch scripts set (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), and the
requeued job resumes exactly: its losses are those of an uninterrupted run.  Two processes, TP 2, on CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import megatron_cases as mc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SHUTDOWN_TIMEOUT = 120       # seconds; what examples/slurm/pretrain_gpt_moba.sbatch sets is 240


def _argv(out, iters=6):
    argv = list(mc.TINY) + ["--tensor-model-parallel-size", "2", "--save", out, "--load", out,
                            "--metrics-file", out + ".jsonl"]
    argv[argv.index("--train-iters") + 1] = str(iters)
    return argv


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1",
                TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT))


def _losses(out):
    with open(out + ".jsonl") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    return {r["iteration"]: r["loss"] for r in rows}


def test_sigterm_to_torchrun_saves_on_every_rank_and_the_requeued_job_resumes_exactly(tmp_path):
    from megatron_moba.training.checkpointing import read_latest
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "preempted")
    ref = subprocess.run(TORCHRUN + ["-m", "megatron_moba.pretrain", *_argv(whole)], capture_output=True, text=True,
                         cwd=ROOT, env=_env(), timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # the preempted job: SIGTERM to torchrun once iteration 2 is logged
    proc = subprocess.Popen(TORCHRUN + ["-m", "megatron_moba.pretrain", *_argv(parts)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env())
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("iteration      2/6"):
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            break
    rest = proc.stdout.read()
    code = proc.wait(timeout=SHUTDOWN_TIMEOUT + 60)
    took = time.monotonic() - signalled
    assert code != 0 and took < SHUTDOWN_TIMEOUT, (code, took, rest[-3000:])   # torchrun reports the signal
    assert "SIGTERM: stopping at iteration" in rest and "(checkpoint saved)" in rest, "".join(seen)[-2000:] + rest
    assert "exitcode  : -9" not in rest                  # no rank was killed: each finished its save and exited
    stopped = read_latest(parts)
    assert 2 <= stopped < 6
    # the requeued job (same command) resumes from that checkpoint
    again = subprocess.run(TORCHRUN + ["-m", "megatron_moba.pretrain", *_argv(parts)], capture_output=True,
                           text=True, cwd=ROOT, env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"start: checkpoint {parts} at iteration {stopped}" in again.stdout
    expected, got = _losses(whole), _losses(parts)
    assert sorted(expected) == sorted(got) == list(range(1, 7))
    assert got == expected                               # bit for bit: the resume is exact
