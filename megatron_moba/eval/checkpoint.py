"""Load a checkpoint of the training job for evaluation, and score tokens with it.

    from megatron_moba.eval.checkpoint import load_for_eval, token_losses
    model, args, tokenizer = load_for_eval("runs/demo/moba")        # the run's own flags, from the checkpoint
    losses = token_losses(model, tokens)                             # tokens [b, s+1] -> loss [b, s]

The checkpoint (a GPTModel's, or a HybridModel's: --hybrid-layer-pattern) may have been saved at any
TP/PP/CP: dist_checkpointing reshards it to the layout asked for here (by default one process,
TP=1).  Evaluation runs without pipeline or context parallelism; under ``torchrun`` it can use tensor
parallelism.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from megatron_moba.training.checkpointing import checkpoint_dir, read_latest


def saved_args(load_dir: str, iteration: Optional[int] = None) -> argparse.Namespace:
    """The flags a checkpoint was trained with (stored in it by the training job)."""
    from megatron.core import dist_checkpointing
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"checkpoint directory {load_dir} does not exist")
    iteration = read_latest(load_dir) if iteration is None else iteration
    path = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is missing")
    common = dist_checkpointing.load_common_state_dict(path)
    if not common.get("args"):
        raise ValueError(f"{path} does not record the flags it was trained with (not saved by megatron_moba's "
                         "training job or tools/convert_hf_checkpoint.py)")
    from megatron_moba.training.arguments import flag_defaults
    # flags added after the checkpoint was written take their defaults
    return argparse.Namespace(**{**flag_defaults(), **common["args"]})


def load_for_eval(load_dir: str, iteration: Optional[int] = None, seq_length: Optional[int] = None,
                  tensor_model_parallel_size: int = 1, **overrides):
    """(model in eval mode, its flags, its tokenizer) for the checkpoint in ``load_dir``.

    ``seq_length`` evaluates at another length than trained (RoPE models); ``overrides`` replace
    saved flags by name, e.g. ``attention="full"`` or ``moba_topk=8`` to probe the trained weights
    with other attention settings."""
    from megatron_moba.training.checkpointing import load_checkpoint
    from megatron_moba.training.parallel import initialize_distributed
    from megatron_moba.training.tokenizer import build_tokenizer
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
    args.tensor_model_parallel_size = tensor_model_parallel_size
    args.pipeline_model_parallel_size = args.context_parallel_size = 1
    args.sequence_parallel = False
    if getattr(args, "hybrid_layer_pattern", None):       # a HybridModel: one stage, no pipeline splits
        from megatron_moba.core.hybrid_pattern import layer_symbols
        args.hybrid_layer_pattern = layer_symbols(args.hybrid_layer_pattern)
    initialize_distributed(args)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    from megatron_moba.training.model import build_model
    model = build_model(args, tokenizer)
    load_checkpoint(load_dir, model, finetune=True, iteration=iteration)
    model.eval()
    return model, args, tokenizer


@torch.no_grad()
def token_losses(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token LM loss: ``tokens`` [b, s+1] -> [b, s] float32, loss of predicting token t+1."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1], device=device)[None].expand_as(inputs)
    return model(inputs, position_ids, attention_mask=None, labels=labels).float()
