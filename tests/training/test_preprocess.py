"""tools/preprocess_data.py: exact tokens with EOD between documents, bad lines reported, and no
data loss: existing outputs refused without --overwrite, replaced only by a run that succeeds."""
import json
import os
import subprocess
import sys

import numpy
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i} " + "word " * (i % 5) for i in range(120)]


def _write_jsonl(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *args],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from megatron_moba.training.preprocess import train_sentencepiece
    d = tmp_path_factory.mktemp("spm")
    return train_sentencepiece(iter(DOCS), str(d / "spm"), 400)


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_gives_exactly_the_tokenizer_tokens(tmp_path, spm_model, workers):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_moba.training.tokenizer import build_tokenizer
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


# ------------------------------------------------------------------ no data loss

NUMBERS = [json.dumps({"text": " ".join(str(1 + (i + j) % 90) for j in range(5 + i % 4))}) for i in range(12)]


def _null(inp, prefix, *extra):
    return _tool("--input", str(inp), "--output-prefix", str(prefix), "--tokenizer-type", "NullTokenizer",
                 "--vocab-size", "100", *extra)


def _snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.fixture
def existing(tmp_path):
    """A directory holding an input and a dataset already written from it."""
    _write_jsonl(tmp_path / "in.jsonl", NUMBERS)
    r = _null(tmp_path / "in.jsonl", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    return tmp_path


def test_existing_prefix_is_refused_without_overwrite(existing):
    _write_jsonl(existing / "other.jsonl", NUMBERS[:3])
    before = _snapshot(existing)
    r = _null(existing / "other.jsonl", existing / "out")
    assert r.returncode != 0
    assert "out.bin" in r.stderr and "out.idx" in r.stderr and "--overwrite" in r.stderr
    assert _snapshot(existing) == before
    r = _null(existing / "other.jsonl", existing / "out", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "3 documents" in r.stdout
    assert sorted(os.listdir(existing)) == sorted(before)            # nothing but the outputs changed


def test_failed_overwrite_keeps_the_previous_dataset_and_leaves_no_temporary_files(existing):
    (existing / "bad-json.jsonl").write_text(NUMBERS[0] + "\n{oops\n")
    (existing / "empty.jsonl").write_text("")
    (existing / "latin1.jsonl").write_bytes((NUMBERS[0] + "\n").encode() + b'{"text": "caf\xe9"}\n')
    before = _snapshot(existing)
    for bad in ("bad-json", "empty", "latin1"):
        r = _null(existing / f"{bad}.jsonl", existing / "out", "--overwrite")
        assert r.returncode == 1, (bad, r.stderr)
        assert _snapshot(existing) == before, bad      # old .bin and .idx intact, no temporary files


def test_empty_input_is_an_error_naming_the_file(tmp_path):
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        (tmp_path / name).write_text(content)
        r = _null(tmp_path / name, tmp_path / "out")
        assert r.returncode == 1
        assert f"no documents in {tmp_path / name}" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["blank.jsonl", "empty.jsonl"]


def test_non_utf8_input_names_file_and_line(tmp_path):
    with open(tmp_path / "latin1.jsonl", "wb") as f:
        f.write((NUMBERS[0] + "\n").encode() + b'{"text": "caf\xe9"}\n' + (NUMBERS[1] + "\n").encode())
    r = _null(tmp_path / "latin1.jsonl", tmp_path / "out")
    assert r.returncode == 1
    assert f"{tmp_path / 'latin1.jsonl'}:2: not UTF-8 (byte 0xe9 at column 14)" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["latin1.jsonl"]


def test_train_tokenizer_keeps_an_existing_model(tmp_path):
    """--train-tokenizer refuses an existing .model without --overwrite, and a failing run with
    --overwrite keeps it (the model is moved into place only with the dataset)."""
    _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in DOCS])
    (tmp_path / "tok.model").write_bytes(b"the model other datasets were tokenized with")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "tok.model"), "--train-tokenizer",
            "--vocab-size", "400"]
    r = _tool(*args)
    assert r.returncode != 0 and "tok.model" in r.stderr and "--overwrite" in r.stderr
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write("{broken\n")
    r = _tool(*args, "--overwrite")
    assert r.returncode == 1 and "in.jsonl:121:" in r.stderr
    assert (tmp_path / "tok.model").read_bytes() == b"the model other datasets were tokenized with"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "tok.model"]


def test_preprocessing_prints_no_apex_warnings(tmp_path):
    _write_jsonl(tmp_path / "in.jsonl", NUMBERS)
    r = _null(tmp_path / "in.jsonl", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "Apex" not in r.stderr and "Transformer Engine" not in r.stderr
