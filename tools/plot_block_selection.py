#!/usr/bin/env python
"""Which key blocks each query selects in one layer/head of a trained checkpoint, as a picture, and the
share of full attention's probability mass that MoBA's selection keeps.

    python tools/plot_block_selection.py --load runs/demo/ckpt_moba --layer 2 --head 1 \
        --data-path runs/demo/stdlib --doc 3 --out runs/block_selection

The input is a text file (--text-file, through the checkpoint's tokenizer), a document of an indexed
dataset (--data-path PREFIX --doc N), or random token ids (neither given: NullTokenizer checkpoints,
or any checkpoint to look at the gate on noise), cut to --length tokens (default: the checkpoint's
--seq-length).  The layer's q and k are captured as its core attention receives them (after RoPE), and
the blocks are chosen by moba_kernels.moba_select_blocks, the kernels' own gate, with the
checkpoint's --moba-chunk-size and --moba-topk (or --chunk-size / --topk to ask "what if").  Layers
that run full attention in the checkpoint still get the map of what MoBA would select there.

The kept mass of a query is the share of its full causal attention probability (fp32 softmax of
q.k / sqrt(d)) on keys of its selected blocks and its own block; it is averaged over queries, per
head and over all heads, and also over only the queries past the first topk blocks (the ones with
blocks to leave out).  Writes OUT/block_selection_layer<L>_head<H>.png and .json and prints the
kept mass.
"""
from __future__ import annotations

import argparse
import sys

from megatron_moba.training.logs import quiet_absent_backend_warnings  # light: no torch

quiet_absent_backend_warnings()
# megatron_moba.eval.block_selection (torch, megatron-core), which does the work (block_selection.run), is
# imported once the flags are parsed: `--help` answers without it


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--load", required=True, help="checkpoint directory of the training job")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--layer", type=int, required=True,
                   help="layer number, 1-based (a HybridModel: counted over its attention layers)")
    p.add_argument("--head", type=int, default=0, help="query head, 0-based (default 0)")
    p.add_argument("--text-file", default=None, help="input text, tokenized with the checkpoint's tokenizer")
    p.add_argument("--data-path", default=None, help="indexed dataset prefix (PREFIX.bin/.idx); with --doc")
    p.add_argument("--doc", type=int, default=0, help="document index in --data-path (default 0)")
    p.add_argument("--length", type=int, default=None, help="tokens of input used (default: the checkpoint's "
                   "--seq-length; longer only for RoPE checkpoints)")
    p.add_argument("--chunk-size", type=int, default=None, help="MoBA block size (default: the checkpoint's)")
    p.add_argument("--topk", type=int, default=None, help="MoBA top-k (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of random input tokens")
    p.add_argument("--label", default=None, help="name in the title (default: the checkpoint directory name)")
    p.add_argument("--out", required=True, help="directory for the PNG and JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron_moba.eval import block_selection
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")          # without CUDA: megatron-core's CPU shim
    try:
        block_selection.run(args.load, args.layer, args.out, head=args.head, text_file=args.text_file,
                            data_path=args.data_path, doc=args.doc, length=args.length, chunk_size=args.chunk_size,
                            topk=args.topk, seed=args.seed, label=args.label, iteration=args.iteration)
    except ValueError as e:         # a bad flag or input, named
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
