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

from megatron_moba.core.config import MoBATransformerConfig
from megatron_moba.core.context_parallel import SequenceGather
from megatron_moba.core.errors import ConfigurationError
from megatron_moba.core.layouts import from_varlen, to_varlen
from moba_kernels import TensorKeyedCache, batch_cu_seqlens, moba_attn_varlen


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
            raise ConfigurationError(f"MoBA attention layers have no attention dropout: set --attention-dropout 0 "
                                     f"(got {dropout})")
        self.cp_group = None
        if config.context_parallel_size > 1:
            cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            if cp is None:
                from megatron.core import parallel_state
                cp = parallel_state.get_context_parallel_group()
            self.cp_group = cp
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, Hq, d] (or thd [t, Hq, d]), key/value [s, b, Hkv, d] -> [s, b, Hq*d] (or [t, Hq*d])."""
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__} does not take an attention_bias")
        v = to_varlen(query, key, value, packed_seq_params)
        if self.cp_group is None:
            out = self._attend(v.q, v.k, v.v, v.cu_seqlens, v.max_seqlen, None)
        else:
            cu, max_seqlen = _global_cu_seqlens(v, self.cp_group.size())
            gather = _GATHERS.get_or_build((cu,), (id(self.cp_group), v.q.device),     # once per step, all layers
                                           lambda: SequenceGather(cu.tolist(), self.cp_group, v.q.device))
            out = self._attend(v.q, gather(v.k), gather(v.v), cu, max_seqlen, gather.local)
        return from_varlen(out, v)

    def _attend(self, q, k, v, cu_seqlens, max_seqlen, q_positions):
        raise NotImplementedError


# the gather indices (and q_positions) of one cu_seqlens tensor, shared by every layer of a step
_GATHERS = TensorKeyedCache(size=8)


def _global_cu_seqlens(v, cp: int):
    """cu_seqlens of the whole (unsplit) sequences: thd params already carry them; for sbhd each
    of the b sequences is cp times the local length."""
    if v.sbhd is None:
        return v.cu_seqlens, v.max_seqlen
    s, b = v.sbhd
    return batch_cu_seqlens(b, s * cp, v.q.device), s * cp


class MoBACoreAttention(_VarlenCoreAttention):
    """MoBA (chunk size, top-k and backend from ``MoBATransformerConfig``)."""

    def __init__(self, config: MoBATransformerConfig, *args, **kwargs):
        if not isinstance(config, MoBATransformerConfig):
            raise TypeError("MoBACoreAttention needs a MoBATransformerConfig (megatron_moba.core.config)")
        super().__init__(config, *args, **kwargs)

    def _attend(self, q, k, v, cu_seqlens, max_seqlen, q_positions):
        c = self.config
        return moba_attn_varlen(q, k, v, cu_seqlens, max_seqlen, c.moba_chunk_size, c.moba_topk,
                                softmax_scale=self.softmax_scale, backend=c.moba_backend, q_positions=q_positions)


class FullCoreAttention(_VarlenCoreAttention):
    """Exact causal attention.  On CUDA, unpacked and without CP: PyTorch's fused SDPA (flash /
    cuDNN), the dense baseline users compare against.  Otherwise MoBA with one block per sequence
    (chunk >= max_seqlen, topk = 1) through the fastest backend (``triton`` on CUDA)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not (query.is_cuda and packed_seq_params is None and self.cp_group is None and attention_bias is None):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        s, b, hq, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))                 # [b, H, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=hq != key.shape[2])
        return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)                          # [s, b, Hq*d]

    def _attend(self, q, k, v, cu_seqlens, max_seqlen, q_positions):
        chunk = -(-max(1, max_seqlen) // 16) * 16          # one block per sequence (a multiple of 16 for triton)
        return moba_attn_varlen(q, k, v, cu_seqlens, max_seqlen, chunk, 1, softmax_scale=self.softmax_scale,
                                backend=None, q_positions=q_positions)
