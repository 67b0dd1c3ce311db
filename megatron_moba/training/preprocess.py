"""Text -> megatron indexed dataset (.bin/.idx): the library behind tools/preprocess_data.py.

Documents are read from JSONL files (one JSON object per line, text under ``json_key``) or
from a HF ``datasets`` dataset saved on disk; each becomes one document of token ids followed
by the tokenizer's end-of-document id.

Outputs are written to a temporary directory next to them and renamed into place only once
everything succeeded: a failing run leaves the previous files (and no temporary ones) behind.
An input without documents is an error, not an empty dataset.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import tempfile
from typing import Iterator, List, Optional

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_moba.training.tokenizer import build_tokenizer


class BadJSONLines(ValueError):
    pass


class EmptyInput(ValueError):
    pass


@contextlib.contextmanager
def staging_directory(target: str):
    """A temporary directory beside ``target`` (same file system: os.replace is a rename),
    removed on the way out whatever happens."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_jsonl(paths: List[str], key: str) -> Iterator[str]:
    """Texts of the JSONL files.  Lines that are not JSON objects with a string ``key`` are
    collected and reported together (file and line number), never silently dropped."""
    bad, count = [], 0
    for path in paths:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad.append(f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj[key]
                    if not isinstance(text, str):
                        raise TypeError(f"{key!r} is {type(text).__name__}, not a string")
                except (ValueError, KeyError, TypeError) as e:
                    bad.append(f"{path}:{number}: {type(e).__name__}: {e}")
                    continue
                count += 1
                yield text
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise BadJSONLines(f"{len(bad)} bad JSON line(s):\n  {shown}")
    if not count:
        raise EmptyInput(f"no documents in {', '.join(paths)}: the input is empty or blank")


def read_hf_dataset(path: str, key: str) -> Iterator[str]:
    import datasets
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if key not in ds.column_names:
        raise ValueError(f"{path} has no column {key!r} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise EmptyInput(f"no documents in {path}: the dataset has no rows")
    for number, row in enumerate(ds):
        if not isinstance(row[key], str):
            raise ValueError(f"{path}: row {number}: {key!r} is {type(row[key]).__name__}, not a string")
        yield row[key]


def train_sentencepiece(texts: Iterator[str], model_prefix: str, vocab_size: int) -> str:
    """Train a SentencePiece BPE model on the texts; returns the .model path.  ``model_prefix``
    .model/.vocab are replaced only once training succeeded; an error of the texts' reader is
    raised as itself (SentencePiece would turn it into a RuntimeError)."""
    import sentencepiece
    source = iter(texts)
    seen = {"documents": 0, "error": None}

    def guarded():
        try:
            for text in source:
                seen["documents"] += 1
                yield text
        except Exception as e:
            seen["error"] = e
    with staging_directory(model_prefix) as tmp:
        tmp_prefix = os.path.join(tmp, "spm")
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=guarded(), model_prefix=tmp_prefix, vocab_size=vocab_size, model_type="bpe",
                character_coverage=1.0, byte_fallback=True, split_digits=True, max_sentence_length=1 << 16,
                pad_id=-1, bos_id=1, eos_id=2, unk_id=0, hard_vocab_limit=False,
                num_threads=max(1, os.cpu_count() or 1), minloglevel=2)
        except RuntimeError:
            if seen["error"] is None and seen["documents"]:
                raise
        if seen["error"] is not None:
            raise seen["error"]
        if not seen["documents"]:
            raise EmptyInput("no documents to train the tokenizer on: the input is empty")
        for ext in (".vocab", ".model"):
            os.replace(tmp_prefix + ext, model_prefix + ext)
    return model_prefix + ".model"


_TOKENIZER = None


def _init_worker(tokenizer_type, tokenizer_model, vocab_size):
    global _TOKENIZER
    _TOKENIZER = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)


def _encode(text: str) -> List[int]:
    return _TOKENIZER.tokenize(text) + [_TOKENIZER.eod]


