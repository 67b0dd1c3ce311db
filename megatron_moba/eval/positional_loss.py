"""LM loss by position within a document, for checkpoints of the training job.

    from megatron_moba.eval.positional_loss import read_documents, evaluate_checkpoint
    docs = read_documents("data/eval_text_document", max_tokens=16385, num_docs=256)
    result = evaluate_checkpoint("runs/moba/ckpt", docs, bucket_width=2048, trailing_tokens=2048)
    result["buckets"]   # [{bucket: "0k-2k", start, end, loss, tokens, documents}, ...]
    result["per_document"]  # each document's loss sums and tokens per bucket (paired comparisons)

Every document is evaluated on its own, from its first token, truncated to ``seq_length + 1``
tokens (the checkpoint's --seq-length unless given).  The loss at position p is the loss of
predicting token p+1 from tokens 0..p, so a sequence of length s scores positions 0..s-1.
Bucket [a, b) averages the losses at positions a..b-1 over the documents that reach position a
(documents with more than a+1 tokens); a shorter document is left out of that bucket, a longer
one contributes its positions inside the bucket.  The trailing loss is the mean loss of the last
N positions of the documents evaluated at the full length (at least seq_length + 1 tokens).
``run`` is what the command line, ``tools/eval_positional_loss.py``, does: every checkpoint, tables, files.
"""
from __future__ import annotations

import csv
import gc
import json
import os
from typing import List, Optional

import numpy as np
import torch

from megatron_moba.eval.checkpoint import check_parallel_sizes, eval_tokenizer, load_for_eval, saved_args
from megatron_moba.eval.stream import streamed_token_losses

CSV_FIELDS = ("label", "checkpoint", "variant", "iteration", "seq_length", "kind", "bucket", "start", "end",
              "loss", "tokens", "documents")


def bucket_name(start: int, end: int) -> str:
    """"0k-2k" where both ends are multiples of 1024 tokens, else token counts ("0-64")."""
    if start % 1024 == 0 and end % 1024 == 0:
        return f"{start // 1024}k-{end // 1024}k"
    return f"{start}-{end}"


def make_buckets(seq_length: int, width: int) -> List[tuple]:
    """[(name, start, end)] covering positions 0..seq_length-1 (the last may be narrower)."""
    if width < 1:
        raise ValueError(f"--bucket-width must be >= 1 (got {width})")
    if width > seq_length:
        raise ValueError(f"--bucket-width ({width}) is larger than the sequence length ({seq_length}): "
                         "lower --bucket-width or evaluate at a longer --seq-length")
    return [(bucket_name(a, min(a + width, seq_length)), a, min(a + width, seq_length))
            for a in range(0, seq_length, width)]


