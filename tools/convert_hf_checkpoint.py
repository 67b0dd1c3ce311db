#!/usr/bin/env python
"""Convert Llama-architecture Hugging Face checkpoints to and from megatron dist checkpoints.

    python tools/convert_hf_checkpoint.py import --hf-dir llama-3.1-8b --save ckpt/llama_mg
    #   then: torchrun ... -m megatron_moba.pretrain --load ckpt/llama_mg --finetune <printed model flags> ...
    python tools/convert_hf_checkpoint.py export --load ckpt/run --out llama_moba_hf

The megatron checkpoint holds full-size (global) tensors: it loads at any TP/PP.  Weights are
read from and written to safetensors only.
"""
import argparse
import sys
from types import SimpleNamespace

from megatron_moba.hf_convert import export_from_checkpoint, import_to_checkpoint
from megatron_moba.parallel import initialize_distributed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="HF -> megatron")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--save", required=True)
    exp = sub.add_parser("export", help="megatron -> HF")
    exp.add_argument("--load", required=True)
    exp.add_argument("--out", required=True)
    args = p.parse_args(argv)
    initialize_distributed(SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                           context_parallel_size=1, seed=0))
    if args.direction == "import":
        flags = import_to_checkpoint(args.hf_dir, args.save)
        print(f"wrote {args.save} (iteration 0, weights only). Train with:\n  --load {args.save} --finetune "
              + " ".join(flags))
    else:
        export_from_checkpoint(args.load, args.out)
        print(f"wrote {args.out}/config.json and model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
