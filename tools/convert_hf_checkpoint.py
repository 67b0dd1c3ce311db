#!/usr/bin/env python
"""Convert Llama-architecture Hugging Face checkpoints to and from megatron dist checkpoints.

    python tools/convert_hf_checkpoint.py import --hf-dir llama-3.1-8b --save ckpt/llama_mg
    #   then: torchrun ... -m megatron_moba.pretrain --load ckpt/llama_mg --finetune <printed model flags> ...
    python tools/convert_hf_checkpoint.py export --load ckpt/run --out llama_moba_hf

Import writes into a new (or empty) directory only.  Export takes the HF config carried from the
import through every checkpoint trained from it (--load/--finetune); a checkpoint without one (a
run trained from scratch with Llama-architecture flags) needs --hf-config.

The megatron checkpoint holds full-size (global) tensors: it loads at any TP/PP.  Weights are
read from and written to safetensors only.
"""
import argparse
import os
import sys

# megatron_moba.hf.convert (torch, megatron-core), which does the work (convert.run_import / run_export), is
# imported in main, after the flags are parsed: `--help` answers without it


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="HF -> megatron")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--save", required=True, help="a new or empty directory")
    exp = sub.add_parser("export", help="megatron -> HF")
    exp.add_argument("--load", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--hf-config", default=None,
                     help="config.json (or HF directory) describing the model, for a checkpoint that does not carry "
                          "one from an import")
    args = p.parse_args(argv)
    if args.direction == "import" and os.path.isdir(args.save) and os.listdir(args.save):
        p.error(f"--save {args.save} is not empty: import into a new or empty directory (importing there would "
                "replace the latest_checkpointed_iteration.txt of the checkpoints it holds)")
    from megatron_moba.training.logs import quiet_absent_backend_warnings
    quiet_absent_backend_warnings()
    from megatron_moba.hf import convert
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")              # without CUDA: megatron-core's CPU shim
    try:
        if args.direction == "import":
            convert.run_import(args.hf_dir, args.save)
        else:
            convert.run_export(args.load, args.out, args.hf_config)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