def read_documents(prefix: str, max_tokens: int, num_docs: Optional[int] = None, min_tokens: int = 2) -> list:
    """The first ``num_docs`` documents (all when None) of the indexed dataset ``prefix`` that have at
    least ``min_tokens`` tokens, each cut to its first ``max_tokens``: a list of int64 arrays."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    if not IndexedDataset.exists(prefix):
        raise FileNotFoundError(f"--data-path {prefix}: {prefix}.idx and {prefix}.bin not found "
                                "(give the prefix of a megatron indexed dataset)")
    if os.path.getsize(prefix + ".bin") == 0:                       # (megatron cannot even open it)
        raise ValueError(f"--data-path {prefix}: the dataset has no documents ({prefix}.bin is empty)")
    ds = IndexedDataset(prefix)
    if len(ds) == 0:
        raise ValueError(f"--data-path {prefix}: the dataset has no documents")
    lengths = ds.sequence_lengths                                    # [documents]
    docs = []
    for i in np.nonzero(lengths >= min_tokens)[0]:
        if num_docs is not None and len(docs) >= num_docs:
            break
        docs.append(ds.get(int(i), 0, int(min(lengths[i], max_tokens))).astype(np.int64))
    if not docs:
        raise ValueError(f"--data-path {prefix}: no document has {min_tokens} tokens or more "
                         f"(the longest has {int(lengths.max())})")
    return docs


class BucketSums:
    """Running loss sums, token and document counts per bucket, and of the trailing positions."""

    def __init__(self, buckets: List[tuple], seq_length: int, trailing_tokens: int):
        self.buckets, self.seq_length, self.trailing = buckets, seq_length, trailing_tokens
        self.sums = np.zeros(len(buckets))                            # [buckets] float64
        self.tokens = np.zeros(len(buckets), dtype=np.int64)
        self.docs = np.zeros(len(buckets), dtype=np.int64)
        self.trail_sum, self.trail_docs = 0.0, 0
        self.per_document = {}          # document index -> (bucket sums, bucket tokens, trailing sum or None)

    def add(self, losses: np.ndarray, doc: Optional[int] = None) -> None:
        """One document's losses [n], n = its token count (capped at seq_length + 1) - 1; ``doc``:
        its index, to keep its own sums (paired comparisons of two checkpoints on the same documents)."""
        n = len(losses)
        sums, tokens, trail = [0.0] * len(self.buckets), [0] * len(self.buckets), None
        for i, (_, a, b) in enumerate(self.buckets):
            if n > a:
                sums[i] = float(losses[a:min(n, b)].sum(dtype=np.float64))
                tokens[i] = min(n, b) - a
                self.sums[i] += sums[i]
                self.tokens[i] += tokens[i]
                self.docs[i] += 1
        if n == self.seq_length:
            trail = float(losses[n - self.trailing:].sum(dtype=np.float64))
            self.trail_sum += trail
            self.trail_docs += 1
        if doc is not None:
            self.per_document[doc] = (sums, tokens, trail)

    def documents(self) -> dict:
        """Per document (in document order): its loss sums and token counts per bucket and its
        trailing loss sum (None below seq_length + 1 tokens), for paired comparisons."""
        order = sorted(self.per_document)
        return dict(index=order, bucket_sums=[self.per_document[i][0] for i in order],
                    bucket_tokens=[self.per_document[i][1] for i in order],
                    trailing_sums=[self.per_document[i][2] for i in order])

    def rows(self) -> list:
        return [dict(bucket=name, start=a, end=b, loss=float(self.sums[i] / self.tokens[i]) if self.tokens[i] else None,
                     tokens=int(self.tokens[i]), documents=int(self.docs[i]))
                for i, (name, a, b) in enumerate(self.buckets)]


def document_losses(model, docs: list, seq_length: int, micro_batch_size: int = 1, pad_id: int = 0,
                    progress: bool = False):
    """Yield (document index, losses [n] float32 numpy) for every document, longest first.  Documents
    of a micro-batch are padded at the end; causal attention (MoBA's too: a query only gates blocks
    before its own) keeps the padding out of the real positions.  The losses come from
    megatron_moba.eval.stream (no [tokens, vocab] logits; under context parallelism every rank of the
    group gets every document's losses)."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    steps = range(0, len(order), micro_batch_size)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="evaluating", unit=" batches")
    for start in steps:
        idx = order[start:start + micro_batch_size]
        seqs = [docs[i][:seq_length + 1] for i in idx]
        tokens = torch.full((len(seqs), len(seqs[0])), pad_id, dtype=torch.long)   # [b, s+1]
        for j, s in enumerate(seqs):
            tokens[j, :len(s)] = torch.from_numpy(s)
        losses = streamed_token_losses(model, tokens).cpu().numpy()                   # [b, s]
        for j, i in enumerate(idx):
            yield i, losses[j, :len(seqs[j]) - 1]


def evaluate_checkpoint(load_dir: str, docs: list, bucket_width: int = 2048, trailing_tokens: Optional[int] = None,
                        seq_length: Optional[int] = None, micro_batch_size: int = 1, label: Optional[str] = None,
                        tensor_model_parallel_size: int = 1, progress: bool = False,
                        iteration: Optional[int] = None, context_parallel_size: int = 1,
                        tokenizer: Optional[dict] = None) -> dict:
    """Positional and trailing loss of one checkpoint on ``docs`` (see the module docstring), on
    ``tensor_model_parallel_size`` x ``context_parallel_size`` processes (every rank returns the result).
    ``iteration``: a saved iteration other than the latest (a learning curve's points); ``tokenizer``:
    overrides of the saved tokenizer flags (``tokenizer_overrides``)."""
    check_checkpoint(load_dir)
    saved = saved_args(load_dir, iteration)
    vars(saved).update(tokenizer or {})
    s = seq_length or saved.seq_length
    buckets = make_buckets(s, bucket_width)
    trailing = bucket_width if trailing_tokens is None else trailing_tokens
    if not 1 <= trailing <= s:
        raise ValueError(f"--trailing-tokens ({trailing}) must be between 1 and the sequence length ({s})")
    longest = max(len(d) for d in docs)
    if longest < s + 1:
        raise ValueError(f"no document is long enough for sequence length {s}: that needs {s + 1} tokens, the longest "
                         f"has {longest} (lower --seq-length, or evaluate on --data-path with longer documents)")
    vocab = eval_tokenizer(saved, load_dir, iteration).vocab_size
    top = max(int(d.max()) for d in docs)
    if top >= vocab:
        raise ValueError(f"the documents hold token id {top}, outside the vocabulary of {load_dir} ({vocab}): "
                         "were they tokenized with the checkpoint's tokenizer?")
    model, args, tokenizer = load_for_eval(load_dir, iteration, seq_length=s,
                                           tensor_model_parallel_size=tensor_model_parallel_size,
                                           context_parallel_size=context_parallel_size, **(tokenizer or {}))
    sums = BucketSums(buckets, s, trailing)
    for doc, losses in document_losses(model, docs, s, micro_batch_size, tokenizer.eod, progress):
        sums.add(losses, doc)
    rows = sums.rows()
    evaluated = sum(r["tokens"] for r in rows)
    result = dict(label=label or default_label(load_dir), checkpoint=load_dir, variant=args.attention,
                  iteration=iteration or _iteration(load_dir), seq_length=s, bucket_width=bucket_width,
                  moba_chunk_size=args.moba_chunk_size, moba_topk=args.moba_topk, documents=len(docs),
                  overall_loss=float(sum(sums.sums) / evaluated), overall_tokens=int(evaluated), buckets=rows,
                  trailing_tokens=trailing, trailing_documents=sums.trail_docs,
                  trailing_loss=sums.trail_sum / (sums.trail_docs * trailing) if sums.trail_docs else None,
                  per_document=sums.documents())
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def check_checkpoint(load_dir: str) -> None:
    from megatron_moba.training.checkpointing import LATEST
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"--load {load_dir}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(load_dir, LATEST)):
        raise FileNotFoundError(f"--load {load_dir}: not a checkpoint directory of the training job (no {LATEST})")


def _iteration(load_dir: str) -> int:
    from megatron_moba.training.checkpointing import read_latest
    return read_latest(load_dir)


def default_label(load_dir: str) -> str:
    return os.path.basename(os.path.normpath(load_dir))


def result_rows(result: dict) -> list:
    """CSV rows of one checkpoint: its buckets, then "all" positions and the trailing positions."""
    head = {k: result[k] for k in ("label", "checkpoint", "variant", "iteration", "seq_length")}
    s, n = result["seq_length"], result["trailing_tokens"]
    rows = [dict(head, kind="bucket", **b) for b in result["buckets"]]
    rows.append(dict(head, kind="all", bucket="all", start=0, end=s, loss=result["overall_loss"],
                     tokens=result["overall_tokens"], documents=result["documents"]))
    if result["trailing_loss"] is not None:
        rows.append(dict(head, kind="trailing", bucket=f"last {n}", start=s - n, end=s, loss=result["trailing_loss"],
                         tokens=n * result["trailing_documents"], documents=result["trailing_documents"]))
    return rows


def write_results(results: list, out_dir: str, name: str = "positional_loss") -> tuple:
    """DIR/NAME.json (everything) and DIR/NAME.csv (one row per checkpoint and bucket)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, name + ".json"), os.path.join(out_dir, name + ".csv")
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            w.writerows(result_rows(r))
    return paths


def plot_results(results: list, path: str) -> str:
    """Loss against position (bucket midpoints), one line per checkpoint; MoBA solid, full dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in results:
        pts = [((b["start"] + b["end"]) / 2, b["loss"]) for b in r["buckets"] if b["loss"] is not None]
        ax.plot(*zip(*pts), "o-" if r["variant"] == "moba" else "s--", label=f"{r['label']} ({r['variant']})")
    ax.set_xlabel("position in document (tokens, bucket midpoint)")
    ax.set_ylabel("LM loss")
    ax.set_title(f"LM loss by position (buckets of {results[0]['bucket_width']} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def run(loads: List[str], data_path: str, labels: Optional[List[str]] = None, num_docs: Optional[int] = None,
        seq_length: Optional[int] = None, bucket_width: int = 2048, trailing_tokens: Optional[int] = None,
        micro_batch_size: int = 1, tensor_model_parallel_size: int = 1, out: Optional[str] = None,
        plot: Optional[str] = None, progress: bool = True, context_parallel_size: int = 1,
        tokenizer: Optional[dict] = None) -> list:
    """What tools/eval_positional_loss.py does: check the flags and checkpoints, read the documents,
    evaluate every checkpoint, then (rank 0 only) print each one's buckets, write OUT/positional_loss
    .json/.csv (``out``) and the plot (``plot``).  Returns the results.  A bad flag or input: ValueError
    or FileNotFoundError naming the flag.  Without CUDA the caller applies the CPU shim first
    (megatron_moba.training.compat.apply_patches)."""
    labels = labels or [default_label(d) for d in loads]
    if len(labels) != len(loads):
        raise ValueError(f"--labels names {len(labels)} checkpoints, --load gives {len(loads)}")
    if num_docs is not None and num_docs < 1:
        raise ValueError("--num-docs must be >= 1")
    check_parallel_sizes(tensor_model_parallel_size, context_parallel_size)
    lengths = []
    for d in loads:
        check_checkpoint(d)
        lengths.append(seq_length or saved_args(d).seq_length)
        make_buckets(lengths[-1], bucket_width)          # a too-wide bucket fails before any loading
    docs = read_documents(data_path, max(lengths) + 1, num_docs)
    import torch.distributed as dist
    first = not dist.is_initialized() or dist.get_rank() == 0
    results = [evaluate_checkpoint(d, docs, bucket_width, trailing_tokens, seq_length, micro_batch_size, label,
                                   tensor_model_parallel_size, progress=progress and first,
                                   context_parallel_size=context_parallel_size, tokenizer=tokenizer)
               for d, label in zip(loads, labels)]
    if dist.is_initialized() and dist.get_rank() != 0:
        return results
    for r in results:
        trailing = (f", last {r['trailing_tokens']} positions {r['trailing_loss']:.4f} "
                    f"({r['trailing_documents']} documents)" if r["trailing_loss"] else "")
        print(f"\n{r['label']} ({r['variant']}, iteration {r['iteration']}, {r['documents']} documents): "
              f"loss {r['overall_loss']:.4f}" + trailing)
        for b in r["buckets"]:
            loss = "-" if b["loss"] is None else f"{b['loss']:.4f}"
            print(f"  {b['bucket']:>12}  loss {loss:>7}  ({b['tokens']} tokens, {b['documents']} documents)")
    if out:
        for path in write_results(results, out):
            print(f"wrote {path}")
    if plot:
        print(f"wrote {plot_results(results, plot)}")
    return results
