#!/usr/bin/env python
"""Tokenize text into megatron's indexed dataset format (.bin/.idx) for --data-path.

    python tools/preprocess_data.py --input corpus.jsonl --json-key text --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/spm.model --workers 2
    # train the SentencePiece model on the same texts first:
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/spm.model --train-tokenizer --vocab-size 8000

Existing outputs (PREFIX.bin/.idx, and the .model with --train-tokenizer) are refused unless
--overwrite; even then they are replaced only once the whole run succeeded.  An empty input, or
lines that are not UTF-8 JSON objects with the text field, are errors naming file and line.
"""
import argparse
import os
import signal
import sys
import warnings

# megatron-core's import-time notices about optional Apex / Transformer Engine kernels concern
# training, not tokenization
warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed",
                        category=UserWarning)

# megatron_moba.training.preprocess (megatron-core, torch), which does the work (preprocess.run), is imported
# in main, after the flags are parsed: `--help` answers without it


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files, or one HF dataset directory (save_to_disk)")
    p.add_argument("--input-format", choices=["jsonl", "hf"], default="jsonl")
    p.add_argument("--json-key", default="text", help="the text field")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"],
                   required=True)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer size, or the size to train")
    p.add_argument("--train-tokenizer", action="store_true",
                   help="first train a SentencePiece model on the input, saved as --tokenizer-model")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (PREFIX.bin/.idx, and the --tokenizer-model that "
                        "--train-tokenizer writes); they are replaced only if the run succeeds")
    args = p.parse_args(argv)
    from megatron_moba.training import preprocess
    if args.input_format == "hf" and len(args.input) != 1:
        p.error("--input-format hf takes one dataset directory")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.train_tokenizer and (args.tokenizer_type != "SentencePieceTokenizer" or not args.tokenizer_model
                                 or not args.vocab_size):
        p.error("--train-tokenizer needs --tokenizer-type SentencePieceTokenizer, --tokenizer-model "
                "PATH.model and --vocab-size")
    outputs = preprocess.output_files(args.output_prefix, args.tokenizer_model if args.train_tokenizer else None)
    existing = [f for f in outputs if os.path.exists(f)]
    if existing and not args.overwrite:
        p.error(f"{', '.join(existing)} already exist(s): pass --overwrite to replace "
                f"{'them' if len(existing) > 1 else 'it'} (only once preprocessing succeeds)")
    # SIGTERM (a scheduler's kill) unwinds like Ctrl-C: temporary files are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        preprocess.run(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model, args.vocab_size,
                       input_format=args.input_format, json_key=args.json_key, train_tokenizer=args.train_tokenizer,
                       workers=args.workers, overwrite=args.overwrite)
    except (ValueError, OSError) as e:     # bad or empty input, an unreadable file, a bad tokenizer
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
