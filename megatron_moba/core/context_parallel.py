"""Context parallelism for MoBA core attention.

Megatron's load-balanced layout: every sequence (length divisible by 2·cp) is cut into
2·cp equal chunks and CP rank r holds chunks r and 2·cp-1-r (RoPE already applied with
global positions).  MoBA blocks live on global positions, so each rank all-gathers K and
V of the whole sequence, and attends only its own queries at their global positions
(``moba_attn_varlen(..., q_positions=...)``).  The backward sends every rank's dK/dV
contributions back to the ranks that own those tokens (reduce-scatter; all-reduce + slice
on gloo, which has no reduce-scatter).  Any MoBA chunk size works: blocks and CP chunks
need not align.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from megatron_moba.core.errors import ConfigurationError


def cp_token_index(cu_seqlens: List[int], cp: int, rank: int, device=None) -> torch.Tensor:
    """Global token indices held by CP ``rank``, in its local order (int64, ascending)."""
    lens = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    for n in lens:
        if n % (2 * cp):
            raise ConfigurationError(f"context parallelism needs every sequence length divisible by 2 x "
                                     f"--context-parallel-size ({2 * cp}); got a sequence of {n} tokens "
                                     f"(set --seq-length, or pad packed sequences, to a multiple of {2 * cp})")
    starts = torch.tensor(cu_seqlens[:-1], dtype=torch.long, device=device)
    chunk = torch.tensor(lens, dtype=torch.long, device=device) // (2 * cp)
    seg_start = torch.stack([starts + rank * chunk, starts + (2 * cp - 1 - rank) * chunk], 1).flatten()
    seg_len = chunk.repeat_interleave(2)                                 # per sequence: chunk r, chunk 2cp-1-r
    offset = torch.arange(int(seg_len.sum()), device=device) - torch.repeat_interleave(
        torch.cumsum(seg_len, 0) - seg_len, seg_len)
    return torch.repeat_interleave(seg_start, seg_len) + offset


class _GatherSequence(torch.autograd.Function):
    """[T_local, H, D] on each rank -> [T_global, H, D] in global token order."""

    @staticmethod
    def forward(ctx, x, group, order, local):
        cp = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        out = x.new_empty(order.numel(), *x.shape[1:])
        out[order] = torch.cat(parts)
        ctx.group, ctx.order, ctx.local = group, order, local
        return out

    @staticmethod
    def backward(ctx, grad):
        group, order, local = ctx.group, ctx.order, ctx.local
        by_rank = grad[order].contiguous()                    # rank 0's tokens, rank 1's, ...
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = by_rank.new_empty(local.numel(), *grad.shape[1:])
            dist.reduce_scatter_tensor(out, by_rank, group=group)
        else:
            dist.all_reduce(by_rank, group=group)
            rank = dist.get_rank(group)
            out = by_rank[rank * local.numel():(rank + 1) * local.numel()]
        return out, None, None, None


class SequenceGather:
    """All-gathers this rank's K and V into global token order (indices computed once)."""

    def __init__(self, cu_seqlens: List[int], group, device):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        self.group = group
        self.local = cp_token_index(cu_seqlens, cp, rank, device)         # this rank's global tokens
        self.order = torch.cat([cp_token_index(cu_seqlens, cp, r, device) for r in range(cp)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[T_local, H, D] -> [T_global, H, D]."""
        if self.local.numel() != x.shape[0]:
            raise ValueError(f"context-parallel rank holds {x.shape[0]} tokens but cu_seqlens implies "
                             f"{self.local.numel()}: PackedSeqParams must carry the global (unsplit) cu_seqlens")
        return _GatherSequence.apply(x, self.group, self.order, self.local)
