"""MoBA ops registered with ``torch.library`` so ``torch.compile`` sees them as
opaque nodes with fake (meta) implementations instead of graph-breaking on the
host-side bookkeeping (``cu_seqlens.tolist()``, data-dependent tile counts)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import torch_backend
from .gate import select_blocks
from .layout import layout_of as _layout  # values checked here too: compiled callers cannot read them


@torch.library.custom_op("moba_kernels::select_blocks", mutates_args=())
def select_blocks_op(q: Tensor, k: Tensor, cu_seqlens: Tensor, chunk_size: int, topk: int,
                     q_tok: Optional[Tensor] = None) -> Tensor:
    return select_blocks(q, k, _layout(cu_seqlens, k.shape[0], chunk_size), topk, q_tok)


@select_blocks_op.register_fake
def _(q, k, cu_seqlens, chunk_size, topk, q_tok=None):
    return q.new_empty(q.shape[0], q.shape[1], topk, dtype=torch.int32)


@torch.library.custom_op("moba_kernels::torch_fwd", mutates_args=())
def torch_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, sel: Tensor,
                 chunk_size: int, softmax_scale: float, q_tok: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return torch_backend.moba_fwd(q, k, v, sel, _layout(cu_seqlens, k.shape[0], chunk_size), softmax_scale, q_tok)


@torch_fwd_op.register_fake
def _(q, k, v, cu_seqlens, sel, chunk_size, softmax_scale, q_tok=None):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[1], dtype=lse_dtype)


@torch.library.custom_op("moba_kernels::torch_bwd", mutates_args=())
def torch_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                 sel: Tensor, chunk_size: int, softmax_scale: float,
                 q_tok: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return torch_backend.moba_bwd(dout, q, k, v, out, lse, sel, _layout(cu_seqlens, k.shape[0], chunk_size),
                                  softmax_scale, q_tok)


@torch_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, sel, chunk_size, softmax_scale, q_tok=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def register_attention_autograd(fwd_name: str, bwd_op) -> None:
    """Autograd for a MoBA forward op ``(q, k, v, cu_seqlens, sel, chunk_size, softmax_scale, q_tok)
    -> (out, lse)`` whose backward op takes ``(dout, q, k, v, out, lse, cu_seqlens, sel, chunk_size,
    softmax_scale, q_tok)`` and returns ``(dq, dk, dv)`` (the torch and triton backends)."""
    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, sel, chunk_size, softmax_scale, q_tok = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, sel, q_tok)
        ctx.mark_non_differentiable(lse)   # the LSE is an auxiliary output for merging, not a loss input
        ctx.chunk_size, ctx.softmax_scale = chunk_size, softmax_scale

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens, sel, q_tok = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout.contiguous(), q, k, v, out, lse, cu_seqlens, sel, ctx.chunk_size,
                            ctx.softmax_scale, q_tok)
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


register_attention_autograd("moba_kernels::torch_fwd", torch_bwd_op)
