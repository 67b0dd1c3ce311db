"""A sweep's data: with ``data.stdlib_corpus``, the corpus (the Python standard library's sources,
no download), a SentencePiece tokenizer and indexed training and held-out evaluation datasets,
built once under OUT/data; with given datasets, a check that they exist.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

from megatron_moba.eval.sweep.plan import data_paths


def prepare_data(desc: dict, out: str, write_corpus: Optional[Callable] = None, log=print) -> None:
    """For ``data.stdlib_corpus``: corpus JSONL (``write_corpus(path, max_bytes, include_tests)``, default
    ``preprocess.stdlib_corpus``), every eval_every-th
    document held out for evaluation, SentencePiece trained on the rest, two indexed datasets."""
    cfg = desc["data"]["stdlib_corpus"]
    paths = data_paths(desc, os.path.abspath(out))
    if cfg is None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        for key in ("eval",) if paths["mock"] else ("train", "eval"):
            if not IndexedDataset.exists(paths[key]):
                raise ValueError(f"data.{key}: {paths[key]}.bin/.idx not found")
        return
    if all(os.path.exists(p) for p in (paths["train"] + ".idx", paths["eval"] + ".idx", paths["tokenizer_model"])):
        return
    t0 = time.time()
    from megatron_moba.training.preprocess import build_indexed_dataset, stdlib_corpus, train_sentencepiece
    write_corpus = write_corpus or stdlib_corpus
    corpus = os.path.join(os.path.dirname(paths["train"]), "corpus.jsonl")
    os.makedirs(os.path.dirname(corpus), exist_ok=True)
    n = write_corpus(corpus, cfg["max_bytes"], cfg["include_tests"])
    texts = [json.loads(line)["text"] for line in open(corpus)]
    every, floor = cfg["eval_every"], cfg.get("eval_min_bytes", 0)
    # held out: every eval_every-th document (of those of eval_min_bytes or more: long-context evaluation)
    candidates = [i for i, t in enumerate(texts) if len(t.encode()) >= floor]
    held = set(candidates[every - 1::every])
    train = [t for i, t in enumerate(texts) if i not in held]
    held_out = [t for i, t in enumerate(texts) if i in held]
    if not held_out or not train:
        raise ValueError(f"data.stdlib_corpus: {n} documents, eval_every {every}: nothing left to "
                         f"{'evaluate' if train else 'train'} on")
    tok = train_sentencepiece(iter(train), paths["tokenizer_model"][:-len(".model")], cfg["vocab_size"])
    stats = [build_indexed_dataset(iter(t), paths[k], "SentencePieceTokenizer", tok, progress=False)
             for k, t in (("train", train), ("eval", held_out))]
    log(f"data: {n} documents -> {stats[0]['tokens']} training tokens ({stats[0]['documents']} documents), "
        f"{stats[1]['documents']} held-out documents ({stats[1]['tokens']} tokens), "
        f"vocabulary {stats[0]['vocab_size']}")
    info = dict(documents=n, train=stats[0], eval=stats[1], wall_s=round(time.time() - t0, 1),
                sha256={os.path.basename(p + x): file_sha256(p + x) for p in (paths["train"], paths["eval"])
                        for x in (".bin", ".idx")})
    with open(data_info_path(desc, out), "w") as f:
        json.dump(info, f, indent=1)


def data_info_path(desc: dict, out: str) -> str:
    """OUT/data/data.json: what ``prepare_data`` built (documents, tokens, build time, file hashes)."""
    return os.path.join(os.path.dirname(data_paths(desc, os.path.abspath(out))["train"]), "data.json")


def file_sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
