"""Build a megatron-core GPT with MoBA attention.

    config = MoBATransformerConfig(num_layers=..., hidden_size=..., num_attention_heads=...,
                                   moba_chunk_size=512, moba_topk=3, moba_full_attn_layers=3)
    model = build_moba_gpt(config, vocab_size=32000, seq_length=32768)
"""
from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_moba.core.config import MoBATransformerConfig, check_seq_length
from megatron_moba.core.errors import ConfigurationError
from megatron_moba.core.specs import get_moba_decoder_block_spec

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1) -> int:
    """Vocabulary rows rounded up to a multiple of 128, the same at every TP size so that
    checkpoints move between layouts."""
    padded = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if padded % tensor_model_parallel_size:
        raise ConfigurationError(f"the padded vocabulary ({padded}) is not divisible by --tensor-model-parallel-size "
                                 f"({tensor_model_parallel_size})")
    return padded


def build_moba_gpt(config: MoBATransformerConfig, vocab_size: int, seq_length: int, use_te: Optional[bool] = None,
                   position_embedding_type: str = "rope", **gpt_kwargs) -> GPTModel:
    """A ``GPTModel`` for this pipeline stage with MoBA layers (and the configured full-attention
    layers); ``gpt_kwargs`` go to ``GPTModel`` (e.g. ``rotary_base``,
    ``share_embeddings_and_output_weights``)."""
    check_seq_length(config, seq_length)
    gpt_kwargs.setdefault("pre_process", parallel_state.is_pipeline_first_stage())
    gpt_kwargs.setdefault("post_process", parallel_state.is_pipeline_last_stage())
    return GPTModel(config, get_moba_decoder_block_spec(config, use_te=use_te), vocab_size=vocab_size,
                    max_sequence_length=seq_length, position_embedding_type=position_embedding_type, **gpt_kwargs)
