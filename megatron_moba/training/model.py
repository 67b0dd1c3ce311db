"""The model the job's flags describe (what the trainer trains and evaluation loads): a GPTModel, or
with --hybrid-layer-pattern megatron-core's HybridModel (0.19+)."""
from __future__ import annotations

import torch

from megatron_moba.core.model import build_moba_gpt, padded_vocab_size
from megatron_moba.training.arguments import config_from_args


def build_model(args, tokenizer):
    """This rank's GPTModel (or HybridModel) for the flags ``args`` (sets ``args.padded_vocab_size``)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    args.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, args.tensor_model_parallel_size)
    build = build_moba_gpt
    if getattr(args, "hybrid_layer_pattern", None):
        from megatron_moba.core.hybrid import build_moba_hybrid as build
    impl = getattr(args, "transformer_impl", None)      # --transformer-impl (default: TE when installed)
    return build(
        config_from_args(args), args.padded_vocab_size, args.seq_length,
        use_te=None if impl is None else impl == "transformer_engine",
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", None) or 8.0,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights).to(device)
