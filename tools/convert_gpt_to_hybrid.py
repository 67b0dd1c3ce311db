#!/usr/bin/env python
"""Convert a GPTModel checkpoint of the training job into the HybridModel checkpoint with the same weights.

    python tools/convert_gpt_to_hybrid.py --load ckpt/gpt_run --save ckpt/hybrid
    #   then: torchrun ... -m megatron_moba.pretrain --load ckpt/hybrid --finetune <the run's flags> <printed flags>

A GPT of L layers is megatron-core's HybridModel (0.19+) of pattern '*-' x L (--num-layers 2L); the
checkpoint written holds the weights only (iteration 0), for --finetune.  Same loss and gradients as
the GPT.
"""
import argparse
import shlex
import sys

# megatron_moba.training.convert_hybrid (torch, megatron-core) is imported in main, after the flags are parsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the GPTModel checkpoint directory (of the training job)")
    p.add_argument("--save", required=True, help="a new or empty directory")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    args = p.parse_args(argv)
    from megatron_moba.training.logs import quiet_absent_backend_warnings
    quiet_absent_backend_warnings()
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")              # without CUDA: megatron-core's CPU shim
    from megatron_moba.training.convert_hybrid import gpt_checkpoint_to_hybrid
    try:
        flags = gpt_checkpoint_to_hybrid(args.load, args.save, args.iteration)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.save} (iteration 0, weights only). Train with --load {args.save} --finetune and the run's "
          f"flags, with: {' '.join(shlex.quote(f) for f in flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
