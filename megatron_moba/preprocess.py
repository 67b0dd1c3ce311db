"""Text -> megatron indexed dataset (.bin/.idx): the library behind tools/preprocess_data.py.

Documents are read from JSONL files (one JSON object per line, text under ``json_key``) or
from a HF ``datasets`` dataset saved on disk; each becomes one document of token ids followed
by the tokenizer's end-of-document id.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from typing import Iterator, List, Optional

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from .tokenizer import build_tokenizer


class BadJSONLines(ValueError):
    pass


def read_jsonl(paths: List[str], key: str) -> Iterator[str]:
    """Texts of the JSONL files.  Lines that are not JSON objects with a string ``key`` are
    collected and reported together (file and line number), never silently dropped."""
    bad = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
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
                yield text
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise BadJSONLines(f"{len(bad)} bad JSON line(s):\n  {shown}")


def read_hf_dataset(path: str, key: str) -> Iterator[str]:
    import datasets
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if key not in ds.column_names:
        raise ValueError(f"{path} has no column {key!r} (columns: {ds.column_names})")
    for row in ds:
        yield row[key]


def train_sentencepiece(texts: Iterator[str], model_prefix: str, vocab_size: int) -> str:
    """Train a SentencePiece BPE model on the texts; returns the .model path."""
    import sentencepiece
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, max_sentence_length=1 << 16,
        pad_id=-1, bos_id=1, eos_id=2, unk_id=0, hard_vocab_limit=False, num_threads=max(1, os.cpu_count() or 1), minloglevel=2)
    return model_prefix + ".model"


_TOKENIZER = None


def _init_worker(tokenizer_type, tokenizer_model, vocab_size):
    global _TOKENIZER
    _TOKENIZER = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)


def _encode(text: str) -> List[int]:
    return _TOKENIZER.tokenize(text) + [_TOKENIZER.eod]


def build_indexed_dataset(texts: Iterator[str], output_prefix: str, tokenizer_type: str,
                          tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None,
                          workers: int = 1, progress: bool = True) -> dict:
    """Tokenize ``texts`` into ``output_prefix``.bin/.idx; returns counts."""
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)
    dtype = numpy.uint16 if tokenizer.vocab_size <= 65536 else numpy.int32
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(output_prefix + ".bin", dtype=dtype)
    docs = tokens = 0
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
    except BaseException:
        builder.data_file.close()
        os.remove(output_prefix + ".bin")        # no half-written dataset is left behind
        raise
    finally:
        if pool:
            pool.terminate()
    builder.finalize(output_prefix + ".idx")
    return dict(documents=docs, tokens=tokens, vocab_size=tokenizer.vocab_size, eod=tokenizer.eod)


def stdlib_corpus(path: str, max_bytes: int) -> int:
    """A corpus that needs no download: the Python standard library's larger source files
    (>= 8 KB each, up to ``max_bytes`` in all) written as JSONL documents ``{"text", "path"}``
    to ``path``.  Returns the number of documents."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("test", "tests", "idlelib", "site-packages", "__pycache__"))
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
