"""megatron_moba.eval.positional_loss and tools/eval_positional_loss.py: buckets against per-document losses
averaged by hand, short documents left out, trailing loss, a TP=2 checkpoint at TP=1, clear errors."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

import megatron_cases as mc
from helpers import tool_exit_code

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

SEQ, WIDTH, TRAIL = 64, 16, 8                     # TINY's --seq-length; buckets 0-16 16-32 32-48 48-64
# token counts -> scored positions: 1 -> none (skipped), 5 -> 4 and 17 -> 16 (bucket 0 only), 20 -> 19 and
# 33 -> 32 (buckets 0, 1), 49 -> 48 (0-2), 64 -> 63 (all four, not trailing), 65, 70, 90 -> 64 (all, trailing)
LENGTHS = [90, 17, 1, 33, 64, 20, 65, 49, 5, 70]
DOCS_PER_BUCKET = [9, 7, 5, 4]                    # documents reaching each bucket's start, counted by hand
TRAILING_DOCS = 3                                 # 90, 65, 70


def _texts(seed=0):
    rng = np.random.default_rng(seed)
    for n in LENGTHS:                             # NullTokenizer texts; the dataset appends EOD: n - 1 ids + EOD
        yield " ".join(map(str, rng.integers(0, 200, n - 1)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_moba.training.preprocess import build_indexed_dataset
    d = tmp_path_factory.mktemp("pl")
    build_indexed_dataset(_texts(), str(d / "docs"), "NullTokenizer", vocab_size=200, progress=False)
    return d


@pytest.fixture(scope="module")
def checkpoint(data):
    ckpt = str(data / "ckpt")
    mc.run_distributed(mc.run_pretrain, mc.TINY + ["--save", ckpt])
    return ckpt


def _buckets_and_by_hand(ckpt, prefix):
    """The library's buckets (micro-batches of 3 padded documents) and the same from token_losses
    on each document alone, averaged here."""
    import torch

    from megatron_moba.eval.checkpoint import load_for_eval, token_losses
    from megatron_moba.eval.positional_loss import evaluate_checkpoint, read_documents
    docs = read_documents(prefix, SEQ + 1)
    result = evaluate_checkpoint(ckpt, docs, WIDTH, TRAIL, micro_batch_size=3)
    model, _, _ = load_for_eval(ckpt)
    per_bucket, trailing = [[] for _ in DOCS_PER_BUCKET], []
    for doc in docs:
        losses = token_losses(model, torch.from_numpy(doc[:SEQ + 1])[None])[0].tolist()
        for p, loss in enumerate(losses):
            per_bucket[p // WIDTH].append(loss)
        if len(losses) == SEQ:
            trailing += losses[-TRAIL:]
    four = evaluate_checkpoint(ckpt, read_documents(prefix, SEQ + 1, num_docs=4), WIDTH, TRAIL)
    return result, per_bucket, trailing, four


def test_buckets_agree_with_per_document_losses(data, checkpoint):
    result, per_bucket, trailing, four = mc.run_distributed(_buckets_and_by_hand, checkpoint, str(data / "docs"))[0]
    assert [b["bucket"] for b in result["buckets"]] == ["0-16", "16-32", "32-48", "48-64"]
    assert result["variant"] == "moba" and result["documents"] == 9
    assert [b["documents"] for b in result["buckets"]] == DOCS_PER_BUCKET      # short documents left out
    for b, losses in zip(result["buckets"], per_bucket):
        assert b["tokens"] == len(losses)
        assert abs(b["loss"] - sum(losses) / len(losses)) < 1e-5 * b["loss"]
    everything = [x for losses in per_bucket for x in losses]
    assert abs(result["overall_loss"] - sum(everything) / len(everything)) < 1e-5 * result["overall_loss"]
    assert result["trailing_documents"] == TRAILING_DOCS and len(trailing) == TRAILING_DOCS * TRAIL
    assert abs(result["trailing_loss"] - sum(trailing) / len(trailing)) < 1e-5 * result["trailing_loss"]
    assert four["documents"] == 4 and [b["documents"] for b in four["buckets"]] == [4, 3, 2, 2]   # 90 17 33 64


def _train_and_evaluate_tp2(argv, prefix):
    from megatron_moba.eval.positional_loss import evaluate_checkpoint, read_documents
    mc.run_pretrain(argv)
    ckpt = argv[argv.index("--save") + 1]
    return evaluate_checkpoint(ckpt, read_documents(prefix, SEQ + 1), WIDTH, TRAIL, tensor_model_parallel_size=2)


def test_tp2_checkpoint_evaluates_the_same_at_tp1(data, tmp_path):
    """Trained and evaluated at TP=2, then evaluated by the tool at TP=1 (resharded on load)."""
    ckpt = str(tmp_path / "tp2")
    argv = mc.TINY + ["--tensor-model-parallel-size", "2", "--attention", "full", "--save", ckpt]
    at_tp2 = mc.run_distributed(_train_and_evaluate_tp2, argv, str(data / "docs"), tp=2)[0]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_positional_loss.py"), "--load", ckpt,
                        "--labels", "dense", "--data-path", str(data / "docs"), "--bucket-width", str(WIDTH),
                        "--trailing-tokens", str(TRAIL), "--micro-batch-size", "4", "--out", str(tmp_path / "out"),
                        "--plot", str(tmp_path / "out" / "loss.png")],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "positional_loss.csv")))
    assert [row["bucket"] for row in rows] == ["0-16", "16-32", "32-48", "48-64", "all", f"last {TRAIL}"]
    assert all(row["label"] == "dense" and row["variant"] == "full" and row["iteration"] == "6" for row in rows)
    expected = [b["loss"] for b in at_tp2["buckets"]] + [at_tp2["overall_loss"], at_tp2["trailing_loss"]]
    for row, loss in zip(rows, expected):
        assert abs(float(row["loss"]) - loss) < 1e-5 * loss, (row, loss)
    assert [int(row["documents"]) for row in rows[:4]] == DOCS_PER_BUCKET
    assert os.path.getsize(tmp_path / "out" / "loss.png") > 10_000
    assert os.path.exists(tmp_path / "out" / "positional_loss.json")


def test_bad_inputs_fail_clearly(data, checkpoint, tmp_path, capsys, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_moba.training.preprocess import build_indexed_dataset
    builder = IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=np.uint16)
    builder.finalize(str(tmp_path / "empty.idx"))
    build_indexed_dataset(iter(["1 2 3", "4 5 6 7"]), str(tmp_path / "short"), "NullTokenizer", vocab_size=200,
                          progress=False)
    build_indexed_dataset(iter([" ".join(["250"] * 80)]), str(tmp_path / "foreign"), "NullTokenizer", vocab_size=300,
                          progress=False)
    docs = str(data / "docs")
    cases = [
        (["--load", str(tmp_path / "nope"), "--data-path", docs], f"--load {tmp_path / 'nope'}: no such checkpoint"),
        (["--load", str(tmp_path), "--data-path", docs], "not a checkpoint directory of the training job"),
        (["--load", checkpoint, "--data-path", docs, "--bucket-width", "128"],
         "--bucket-width (128) is larger than the sequence length (64)"),
        (["--load", checkpoint, "--data-path", docs, "--seq-length", "32", "--bucket-width", "48"],
         "--bucket-width (48) is larger than the sequence length (32)"),
        (["--load", checkpoint, "--data-path", str(tmp_path / "empty"), "--bucket-width", "16"],
         "the dataset has no documents"),
        (["--load", checkpoint, "--data-path", str(tmp_path / "missing"), "--bucket-width", "16"],
         f"--data-path {tmp_path / 'missing'}: "),
        (["--load", checkpoint, "--data-path", str(tmp_path / "short"), "--bucket-width", "16"],
         "no document is long enough for sequence length 64: that needs 65 tokens, the longest has 5"),
        (["--load", checkpoint, "--data-path", docs, "--bucket-width", "16", "--trailing-tokens", "65"],
         "--trailing-tokens (65) must be between 1 and the sequence length (64)"),
        (["--load", checkpoint, checkpoint, "--labels", "a", "--data-path", docs], "--labels names 1 checkpoints"),
        (["--load", checkpoint, "--data-path", str(tmp_path / "foreign"), "--bucket-width", "16"],
         "the documents hold token id 250, outside the vocabulary of"),
    ]
    for argv, text in cases:
        assert tool_exit_code(monkeypatch, "eval_positional_loss.py", *argv) == 2, argv
        assert text in capsys.readouterr().err, (argv, text)

