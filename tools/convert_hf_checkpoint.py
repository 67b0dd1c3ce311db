#!/usr/bin/env python
"""Convert Hugging Face checkpoints (Llama, Mistral, Qwen2/2.5, Qwen3) to and from megatron dist checkpoints.

    python tools/convert_hf_checkpoint.py import --hf-dir llama-3.1-8b --save ckpt/llama_mg
    #   then: torchrun ... -m megatron_moba.pretrain --load ckpt/llama_mg --finetune <printed flags> ...
    python tools/convert_hf_checkpoint.py export --load ckpt/run --out llama_moba_hf [--dtype bfloat16]
    python tools/convert_hf_checkpoint.py flags --hf-dir llama-3.1-8b      # the flags only (reads config.json)

Every tensor of the HF checkpoint is carried or the import fails naming it; every config field
that changes the model is mapped to a flag (printed after the import: model, tokenizer and
--vocab-size) or refused naming it.  Mistral/Qwen sliding windows are refused unless
--replace-sliding-window (MoBA/full attention replaces the window; the export then writes
sliding_window null).

Import writes into a new (or empty) directory only; with --hybrid a HybridModel checkpoint
(megatron-core 0.19+), which export reads as it reads a GPTModel's.  Export takes the HF config carried from the
import through every checkpoint trained from it (--load/--finetune); a checkpoint without one (a
run trained from scratch with the HF model's flags) needs --hf-config.

The megatron checkpoint holds full-size (global) tensors: it loads at any TP/PP.  Weights are
read from and written to safetensors only.  Import reads one tensor at a time and builds the model
in the dtype config.json names (bf16 for Llama 3.1); export writes the checkpoint's dtype (or
--dtype), sharded as transformers' save_pretrained (--max-shard-size, 5GB), with the tokenizer files
and generation_config.json beside them.
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
    window_help = ("import a Mistral/Qwen config whose sliding_window is set, with MoBA/full attention replacing "
                   "the window (a different model past the window: for continued pretraining)")
    imp.add_argument("--replace-sliding-window", action="store_true", help=window_help)
    imp.add_argument("--hybrid", action="store_true",
                     help="write a HybridModel checkpoint (megatron-core 0.19+; pattern '*-' per HF layer, printed as "
                          "--hybrid-layer-pattern) instead of a GPTModel one")
    exp = sub.add_parser("export", help="megatron -> HF")
    exp.add_argument("--load", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--hf-config", default=None,
                     help="config.json (or HF directory) describing the model, for a checkpoint that does not carry "
                          "one from an import")
    exp.add_argument("--replace-sliding-window", action="store_true", help="with --hf-config: " + window_help)
    exp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="dtype of the written weights (default: the checkpoint's)")
    exp.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors file, as transformers' save_pretrained (bytes, or e.g. 5GB, 500MiB)")
    exp.add_argument("--tokenizer-dir", default=None,
                     help="copy the tokenizer files from here (default: the directory of the tokenizer the "
                          "checkpoint was trained with)")
    fl = sub.add_parser("flags", help="print the pretraining flags of an HF model (config.json, tokenizer)")
    fl.add_argument("--hf-dir", required=True)
    fl.add_argument("--replace-sliding-window", action="store_true", help=window_help)
    fl.add_argument("--hybrid", action="store_true", help="the flags of the HybridModel ('*-' per HF layer)")
    args = p.parse_args(argv)
    if args.direction == "import" and os.path.isdir(args.save) and os.listdir(args.save):
        p.error(f"--save {args.save} is not empty: import into a new or empty directory (importing there would "
                "replace the latest_checkpointed_iteration.txt of the checkpoints it holds)")
    if args.direction == "flags":       # config.json and the tokenizer only: no megatron-core
        from megatron_moba.hf import families
        try:
            families.run_flags(args.hf_dir, args.replace_sliding_window, args.hybrid)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    from megatron_moba.training.logs import quiet_absent_backend_warnings
    quiet_absent_backend_warnings()
    from megatron_moba.hf import convert
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")              # without CUDA: megatron-core's CPU shim
    try:
        if args.direction == "import":
            convert.run_import(args.hf_dir, args.save, args.replace_sliding_window, args.hybrid)
        else:
            convert.run_export(args.load, args.out, args.hf_config, args.replace_sliding_window, args.dtype,
                               args.max_shard_size, args.tokenizer_dir)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
