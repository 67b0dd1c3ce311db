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
import json
import os
import sys

from megatron_moba.training.logs import quiet_absent_backend_warnings  # light: no torch

quiet_absent_backend_warnings()
# megatron_moba.eval.block_selection and the model code (torch, megatron-core) are imported once the
# flags are parsed: `--help` answers without them


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--load", required=True, help="checkpoint directory of the training job")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--layer", type=int, required=True, help="layer number, 1-based")
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


def check(args):
    """Flag checks against the checkpoint's saved flags, before any model is built."""
    from megatron_moba.eval.checkpoint import saved_args
    from megatron_moba.eval.needle import check_lengths
    try:
        saved = saved_args(args.load, args.iteration)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--load {args.load}: {e}") from None
    if not 1 <= args.layer <= saved.num_layers:
        raise ValueError(f"--layer {args.layer} is out of range: the checkpoint has layers 1..{saved.num_layers} "
                         "(1-based)")
    if not 0 <= args.head < saved.num_attention_heads:
        raise ValueError(f"--head {args.head} is out of range: the checkpoint has heads "
                         f"0..{saved.num_attention_heads - 1} (0-based)")
    for flag, value in (("--chunk-size", args.chunk_size), ("--topk", args.topk)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    length = args.length or saved.seq_length
    return saved, length, check_lengths(saved, [length], "--length")


def main(argv=None) -> int:
    args = parse(argv)
    try:
        saved, length, eval_seq_length = check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_moba.eval import block_selection as bs
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")          # without CUDA: megatron-core's CPU shim
    from megatron_moba.eval.checkpoint import load_for_eval
    model, margs, tokenizer = load_for_eval(args.load, args.iteration, seq_length=eval_seq_length)
    try:
        tokens, what = bs.input_tokens(tokenizer, length, args.text_file, args.data_path, args.doc, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chunk = args.chunk_size or margs.moba_chunk_size
    topk = args.topk or margs.moba_topk
    cap = bs.capture_qkv(model, args.layer, tokens)                       # q [S, Hq, d], k [S, Hkv, d]
    sel = bs.select(cap.q, cap.k, chunk, topk)                            # [S, Hq, topk]
    kept = bs.kept_mass(cap.q, cap.k, sel, chunk, cap.softmax_scale)      # [S, Hq]
    summary = bs.summarize(kept, chunk, topk)
    heads, kv_heads = cap.q.shape[1], cap.k.shape[1]
    kv_head = args.head // (heads // kv_heads)
    is_moba = model.config.is_moba_layer(args.layer)
    label = args.label or os.path.basename(os.path.normpath(args.load))
    if not is_moba:
        note = (f"\n(layer {args.layer} runs full attention in this checkpoint: the map shows what MoBA would "
                "select there)")
    elif (chunk, topk) != (margs.moba_chunk_size, margs.moba_topk):
        note = (f"\n(layer {args.layer} was trained with chunk {margs.moba_chunk_size}, top-{margs.moba_topk}: "
                "the map shows what MoBA with these settings would select)")
    else:
        note = ""
    head_kept = summary["per_head"][args.head]
    title = (f"{label}: layer {args.layer}, head {args.head} (kv head {kv_head}), MoBA chunk {chunk}, top-{topk}, "
             f"input: {what}, {len(tokens)} tokens\nkept attention mass: head {head_kept:.3f}, all heads "
             f"{summary['overall']:.3f}{note}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"block_selection_layer{args.layer}_head{args.head}")
    bs.plot_selection(bs.selection_map(sel[:, args.head], chunk), chunk, title, stem + ".png")
    result = dict(load=args.load, label=label, layer=args.layer, head=args.head, kv_head=kv_head,
                  layer_attention="moba" if is_moba else "full", variant=margs.attention, chunk_size=chunk,
                  topk=topk, trained_chunk_size=margs.moba_chunk_size, trained_topk=margs.moba_topk,
                  tokens=len(tokens), blocks=-(-len(tokens) // chunk), input=what, kept_mass=summary)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    choice = summary["queries_with_a_choice"]
    print(f"layer {args.layer} ({result['layer_attention']} in the checkpoint), chunk {chunk}, top-{topk}, "
          f"{len(tokens)} tokens: kept attention mass {summary['overall']:.4f} over all heads, "
          f"head {args.head}: {head_kept:.4f}")
    if choice["overall"] is not None:
        print(f"  queries past the first {topk} blocks ({choice['queries']}): {choice['overall']:.4f} over all heads, "
              f"per head {' '.join(f'{x:.4f}' for x in choice['per_head'])}")
    print(f"wrote {stem}.png\nwrote {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
