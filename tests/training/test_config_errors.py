"""Errors in what a user asked for, met as a user meets them: the job under torchrun (2 ranks) prints
``moba-pretrain: error: <message>`` once, without a traceback, and its ranks exit with status 2.  One
case per kind: flags, data, checkpoint directory, megatron-core release, MoBA settings; all fail
before the first training step.  Other exceptions keep their tracebacks.

torchrun's own report follows a failed rank (its traceback ending in ChildFailedError, the summary with
each rank's exit code), and torchrun itself exits with 1 whatever the ranks' status: the ranks' codes
are read from that summary."""
import os
import re
import signal
import subprocess
import sys

import pytest

import megatron_cases as mc
from megatron_moba.core import versions
from megatron_moba.core.errors import ConfigurationError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
TIMEOUT = 300           # seconds; each case takes 10-30 s on 2 loaded cores (a hang fails instead of blocking)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
# torchrun's own traceback when a rank fails (frames indented, ending in its ChildFailedError)
_TORCHRUN_TRACEBACK = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+"
                                 r"torch\.distributed\.elastic\.multiprocessing\.errors\.ChildFailedError:")


def _torchrun(argv, script=None):
    target = [script] if script else ["-m", "megatron_moba.pretrain"]
    env = {k: v for k, v in os.environ.items() if k != versions.ALLOW_ENV}
    try:
        return subprocess.run(TORCHRUN + target + list(argv), capture_output=True, text=True, cwd=ROOT,
                              timeout=TIMEOUT, env=dict(env, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun still running after {TIMEOUT} s: the job hangs on a configuration error")


def assert_user_error(run, message):
    """``run`` (torchrun) failed on ``message``: printed once as ``error: <message>``, no traceback of the
    job, the first rank to exit (rank 0) exited with 2, any other with 2 or torchrun's SIGTERM."""
    err = run.stderr
    assert run.returncode != 0
    assert err.count(f"moba-pretrain: error: {message}") == 1, err[-3000:]
    assert err.count(message) == 1, err[-3000:]                  # nowhere else either (no rank repeats it)
    job = _TORCHRUN_TRACEBACK.sub("", err)
    assert "Traceback" not in job, err[-3000:]
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", err, re.S)
    assert root and root.groups() == ("0", "2"), err[-1500:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", err)) <= {"2", "-15"}, err[-1500:]
    assert "iteration " not in run.stdout                      # before any training step


def _tiny(*extra, data=None):
    argv = [a for a in mc.TINY if a != "--mock-data"] + (["--data-path", *data] if data else ["--mock-data"])
    return argv + list(extra)


def test_flags(tmp_path):
    """A flag combination checked after argparse: the layout needs more ranks than torchrun starts."""
    run = _torchrun(_tiny("--tensor-model-parallel-size", "4"))
    assert_user_error(run, "world size (2) is not divisible by --tensor-model-parallel-size x "
                           "--pipeline-model-parallel-size x --context-parallel-size (4)")
    assert run.stderr.count("usage: moba-pretrain") == 1           # argparse's usage line, rank 0 only


def test_data(tmp_path):
    """The issue's case: a 12-document dataset and --split 98,2,0 with evaluation."""
    from megatron_moba.training.preprocess import build_indexed_dataset
    prefix = str(tmp_path / "twelve")
    texts = [" ".join(str(1 + (i * 7 + j) % 150) for j in range(40 + i % 9)) for i in range(12)]
    build_indexed_dataset(iter(texts), prefix, "NullTokenizer", vocab_size=200, progress=False)
    run = _torchrun(_tiny("--split", "98,2,0", "--eval-interval", "2", "--eval-iters", "1",
                          "--data-cache-path", str(tmp_path / "cache"), data=[prefix]))
    assert_user_error(run, f"--split 98,2,0 leaves the validation split of {prefix} empty (0 documents, 0 tokens): "
                           "it has 12 documents, split as train 12, validation 0, test 0; give the validation split "
                           "more weight in --split, or leave out --eval-interval to train without evaluation")


def test_checkpoint_directory(tmp_path):
    """--save holds another run's checkpoints and no --load: refused instead of overwriting them."""
    save = tmp_path / "ckpt"
    (save / "iter_0000003").mkdir(parents=True)
    run = _torchrun(_tiny("--save", str(save)))
    assert_user_error(run, f"--save {save} already holds checkpoints (newest {save / 'iter_0000003'}) and no --load "
                           f"was given: this run would start from scratch and overwrite them; resume them with "
                           f"--load {save}, or --save to an empty directory")


_AS_RELEASE = """
import runpy, sys
from megatron.core import package_info
package_info.__version__ = sys.argv.pop(1)      # megatron-core reports this release
runpy.run_module("megatron_moba.pretrain", run_name="__main__", alter_sys=True)
"""


def test_megatron_core_release(tmp_path):
    """An unsupported megatron-core (the installed one reporting 0.21.0) fails the version check."""
    script = tmp_path / "as_release.py"
    script.write_text(_AS_RELEASE)
    run = _torchrun(["0.21.0"] + _tiny(), script=str(script))
    assert_user_error(run, f"megatron-core 0.21.0 is installed, but megatron-moba supports megatron-core "
                           f"{versions.SUPPORTED_RANGE}.  Install a supported release, e.g. pip install "
                           f"'{versions.REQUIREMENT}' (or set {versions.ALLOW_ENV}=1 to try this one anyway)")


def test_moba_config(tmp_path):
    """A MoBA setting that MoBATransformerConfig refuses when the model is built (process group up)."""
    run = _torchrun(_tiny("--moba-topk", "0"))
    assert_user_error(run, "--moba-topk must be an integer >= 1, got 0")


# ---------------------------------------------------------------- the entry point's handling, in process

def test_configuration_errors_are_value_errors_and_keep_their_builtin_types():
    from megatron_moba.training.checkpointing import CheckpointDirectoryError, CheckpointNotFoundError
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(CheckpointDirectoryError, FileExistsError) and issubclass(CheckpointNotFoundError,
                                                                                FileNotFoundError)
    assert issubclass(versions.UnsupportedMegatronCoreError, ImportError)
    assert all(issubclass(c, ConfigurationError) for c in (CheckpointDirectoryError, CheckpointNotFoundError,
                                                          versions.UnsupportedMegatronCoreError))


@pytest.mark.parametrize("rank", ["0", "1"])
def test_entry_point_prints_on_rank_zero_and_exits_2(monkeypatch, capsys, rank):
    from megatron_moba import pretrain
    from megatron_moba.training import arguments

    def fail(args):
        raise ConfigurationError("--moba-topk must be an integer >= 1, got 0")
    monkeypatch.setattr(pretrain, "_pretrain", fail)
    monkeypatch.setattr(arguments, "OTHER_RANKS_WAIT_S", 0.0)
    monkeypatch.setenv("RANK", rank)
    sigterm = signal.getsignal(signal.SIGTERM)        # a rank other than 0 exits with 2 on SIGTERM meanwhile
    try:
        with pytest.raises(SystemExit) as e:
            pretrain.main(list(mc.TINY))
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == ("moba-pretrain: error: --moba-topk must be an integer >= 1, got 0\n" if rank == "0" else "")


def test_other_exceptions_keep_their_tracebacks(monkeypatch):
    from megatron_moba import pretrain

    def fail(args):
        raise ValueError("a bug, not the user's input")
    monkeypatch.setattr(pretrain, "_pretrain", fail)
    with pytest.raises(ValueError, match="a bug"):
        pretrain.main(list(mc.TINY))
