"""tools/preprocess_data.py: exact tokens with EOD between documents, bad lines reported."""
import json
import os
import subprocess
import sys

import numpy
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i} " + "word " * (i % 5) for i in range(120)]


def _write_jsonl(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *args],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from megatron_moba.preprocess import train_sentencepiece
    d = tmp_path_factory.mktemp("spm")
    return train_sentencepiece(iter(DOCS), str(d / "spm"), 400)


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_gives_exactly_the_tokenizer_tokens(tmp_path, spm_model, workers):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_moba.tokenizer import build_tokenizer
    _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)])
    r = _tool("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm_model, "--workers", str(workers))
    assert r.returncode == 0, r.stderr
    tok = build_tokenizer("SentencePieceTokenizer", spm_model)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert len(ds) == len(DOCS)
    for i, text in enumerate(DOCS):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]
    assert numpy.count_nonzero(numpy.concatenate([ds[i] for i in range(len(ds))]) == tok.eod) == len(DOCS)


def test_bad_json_lines_are_reported_with_line_numbers(tmp_path, spm_model):
    lines = [json.dumps({"text": DOCS[0]}), "{not json", json.dumps({"body": "x"}), json.dumps({"text": 3}),
             json.dumps({"text": DOCS[1]})]
    _write_jsonl(tmp_path / "bad.jsonl", lines)
    r = _tool("--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "out"),
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm_model)
    assert r.returncode == 1
    assert "3 bad JSON line(s)" in r.stderr
    for n in (2, 3, 4):
        assert f"bad.jsonl:{n}:" in r.stderr
    assert not os.path.exists(tmp_path / "out.bin") and not os.path.exists(tmp_path / "out.idx")


def test_train_tokenizer_then_preprocess(tmp_path):
    _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in DOCS])
    r = _tool("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "tok.model"),
              "--train-tokenizer", "--vocab-size", "400")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "tok.model") and os.path.exists(tmp_path / "out.idx")
    assert "120 documents" in r.stdout
