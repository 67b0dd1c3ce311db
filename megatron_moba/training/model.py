"""The GPT the job's flags describe (what the trainer trains and evaluation loads)."""
from __future__ import annotations

import torch

from megatron_moba.core.model import build_moba_gpt, padded_vocab_size
from megatron_moba.training.arguments import config_from_args


def build_model(args, tokenizer):
    """This rank's GPT for the flags ``args`` (sets ``args.padded_vocab_size``)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    args.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, args.tensor_model_parallel_size)
    return build_moba_gpt(
        config_from_args(args), args.padded_vocab_size, args.seq_length,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", None) or 8.0,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights).to(device)