def build_indexed_dataset(texts: Iterator[str], output_prefix: str, tokenizer_type: str,
                          tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None,
                          workers: int = 1, progress: bool = True, overwrite: bool = True) -> dict:
    """Tokenize ``texts`` into ``output_prefix``.bin/.idx; returns counts.

    Both files are written under temporary names and renamed into place only on success, so a
    failure keeps an existing pair intact (and leaves no temporary files).  ``overwrite=False``
    refuses an existing pair up front.  No documents at all raise ``EmptyInput``."""
    outputs = [output_prefix + ".bin", output_prefix + ".idx"]
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{' and '.join(existing)} already exist(s): refusing to overwrite")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)
    dtype = numpy.uint16 if tokenizer.vocab_size <= 65536 else numpy.int32
    docs = tokens = 0
    with staging_directory(output_prefix) as tmp:
        tmp_prefix = os.path.join(tmp, "data")
        builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
        init = (tokenizer_type, tokenizer_model, vocab_size)
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init) if workers > 1 else None
        if pool is None:
            _init_worker(*init)
        encoded = pool.imap(_encode, texts, chunksize=16) if pool else map(_encode, texts)
        if progress:
            from tqdm import tqdm
            encoded = tqdm(encoded, desc="tokenizing", unit=" docs")
        try:
            for ids in encoded:
                builder.add_document(numpy.asarray(ids, dtype=numpy.int64), [len(ids)])
                docs += 1
                tokens += len(ids)
        finally:
            builder.data_file.close()
            if pool:
                pool.terminate()
        if not docs:
            raise EmptyInput(f"no documents to write to {output_prefix}.bin/.idx: the input is empty")
        builder.finalize(tmp_prefix + ".idx")
        os.replace(tmp_prefix + ".bin", outputs[0])
        os.replace(tmp_prefix + ".idx", outputs[1])
    return dict(documents=docs, tokens=tokens, vocab_size=tokenizer.vocab_size, eod=tokenizer.eod)


def sentencepiece_prefix(model: str) -> str:
    """The prefix SentencePiece writes PREFIX.model/.vocab under, for the path of its .model file."""
    return model[:-len(".model")] if model.endswith(".model") else model


def output_files(output_prefix: str, train_tokenizer_model: Optional[str] = None) -> List[str]:
    """The files a run writes: PREFIX.bin/.idx, and the trained tokenizer's .model/.vocab."""
    outputs = [output_prefix + ".bin", output_prefix + ".idx"]
    if train_tokenizer_model:
        model_prefix = sentencepiece_prefix(train_tokenizer_model)
        outputs += [model_prefix + ".model", model_prefix + ".vocab"]
    return outputs


def run(inputs: List[str], output_prefix: str, tokenizer_type: str, tokenizer_model: Optional[str] = None,
        vocab_size: Optional[int] = None, input_format: str = "jsonl", json_key: str = "text",
        train_tokenizer: bool = False, workers: int = 1, overwrite: bool = False) -> dict:
    """What tools/preprocess_data.py does once its flags are checked: with ``train_tokenizer``, first
    train a SentencePiece model of ``vocab_size`` pieces on the input (saved as ``tokenizer_model``,
    moved into place only after the dataset is written), then tokenize the input (JSONL files, or one
    HF dataset directory with ``input_format="hf"``) into PREFIX.bin/.idx.  Prints what it wrote;
    returns the counts of ``build_indexed_dataset``.  Bad input: ValueError or OSError."""
    model_prefix = sentencepiece_prefix(tokenizer_model) if train_tokenizer else None

    def texts():
        if input_format == "hf":
            return read_hf_dataset(inputs[0], json_key)
        return read_jsonl(inputs, json_key)
    with staging_directory(model_prefix) if model_prefix else contextlib.nullcontext() as tmp:
        if model_prefix:     # trained into tmp; moved into place after the dataset is written
            tokenizer_model = train_sentencepiece(texts(), os.path.join(tmp, "spm"), vocab_size)
            print(f"trained the tokenizer ({vocab_size} pieces)")
        stats = build_indexed_dataset(texts(), output_prefix, tokenizer_type, tokenizer_model, vocab_size,
                                      workers=workers, overwrite=overwrite)
        if model_prefix:
            for ext in (".vocab", ".model"):
                os.replace(os.path.join(tmp, "spm" + ext), model_prefix + ext)
            print(f"wrote {model_prefix}.model")
    print(f"wrote {output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens "
          f"(vocab {stats['vocab_size']}, eod {stats['eod']})")
    return stats


def stdlib_corpus(path: str, max_bytes: int, include_tests: bool = False) -> int:
    """A corpus that needs no download: the Python standard library's larger source files
    (>= 8 KB each, up to ``max_bytes`` in all, in sorted path order) written as JSONL documents
    ``{"text", "path"}`` to ``path``.  ``include_tests``: also the stdlib's own test suites
    (``test``/``tests`` packages: about 28 MB in all with them on CPython 3.11, 10 MB without).
    Returns the number of documents."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    skip = {"idlelib", "site-packages", "__pycache__"} | (set() if include_tests else {"test", "tests"})
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    total = count = 0
    with open(path, "w") as f:
        for p in files:
            size = os.path.getsize(p)
            if size < 8000 or total + size > max_bytes:
                continue
            text = open(p, encoding="utf-8", errors="replace").read()
            f.write(json.dumps({"text": text, "path": os.path.relpath(p, root)}) + "\n")
            total, count = total + size, count + 1
    return count
