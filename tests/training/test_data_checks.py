"""The job's data never hangs or fails late: empty splits, contradictory evaluation flags and
damaged .bin/.idx files are refused before training, with the flag or file to fix.

Cases that used to hang run in a subprocess with a timeout, so a regression fails instead of
blocking the suite."""
import json
import os
import subprocess
import sys

import pytest

import megatron_cases as mc
from megatron_moba.training.arguments import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
HANG_TIMEOUT = 300       # seconds; the checked cases finish in a few seconds of CPU


def _dataset(prefix, documents):
    from megatron_moba.training.preprocess import build_indexed_dataset
    texts = [" ".join(str(1 + (i * 7 + j) % 150) for j in range(40 + i % 9)) for i in range(documents)]
    build_indexed_dataset(iter(texts), str(prefix), "NullTokenizer", vocab_size=200, progress=False)
    return str(prefix)


def _data_argv(prefix, *extra):
    argv = [a for a in mc.TINY if a != "--mock-data"]
    return argv + ["--data-path", prefix, "--data-cache-path", os.path.join(os.path.dirname(prefix), "cache"),
                   *extra]


def _python(code, *argv):
    try:
        return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                              timeout=HANG_TIMEOUT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {HANG_TIMEOUT} s: the job hangs")


# ------------------------------------------------------------------ flags refused at parsing

