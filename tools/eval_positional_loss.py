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
Checkpoints saved at any TP/PP/CP load at TP=1, or at the TP and CP of `torchrun --nproc-per-node
TP*CP ... --tensor-model-parallel-size TP --context-parallel-size CP` (every rank evaluates every
document, its share of the sequence under CP; the answers are one process's).  Memory is linear in
the tokens: no [tokens, vocabulary] logits are held (megatron_moba/eval/stream.py).
"""
from __future__ import annotations

import argparse
import sys

from megatron_moba.training.logs import quiet_absent_backend_warnings  # light: no torch

quiet_absent_backend_warnings()
# megatron_moba.eval.positional_loss (torch, megatron-core), which does the work (positional_loss.run), is
# imported once the flags are parsed: `--help` answers without it


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
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP ranks (torchrun)")
    p.add_argument("--context-parallel-size", type=int, default=1,
                   help="CP ranks (torchrun)")
    p.add_argument("--tokenizer-type", default=None, choices=["HuggingFaceTokenizer", "SentencePieceTokenizer"],
                   help="instead of the checkpoint's tokenizer (a model imported from HF without one)")
    p.add_argument("--tokenizer-model", default=None, help="the tokenizer's file or directory")
    p.add_argument("--out", default=None, help="directory for positional_loss.json and .csv")
    p.add_argument("--plot", default=None, help="PNG of loss against position")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")          # without CUDA: megatron-core's CPU shim
    from megatron_moba.eval import positional_loss
    from megatron_moba.eval.checkpoint import tokenizer_overrides
    try:
        positional_loss.run(args.load, args.data_path, labels=args.labels, num_docs=args.num_docs,
                            seq_length=args.seq_length, bucket_width=args.bucket_width,
                            trailing_tokens=args.trailing_tokens, micro_batch_size=args.micro_batch_size,
                            tensor_model_parallel_size=args.tensor_model_parallel_size, out=args.out, plot=args.plot,
                            context_parallel_size=args.context_parallel_size,
                            tokenizer=tokenizer_overrides(args.tokenizer_type, args.tokenizer_model))
    except (ValueError, FileNotFoundError) as e:      # a bad flag or input, named
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
