"""Tokenizers for the job and the tools: what megatron's GPTDataset needs (``vocab_size``,
``eod``) plus ``tokenize``/``detokenize``."""
from __future__ import annotations

import os
from typing import List

from megatron_moba.core.errors import ConfigurationError


class Tokenizer:
    def __init__(self, name: str, vocab_size: int, eod: int, encode, decode, model: str = None):
        self.name, self.vocab_size, self.eod = name, vocab_size, eod
        self._encode, self._decode = encode, decode
        # megatron's datasets hash this into their cache names
        self.unique_identifiers = {"class": name, "model": model, "vocab_size": vocab_size, "eod": eod}

    def tokenize(self, text: str) -> List[int]:
        return self._encode(text)

    def detokenize(self, ids: List[int]) -> str:
        return self._decode(ids)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str = None, vocab_size: int = None) -> Tokenizer:
    """The tokenizer of ``--tokenizer-type``.  ``vocab_size`` (``--vocab-size``): NullTokenizer's
    vocabulary; with a SentencePiece or HF tokenizer, the model's vocabulary before padding where it has
    more rows than the tokenizer has tokens (an imported HF model, e.g. Qwen2.5: 151936 rows, 151665
    tokens); never fewer."""
    tok = _build(tokenizer_type, tokenizer_model, vocab_size)
    if tokenizer_type != "NullTokenizer" and vocab_size is not None:
        if vocab_size < tok.vocab_size:
            raise ConfigurationError(f"--vocab-size {vocab_size} is smaller than the vocabulary of --tokenizer-model "
                                     f"{tokenizer_model} ({tok.vocab_size} tokens): its token ids would not fit the "
                                     "embedding; leave --vocab-size out or give at least the tokenizer's size")
        tok.vocab_size = vocab_size
        tok.unique_identifiers["vocab_size"] = vocab_size
    return tok


def _build(tokenizer_type: str, tokenizer_model: str = None, vocab_size: int = None) -> Tokenizer:
    if tokenizer_type == "NullTokenizer":
        if not vocab_size:
            raise ConfigurationError("--tokenizer-type NullTokenizer needs --vocab-size")
        # ids are the text's integers; the end-of-document id is vocab_size (one past the vocabulary)
        return Tokenizer("NullTokenizer", vocab_size + 1, vocab_size,
                         lambda text: [int(x) for x in text.split()], lambda ids: " ".join(map(str, ids)))
    if not tokenizer_model or not os.path.exists(tokenizer_model):
        raise ConfigurationError(f"--tokenizer-model {tokenizer_model!r} does not exist")
    if tokenizer_type == "SentencePieceTokenizer":
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
        eod = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
        return Tokenizer("SentencePieceTokenizer", sp.get_piece_size(), eod,
                         lambda text: sp.encode(text), lambda ids: sp.decode(list(ids)), tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:
            raise ConfigurationError("--tokenizer-type HuggingFaceTokenizer needs the `tokenizers` package") from e
        path = os.path.join(tokenizer_model, "tokenizer.json") if os.path.isdir(tokenizer_model) else tokenizer_model
        tok = HFTokenizer.from_file(path)
        eod = next((tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
                    if tok.token_to_id(t) is not None), None)
        if eod is None:
            raise ConfigurationError(f"{path}: no end-of-document token (</s>, <|endoftext|>, <|end_of_text|>, <eos>)")
        return Tokenizer("HuggingFaceTokenizer", tok.get_vocab_size(), eod,
                         lambda text: tok.encode(text, add_special_tokens=False).ids, lambda ids: tok.decode(list(ids)),
                         tokenizer_model)
    raise ConfigurationError(f"unknown --tokenizer-type {tokenizer_type!r}")
