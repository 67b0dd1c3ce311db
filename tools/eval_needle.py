#!/usr/bin/env python
"""Passkey (needle-in-a-haystack) retrieval of checkpoints across context lengths and needle depths.

    python tools/eval_needle.py --load runs/demo/ckpt_moba runs/demo/ckpt_full --labels moba full \
        --lengths 256 512 1024 --depths 0 0.25 0.5 0.75 1 --trials 10 --out runs/needle

Each cell (length, depth) runs ``--trials`` random passkeys (the same ones in every cell): the
needle "The pass key is 48213. Remember it. 48213 is the pass key." sits at that fraction of the
filler, the prompt ends "What is the pass key? The pass key is", and a trial is correct when the
model's greedy continuation reproduces the passkey's tokens.  ``length`` counts the prompt and the
answer tokens.  NullTokenizer checkpoints get an integer-id version of the same task (see
megatron_moba/eval/needle.py).  Lengths beyond a checkpoint's --seq-length are allowed for RoPE models.
RULER-style variants: `--task multikey` hides --needles needles "The pass key of <name> is <key>."
(distinct names, the others at random places) and asks one name's key; `--task multivalue` hides
--needles keys of one name and asks for all of them, in the order they appear.

Writes OUT/needle.csv (label, variant, length, depth, accuracy, trials), OUT/needle.json (the same
plus every trial's passkey and greedy output) and OUT/needle_<label>.png (depth x length heat map);
prints the accuracy table.  The variant is the checkpoint's saved --attention (moba or full).
Memory is linear in the tokens (no [tokens, vocabulary] logits; one forward per prompt when the answer
is right, see megatron_moba/eval/needle.py); `torchrun --nproc-per-node TP*CP ...
--tensor-model-parallel-size TP --context-parallel-size CP` shares each model (the same answers as
one process).
"""
from __future__ import annotations

import argparse
import sys

from megatron_moba.training.logs import quiet_absent_backend_warnings  # light: no torch

quiet_absent_backend_warnings()
# megatron_moba.eval.needle (torch, megatron-core), which does the work (needle.run), is imported once the
# flags are parsed: `--help` answers without it


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--load", nargs="+", required=True, help="checkpoint directories of the training job")
    p.add_argument("--labels", nargs="+", default=None, help="one name per --load (default: the directory names)")
    p.add_argument("--lengths", nargs="+", type=int, required=True, help="context lengths in tokens")
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle positions as a fraction of the filler (0 = start, 1 = right before the question)")
    p.add_argument("--task", default="passkey", choices=["passkey", "multikey", "multivalue"],
                   help="passkey: one needle; multikey: --needles needles of distinct names, one asked; multivalue: "
                        "--needles values of one name, all asked (RULER's NIAH variants)")
    p.add_argument("--needles", type=int, default=4, help="needles of --task multikey / multivalue")
    p.add_argument("--trials", type=int, default=10, help="random passkeys per cell")
    p.add_argument("--digits", type=int, default=5, help="digits of a passkey")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--out", required=True, help="directory for needle.csv, needle.json and the heat maps")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP ranks (torchrun)")
    p.add_argument("--context-parallel-size", type=int, default=1, help="CP ranks (torchrun)")
    p.add_argument("--tokenizer-type", default=None, choices=["HuggingFaceTokenizer", "SentencePieceTokenizer"],
                   help="instead of the checkpoint's tokenizer (a model imported from HF without one)")
    p.add_argument("--tokenizer-model", default=None, help="the tokenizer's file or directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron_moba.eval import needle
    from megatron_moba.eval.checkpoint import tokenizer_overrides
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")          # without CUDA: megatron-core's CPU shim
    try:
        needle.run(args.load, args.lengths, args.out, labels=args.labels, depths=args.depths, trials=args.trials,
                   digits=args.digits, seed=args.seed, batch_size=args.batch_size, iteration=args.iteration,
                   progress=not args.no_progress, tensor_model_parallel_size=args.tensor_model_parallel_size,
                   context_parallel_size=args.context_parallel_size,
                   tokenizer=tokenizer_overrides(args.tokenizer_type, args.tokenizer_model), task=args.task,
                   needles=args.needles)
    except ValueError as e:         # a bad flag (named), or a checkpoint whose tokenizer cannot build the prompt
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
