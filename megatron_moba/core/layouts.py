"""The one place where Megatron's attention layouts meet the kernels' varlen layout.

Megatron hands core attention either ``sbhd`` tensors (``[s, b, heads, d]``) or, for packed
sequences, ``thd`` tensors (``[t, heads, d]``) with ``PackedSeqParams``.  ``moba_kernels``
takes flash-attention's varlen layout: ``[total_tokens, heads, d]`` plus int32 ``cu_seqlens``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moba_kernels import batch_cu_seqlens


@dataclass
class Varlen:
    q: torch.Tensor            # [total, Hq, d]
    k: torch.Tensor            # [total, Hkv, d]
    v: torch.Tensor            # [total, Hkv, d]
    cu_seqlens: torch.Tensor   # int32 [num_seqs + 1]
    max_seqlen: int
    sbhd: Optional[tuple]      # (s, b) to restore the sbhd layout, None for thd


def to_varlen(query, key, value, packed_seq_params=None) -> Varlen:
    """sbhd or thd inputs -> varlen.  For thd with padded ``cu_seqlens_q_padded`` the padded
    boundaries are used: padding sits after each sequence's real tokens, so causal attention
    keeps real queries from seeing it."""
    if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
        p = packed_seq_params
        cu = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        cu_kv = p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else p.cu_seqlens_kv
        if cu_kv is not None and not torch.equal(cu, cu_kv):
            raise ValueError("MoBA self-attention needs the same cu_seqlens for queries and keys "
                             "(PackedSeqParams.cu_seqlens_q vs cu_seqlens_kv)")
        if query.dim() == 4:    # [t, 1, h, d] before megatron squeezes it
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        max_seqlen = p.max_seqlen_q if p.max_seqlen_q is not None else int((cu[1:] - cu[:-1]).max())
        return Varlen(query, key, value, cu.to(torch.int32), int(max_seqlen), None)
    s, b = query.shape[:2]
    flat = lambda x: x.transpose(0, 1).reshape(b * s, x.shape[2], x.shape[3])
    cu = batch_cu_seqlens(b, s, query.device)     # one tensor per shape: the layout is built once per step
    return Varlen(flat(query), flat(key), flat(value), cu, s, (s, b))


def from_varlen(out: torch.Tensor, v: Varlen) -> torch.Tensor:
    """[total, Hq, d] -> megatron's core-attention output: ``[s, b, Hq*d]`` or ``[t, Hq*d]``."""
    if v.sbhd is None:
        return out.reshape(out.shape[0], -1)
    s, b = v.sbhd
    return out.view(b, s, -1).transpose(0, 1).contiguous()
