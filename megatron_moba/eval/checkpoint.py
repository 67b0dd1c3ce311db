"""Load a checkpoint of the training job for evaluation, and score tokens with it.

    from megatron_moba.eval.checkpoint import load_for_eval, token_losses
    model, args, tokenizer = load_for_eval("runs/demo/moba")        # the run's own flags, from the checkpoint
    losses = token_losses(model, tokens)                             # tokens [b, s+1] -> loss [b, s]

The checkpoint (a GPTModel's, or a HybridModel's: --hybrid-layer-pattern) may have been saved at any
TP/PP/CP: dist_checkpointing reshards it to the layout asked for here (by default one process,
TP=1).  Evaluation runs without pipeline parallelism; under ``torchrun`` it can use tensor and context
parallelism (``--nproc-per-node`` = TP x CP; see megatron_moba.eval.stream for scoring in memory linear
in the tokens).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from megatron_moba.training.checkpointing import checkpoint_dir, read_latest


def _common(load_dir: str, iteration: Optional[int] = None):
    """(path, common state dict) of a checkpoint iteration (default: the latest)."""
    from megatron.core import dist_checkpointing
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"checkpoint directory {load_dir} does not exist")
    iteration = read_latest(load_dir) if iteration is None else iteration
    path = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is missing")
    return path, dist_checkpointing.load_common_state_dict(path)


def tokenizer_overrides(tokenizer_type: Optional[str] = None, tokenizer_model: Optional[str] = None) -> dict:
    """``load_for_eval`` overrides for the tools' --tokenizer-type / --tokenizer-model (a model imported
    without its tokenizer); empty when neither is given."""
    if tokenizer_model and not tokenizer_type:
        raise ValueError("--tokenizer-model needs --tokenizer-type (HuggingFaceTokenizer or SentencePieceTokenizer)")
    out = {}
    if tokenizer_type:
        out["tokenizer_type"] = tokenizer_type
    if tokenizer_model:
        out["tokenizer_model"] = tokenizer_model
    return out


def saved_args(load_dir: str, iteration: Optional[int] = None) -> argparse.Namespace:
    """The flags a checkpoint was trained with (stored in it by the training job)."""
    path, common = _common(load_dir, iteration)
    if not common.get("args"):
        raise ValueError(f"{path} does not record the flags it was trained with (not saved by megatron_moba's "
                         "training job or tools/convert_hf_checkpoint.py)")
    from megatron_moba.training.arguments import flag_defaults
    # flags added after the checkpoint was written take their defaults
    return argparse.Namespace(**{**flag_defaults(), **common["args"]})


def eval_tokenizer(args, load_dir: str, iteration: Optional[int] = None):
    """The tokenizer to evaluate the checkpoint with: its saved --tokenizer-type/--tokenizer-model, except for a
    model imported from HF without a tokenizer (saved as NullTokenizer over the HF vocabulary, and so
    without NullTokenizer's extra end-of-document row): text is token ids as integers over the model's
    own rows, and the end-of-document id is config.json's eos_token_id (refused, naming the flags to pass,
    where it has none)."""
    from megatron_moba.training.tokenizer import Tokenizer, build_tokenizer
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    if args.tokenizer_type != "NullTokenizer":
        return tok
    hf = _common(load_dir, iteration)[1].get("hf_config")
    if not hf:
        return tok
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if not isinstance(eos, int) or not 0 <= eos < args.vocab_size:
        raise ValueError(f"{load_dir} was imported from HF without a tokenizer, and its config.json names no "
                         f"eos_token_id inside its {args.vocab_size}-token vocabulary (got {eos!r}): pass the model's "
                         "tokenizer (--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR)")
    return Tokenizer("NullTokenizer", args.vocab_size, eos, tok.tokenize, tok.detokenize)


def load_for_eval(load_dir: str, iteration: Optional[int] = None, seq_length: Optional[int] = None,
                  tensor_model_parallel_size: int = 1, context_parallel_size: int = 1, **overrides):
    """(model in eval mode, its flags, its tokenizer) for the checkpoint in ``load_dir``.

    ``seq_length`` evaluates at another length than trained (RoPE models); ``overrides`` replace
    saved flags by name, e.g. ``attention="full"`` or ``moba_topk=8`` to probe the trained weights
    with other attention settings, or ``tokenizer_type="HuggingFaceTokenizer", tokenizer_model=DIR``
    for a model imported without its tokenizer.  ``tensor_model_parallel_size`` x
    ``context_parallel_size`` processes (torchrun) share the model."""
    from megatron_moba.training.checkpointing import load_checkpoint
    from megatron_moba.training.parallel import initialize_distributed
    args = saved_args(load_dir, iteration)
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise ValueError(f"unknown flag override {name!r}")
        setattr(args, name, value)
    if seq_length is not None:
        if args.position_embedding_type != "rope" and seq_length > args.max_position_embeddings:
            raise ValueError(f"--seq-length {seq_length} exceeds the checkpoint's learned position embeddings "
                             f"({args.max_position_embeddings})")
        args.seq_length = seq_length
        args.max_position_embeddings = max(args.max_position_embeddings or 0, seq_length)
    if context_parallel_size > 1 and args.seq_length % (2 * context_parallel_size):
        if args.position_embedding_type != "rope":
            raise ValueError(f"--context-parallel-size {context_parallel_size} needs a sequence length divisible by "
                             f"{2 * context_parallel_size}; the checkpoint's is {args.seq_length} (give --seq-length)")
        args.seq_length += 2 * context_parallel_size - args.seq_length % (2 * context_parallel_size)
    args.tensor_model_parallel_size, args.context_parallel_size = tensor_model_parallel_size, context_parallel_size
    args.pipeline_model_parallel_size = 1
    args.sequence_parallel = False
    if getattr(args, "hybrid_layer_pattern", None):       # a HybridModel: one stage, no pipeline splits
        from megatron_moba.core.hybrid_pattern import layer_symbols
        args.hybrid_layer_pattern = layer_symbols(args.hybrid_layer_pattern)
    initialize_distributed(args)
    tokenizer = eval_tokenizer(args, load_dir, iteration)
    from megatron_moba.training.model import build_model
    model = build_model(args, tokenizer)
    load_checkpoint(load_dir, model, finetune=True, iteration=iteration)
    model.eval()
    return model, args, tokenizer


def check_parallel_sizes(tensor_model_parallel_size: int, context_parallel_size: int) -> None:
    """The evaluation tools' --tensor-model-parallel-size and --context-parallel-size against the
    processes started (torchrun's WORLD_SIZE, else one), before anything is loaded: a ValueError naming
    the flags."""
    for flag, value in (("--tensor-model-parallel-size", tensor_model_parallel_size),
                        ("--context-parallel-size", context_parallel_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    world, want = int(os.environ.get("WORLD_SIZE", "1")), tensor_model_parallel_size * context_parallel_size
    if world != want:
        raise ValueError(f"--tensor-model-parallel-size {tensor_model_parallel_size} x --context-parallel-size "
                         f"{context_parallel_size} needs {want} processes, but {world} "
                         f"{'was' if world == 1 else 'were'} started: run the tool under torchrun --nproc-per-node "
                         f"{want}")


@torch.no_grad()
def token_losses(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token LM loss: ``tokens`` [b, s+1] -> [b, s] float32, loss of predicting token t+1, from the
    model's whole [b, s, vocab] logits in one forward (one process; megatron_moba.eval.stream's
    ``streamed_token_losses`` gives the same without them, and under context parallelism)."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1], device=device)[None].expand_as(inputs)
    return model(inputs, position_ids, attention_mask=None, labels=labels).float()
