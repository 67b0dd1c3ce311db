#!/usr/bin/env python
"""Passkey (needle-in-a-haystack) retrieval of checkpoints across context lengths and needle depths.

    python tools/eval_needle.py --load runs/demo/ckpt_moba runs/demo/ckpt_full --labels moba full \
        --lengths 256 512 1024 --depths 0 0.25 0.5 0.75 1 --trials 10 --out runs/needle

Each cell (length, depth) runs ``--trials`` random passkeys (the same ones in every cell): the
needle "The pass key is 48213. Remember it. 48213 is the pass key." sits at that fraction of the
filler, the prompt ends "What is the pass key? The pass key is", and a trial is correct when the
model's greedy continuation reproduces the passkey's tokens.  ``length`` counts the prompt and the
answer tokens.  NullTokenizer checkpoints get an integer-id version of the same task (see
megatron_moba/needle.py).  Lengths beyond a checkpoint's --seq-length are allowed for RoPE models.

Writes OUT/needle.csv (label, variant, length, depth, accuracy, trials), OUT/needle.json (the same
plus every trial's passkey and greedy output) and OUT/needle_<label>.png (depth x length heat map);
prints the accuracy table.  The variant is the checkpoint's saved --attention (moba or full).
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_moba.training.logs import quiet_absent_backend_warnings  # light: no torch

quiet_absent_backend_warnings()
# megatron_moba.eval.needle and the model code (torch, megatron-core) are imported once the flags are
# parsed: `--help` answers without them


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--load", nargs="+", required=True, help="checkpoint directories of the training job")
    p.add_argument("--labels", nargs="+", default=None, help="one name per --load (default: the directory names)")
    p.add_argument("--lengths", nargs="+", type=int, required=True, help="context lengths in tokens")
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle positions as a fraction of the filler (0 = start, 1 = right before the question)")
    p.add_argument("--trials", type=int, default=10, help="random passkeys per cell")
    p.add_argument("--digits", type=int, default=5, help="digits of a passkey")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--out", required=True, help="directory for needle.csv, needle.json and the heat maps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check(args) -> list:
    """Flag checks before any model is built; returns each checkpoint's saved flags."""
    from megatron_moba.eval import needle
    from megatron_moba.eval.checkpoint import saved_args
    if args.labels is not None and len(args.labels) != len(args.load):
        raise ValueError(f"--labels has {len(args.labels)} names for {len(args.load)} --load checkpoints")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise ValueError(f"--depths must be fractions in [0, 1], got {args.depths}")
    for flag, value in (("--trials", args.trials), ("--digits", args.digits), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    saved = []
    for load in args.load:
        try:
            saved.append(saved_args(load, args.iteration))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--load {load}: {e}") from None
        needle.check_lengths(saved[-1], args.lengths)
    return saved


def main(argv=None) -> int:
    args = parse(argv)
    try:
        saved = check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_moba.eval import needle
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")          # without CUDA: megatron-core's CPU shim
    from megatron_moba.eval.checkpoint import load_for_eval
    labels = args.labels or [os.path.basename(os.path.normpath(p)) for p in args.load]
    passkeys = needle.make_passkeys(args.trials, args.digits, args.seed)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for load, label, flags in zip(args.load, labels, saved):
        seq_length = needle.check_lengths(flags, args.lengths)     # None: the trained length suffices
        model, margs, tokenizer = load_for_eval(load, args.iteration, seq_length=seq_length)
        builder = needle.PromptBuilder(tokenizer)
        try:
            for key in passkeys:
                builder.build(min(args.lengths), 0.0, key)
        except ValueError as e:
            print(f"error: {label}: {e}", file=sys.stderr)
            return 2
        mine = needle.evaluate(needle.model_logits_fn(model, tokenizer.vocab_size), builder, args.lengths,
                               sorted(args.depths), passkeys, args.batch_size, progress=not args.no_progress)
        info = dict(label=label, variant=margs.attention, load=load, moba_chunk_size=margs.moba_chunk_size,
                    moba_topk=margs.moba_topk, trained_seq_length=flags.seq_length)
        mine = [dict(info, **r) for r in mine]
        rows += mine
        png = needle.plot_heatmap(mine, os.path.join(args.out, f"needle_{needle.safe_name(label)}.png"))
        print(f"wrote {png}")
        del model
    print(needle.format_table(rows))
    for path in needle.write_table(rows, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
