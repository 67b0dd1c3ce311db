#!/usr/bin/env python
"""LM loss by position within documents, in buckets, for one or more checkpoints of the training job.

    python tools/eval_positional_loss.py --load runs/moba/ckpt runs/full/ckpt --labels moba full \
        --data-path data/eval_text_document --bucket-width 2048 --trailing-tokens 2048 --num-docs 256 \
        --out results/positional --plot results/positional/loss_by_position.png

Each document of the indexed dataset --data-path is evaluated from its own start, cut to the
checkpoint's --seq-length (or --seq-length) + 1 tokens.  A bucket [a, b) averages the per-token
losses at positions a..b-1 of the documents that reach position a; the trailing loss averages
the last --trailing-tokens positions of the documents evaluated at the full length.  Writes
OUT/positional_loss.json and OUT/positional_loss.csv (label, checkpoint, variant, bucket, start,
end, loss, tokens, documents, ...); --plot draws loss against position for every checkpoint.
Checkpoints saved at any TP/PP/CP load at TP=1, or at the TP of `torchrun --nproc-per-node N ...
--tensor-model-parallel-size N`.
"""
from __future__ import annotations

import argparse
import sys

from megatron_moba.training.logs import quiet_absent_backend_warnings  # light: no torch

quiet_absent_backend_warnings()
# megatron_moba.eval.positional_loss (torch, megatron-core) is imported once the flags are parsed:
# `--help` answers without it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", nargs="+", required=True, help="checkpoint directories (the training job's --save)")
    p.add_argument("--labels", nargs="+", default=None, help="one name per --load (default: directory names)")
    p.add_argument("--data-path", required=True, help="prefix of a megatron indexed dataset (.bin/.idx)")
    p.add_argument("--num-docs", "--max-docs", dest="num_docs", type=int, default=None,
                   help="evaluate the first N documents (default: all)")
    p.add_argument("--seq-length", type=int, default=None, help="evaluation length (default: each checkpoint's)")
    p.add_argument("--bucket-width", type=int, default=2048, help="positions per bucket")
    p.add_argument("--trailing-tokens", type=int, default=None, help="trailing loss over the last N positions "
                   "(default: --bucket-width)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="documents per forward pass")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--out", default=None, help="directory for positional_loss.json and .csv")
    p.add_argument("--plot", default=None, help="PNG of loss against position")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")          # without CUDA: megatron-core's CPU shim
    from megatron_moba.eval import positional_loss as pl
    labels = args.labels or [pl.default_label(d) for d in args.load]
    try:
        if len(labels) != len(args.load):
            raise ValueError(f"--labels names {len(labels)} checkpoints, --load gives {len(args.load)}")
        if args.num_docs is not None and args.num_docs < 1:
            raise ValueError("--num-docs must be >= 1")
        lengths = []
        for d in args.load:
            pl.check_checkpoint(d)
            lengths.append(args.seq_length or pl.saved_args(d).seq_length)
            pl.make_buckets(lengths[-1], args.bucket_width)          # a too-wide bucket fails before any loading
        docs = pl.read_documents(args.data_path, max(lengths) + 1, args.num_docs)
        results = []
        for d, label in zip(args.load, labels):
            results.append(pl.evaluate_checkpoint(
                d, docs, args.bucket_width, args.trailing_tokens, args.seq_length, args.micro_batch_size, label,
                args.tensor_model_parallel_size, progress=True))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    for r in results:
        trailing = (f", last {r['trailing_tokens']} positions {r['trailing_loss']:.4f} "
                    f"({r['trailing_documents']} documents)" if r["trailing_loss"] else "")
        print(f"\n{r['label']} ({r['variant']}, iteration {r['iteration']}, {r['documents']} documents): "
              f"loss {r['overall_loss']:.4f}" + trailing)
        for b in r["buckets"]:
            loss = "-" if b["loss"] is None else f"{b['loss']:.4f}"
            print(f"  {b['bucket']:>12}  loss {loss:>7}  ({b['tokens']} tokens, {b['documents']} documents)")
    if args.out:
        for path in pl.write_results(results, args.out):
            print(f"wrote {path}")
    if args.plot:
        print(f"wrote {pl.plot_results(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