@pytest.mark.parametrize("extra,text", [
    (["--split", "100,0,0", "--eval-interval", "2"], "--split 100,0,0 gives it no weight"),
    (["--eval-interval", "2", "--eval-iters", "0"], "--eval-iters 0"),
    (["--eval-interval", "0"], "--eval-interval must be >= 1"),
    (["--eval-iters", "-1"], "--eval-iters must be >= 0"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--split", "0,1,0"], "gives the training split no weight"),
    (["--split", "90,-10,0"], "--split '90,-10,0' must be up to three"),
    (["--split", "train"], "--split 'train' must be up to three"),
])
def test_cli_rejects_evaluation_and_split_contradictions(extra, text, capsys):
    mc.assert_cli_rejects(extra, text, capsys)


@pytest.mark.parametrize("extra", [["--split", "100,0,0"], ["--eval-iters", "0"], ["--split", "98/2/0"],
                                   ["--split", "90, 10", "--eval-interval", "3", "--eval-iters", "1"]])
def test_cli_accepts_runs_without_evaluation(extra):
    parse_args(mc.TINY + extra, world_size=1)


# ------------------------------------------------------------------ empty splits

def test_empty_validation_split_is_refused_instead_of_hanging(tmp_path):
    """10 documents with the default --split 969,30,1: the validation split rounds to nothing,
    and megatron's GPTDataset would loop forever sizing its epochs."""
    prefix = _dataset(tmp_path / "ten", 10)
    r = _python("import sys; from megatron_moba.pretrain import main; sys.exit(main(sys.argv[1:]))",
                *_data_argv(prefix, "--eval-interval", "3", "--eval-iters", "1"))
    assert r.returncode == 2, r.stderr[-3000:]                # a configuration error: no traceback
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"moba-pretrain: error: --split 969,30,1 leaves the validation split of {prefix} empty" in r.stderr
    assert "10 documents, split as train 10, validation 0, test 0" in r.stderr
    assert "--eval-interval" in r.stderr
    assert "iteration" not in r.stdout           # refused before any step


BUILD = """
import sys
from megatron_moba.training.arguments import parse_args
from megatron_moba.training.data import build_datasets
from megatron_moba.training.tokenizer import build_tokenizer
args = parse_args(sys.argv[1:], world_size=1)
train, valid, test = build_datasets(args, build_tokenizer("NullTokenizer", None, args.vocab_size))
print("lengths", len(train), None if valid is None else len(valid), None if test is None else len(test))
"""


def test_unused_empty_splits_are_not_built(tmp_path):
    """Without evaluation neither the (empty) validation nor the test split is built: training runs."""
    prefix = _dataset(tmp_path / "ten", 10)
    r = _python(BUILD, *_data_argv(prefix))
    assert r.returncode == 0, r.stderr[-3000:]
    lengths = r.stdout.split("lengths")[1].split()
    assert int(lengths[0]) >= 6 * 4 and lengths[1:] == ["None", "None"]


def test_validation_split_is_built_when_evaluating(tmp_path):
    prefix = _dataset(tmp_path / "forty", 40)
    r = _python(BUILD, *_data_argv(prefix, "--split", "80,20,0", "--eval-interval", "3", "--eval-iters", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    lengths = r.stdout.split("lengths")[1].split()
    assert int(lengths[1]) >= 2 * 4 and lengths[2] == "None"


# ------------------------------------------------------------------ damaged files

def _truncate(path, keep):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _empty_dataset(prefix):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    builder.finalize(prefix + ".idx")


DAMAGE = {
    "truncated bin": (lambda p: _truncate(p + ".bin", 0.5), ".bin is truncated"),
    "stale pair": (lambda p: open(p + ".bin", "ab").write(b"\0" * 64), ".bin is longer than its index describes"),
    "missing idx": (lambda p: os.remove(p + ".idx"), ".idx does not exist"),
    "missing bin": (lambda p: os.remove(p + ".bin"), ".bin does not exist"),
    "truncated idx": (lambda p: _truncate(p + ".idx", 0.5), ".idx is truncated"),
    "not an index": (lambda p: open(p + ".idx", "wb").write(b"garbage" * 10), ".idx is not a megatron indexed-dataset"),
    "empty dataset": (lambda p: _empty_dataset(p), "the dataset is empty (0 documents in"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_dataset_is_refused_naming_the_file(tmp_path, case):
    from megatron_moba.training.arguments import parse_args
    from megatron_moba.training.data import build_datasets
    from megatron_moba.training.tokenizer import build_tokenizer
    damage, text = DAMAGE[case]
    prefix = _dataset(tmp_path / "data", 30)
    damage(prefix)
    args = parse_args(_data_argv(prefix, "--split", "1"), world_size=1)
    with pytest.raises(ValueError) as info:
        build_datasets(args, build_tokenizer("NullTokenizer", None, 200))
    assert str(tmp_path / "data") in str(info.value) and text in str(info.value)


def test_blend_checks_every_file(tmp_path):
    from megatron_moba.training.data import build_datasets
    from megatron_moba.training.tokenizer import build_tokenizer
    good, bad = _dataset(tmp_path / "good", 30), _dataset(tmp_path / "bad", 30)
    _truncate(bad + ".bin", 0.9)
    args = parse_args(_data_argv(good, "--split", "1"), world_size=1)
    args.data_path = ["0.5", good, "0.5", bad]
    with pytest.raises(ValueError, match="bad.bin is truncated"):
        build_datasets(args, build_tokenizer("NullTokenizer", None, 200))


# ------------------------------------------------------------------ --train-data-slice

SLICES = """
import json, sys
from megatron_moba.training.arguments import parse_args
from megatron_moba.training.data import build_datasets
from megatron_moba.training.tokenizer import build_tokenizer
read = {}
for part in sys.argv[2:]:
    argv = sys.argv[1].split() + (["--train-data-slice", *part.split(":")] if part != "all" else [])
    args = parse_args(argv, world_size=1)
    train = build_datasets(args, build_tokenizer("NullTokenizer", None, args.vocab_size))[0]
    read[part] = sorted({int(t) for i in range(len(train)) for t in train[i]["tokens"].tolist()} - {args.vocab_size})
print("read", json.dumps(read))
"""


def test_train_data_slices_read_disjoint_documents(tmp_path):
    """--train-data-slice: stages on 0-0.25 and 0.25-1 of the training split read disjoint documents, together
    the whole split.  Document i is the token i+1 repeated, so the tokens a dataset serves name its documents."""
    from megatron_moba.training.preprocess import build_indexed_dataset
    prefix = str(tmp_path / "docs")
    build_indexed_dataset(iter(" ".join([str(i + 1)] * (30 + i % 7)) for i in range(40)), prefix, "NullTokenizer",
                          vocab_size=200, progress=False)
    argv = " ".join(_data_argv(prefix, "--split", "80,20,0"))
    r = _python(SLICES, argv, "0:0.25", "0.25:1", "all")
    assert r.returncode == 0, r.stderr[-3000:]
    read = json.loads(r.stdout.split("read", 1)[1])
    assert read["all"] == list(range(1, 33))                     # the training split: documents 0-31 (80%)
    assert read["0:0.25"] == list(range(1, 9))                   # its first quarter
    assert read["0.25:1"] == list(range(9, 33))                  # the rest: no document of the first stage


@pytest.mark.parametrize("extra,text", [
    (["--train-data-slice", "0.5", "0.5"], "--train-data-slice 0.5 0.5: need 0 <= BEGIN < END <= 1"),
    (["--train-data-slice", "0", "1.5"], "--train-data-slice 0.0 1.5: need 0 <= BEGIN < END <= 1"),
])
def test_cli_rejects_bad_data_slices(extra, text, capsys):
    mc.assert_cli_rejects(extra, text, capsys)
