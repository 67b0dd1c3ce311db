"""Core-attention modules for megatron-core's ``SelfAttention`` (the ``core_attention`` slot).

``MoBACoreAttention`` runs MoBA; ``FullCoreAttention`` runs exact causal attention through
the same op (one block per sequence), for full-attention layers where Transformer Engine is
absent (megatron's local ``DotProductAttention`` needs a CUDA buffer).  Both take megatron's
constructor and forward signatures, keep GQA unexpanded, and accept sbhd or packed thd.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from moba_kernels import moba_attn_varlen

from .config import MoBATransformerConfig
from .layouts import from_varlen, to_varlen


class _VarlenCoreAttention(MegatronModule):
    """Shared plumbing: signature checks, layout conversion, softmax scale."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"{type(self).__name__} serves self-attention only, got attention_type={attention_type!r}")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"{type(self).__name__} is causal attention; got attn_mask_type={attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"MoBA attention layers have no attention dropout: set --attention-dropout 0 "
                             f"(got {dropout})")
        if config.context_parallel_size > 1:
            raise ValueError("--context-parallel-size > 1 is not supported by the MoBA core attention yet")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, Hq, d] (or thd [t, Hq, d]), key/value [s, b, Hkv, d] -> [s, b, Hq*d] (or [t, Hq*d])."""
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__} does not take an attention_bias")
        v = to_varlen(query, key, value, packed_seq_params)
        return from_varlen(self._attend(v), v)

    def _attend(self, v):
        raise NotImplementedError


class MoBACoreAttention(_VarlenCoreAttention):
    """MoBA (chunk size, top-k and backend from ``MoBATransformerConfig``)."""

    def __init__(self, config: MoBATransformerConfig, *args, **kwargs):
        if not isinstance(config, MoBATransformerConfig):
            raise TypeError("MoBACoreAttention needs a MoBATransformerConfig (megatron_moba.config)")
        super().__init__(config, *args, **kwargs)

    def _attend(self, v):
        c = self.config
        return moba_attn_varlen(v.q, v.k, v.v, v.cu_seqlens, v.max_seqlen, c.moba_chunk_size, c.moba_topk,
                                softmax_scale=self.softmax_scale, backend=c.moba_backend)


class FullCoreAttention(_VarlenCoreAttention):
    """Exact causal attention: MoBA with one block per sequence (chunk >= max_seqlen, topk = 1)."""

    def _attend(self, v):
        return moba_attn_varlen(v.q, v.k, v.v, v.cu_seqlens, v.max_seqlen, max(1, v.max_seqlen), 1,
                                softmax_scale=self.softmax_scale, backend="torch")
