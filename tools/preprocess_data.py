#!/usr/bin/env python
"""Tokenize text into megatron's indexed dataset format (.bin/.idx) for --data-path.

    python tools/preprocess_data.py --input corpus.jsonl --json-key text --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/spm.model --workers 2
    # train the SentencePiece model on the same texts first:
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/spm.model --train-tokenizer --vocab-size 8000
"""
import argparse
import sys

from megatron_moba.preprocess import BadJSONLines, build_indexed_dataset, read_hf_dataset, read_jsonl, train_sentencepiece


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(argv)
    if args.input_format == "hf" and len(args.input) != 1:
        p.error("--input-format hf takes one dataset directory")

    def texts():
        if args.input_format == "hf":
            return read_hf_dataset(args.input[0], args.json_key)
        return read_jsonl(args.input, args.json_key)
    try:
        if args.train_tokenizer:
            if args.tokenizer_type != "SentencePieceTokenizer" or not args.tokenizer_model or not args.vocab_size:
                p.error("--train-tokenizer needs --tokenizer-type SentencePieceTokenizer, --tokenizer-model "
                        "PATH.model and --vocab-size")
            prefix = args.tokenizer_model[:-len(".model")] if args.tokenizer_model.endswith(".model") else args.tokenizer_model
            args.tokenizer_model = train_sentencepiece(texts(), prefix, args.vocab_size)
            print(f"trained {args.tokenizer_model}")
        stats = build_indexed_dataset(texts(), args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                                      args.vocab_size, workers=args.workers)
    except BadJSONLines as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens "
          f"(vocab {stats['vocab_size']}, eod {stats['eod']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
