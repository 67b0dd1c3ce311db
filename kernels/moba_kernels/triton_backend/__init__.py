"""The ``triton`` backend: fused MoBA kernels (gate + top-k, forward, backward) for CUDA GPUs.

    gate.py   block scores + running top-(k-1), no [tokens, heads, blocks] tensor
    tiles.py  query tiles and the reverse index (key block -> the queries that chose it)
    fwd.py    own block (causal) + earlier blocks merged by LSE
    bwd.py    dK/dV per key tile (one writer, no atomics), dQ in a separate pass
    buffers.py the kernels' output allocations (the test checker's NaN-fill hook)

Limits (``unsupported`` names them; ``backend=None`` then falls back to ``torch``): float16,
bfloat16 or float32; head dim a power of two in [16, 256]; ``chunk_size`` a multiple of 16.
``q_positions`` (context parallelism, cached decoding) are supported.  On CPU the kernels run
only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests on tiny shapes;
``backend=None`` never picks it there).  Deterministic unless dQ atomics are
chosen (``MOBA_TRITON_DQ=atomic``; see bwd.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..cache import TensorKeyedCache
from ..layout import layout_of
from ..ops import register_attention_autograd
from .tuning import INTERPRET

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# How dQ is accumulated: "separate" (deterministic pass) or "atomic" (fp32 atomics in the dK/dV
# kernel).  MOBA_TRITON_DQ overrides; deterministic algorithms (torch / megatron's
# --deterministic-mode) always get "separate".
DQ_MODE = "separate"


def dq_mode() -> str:
    mode = os.environ.get("MOBA_TRITON_DQ", DQ_MODE)
    if mode not in ("separate", "atomic"):
        raise ValueError(f"MOBA_TRITON_DQ must be 'separate' or 'atomic', got {mode!r}")
    return "separate" if torch.are_deterministic_algorithms_enabled() else mode


def available(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def unsupported(q: Tensor, chunk_size: int, q_positions: Optional[Tensor]) -> Optional[str]:
    dim = q.shape[-1]
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}; the triton backend takes float16, bfloat16 or float32"
    if dim < 16 or dim > 256 or dim & (dim - 1):
        return f"head_dim {dim}; the triton backend takes a power of two from 16 to 256"
    if chunk_size % 16:
        return f"chunk_size {chunk_size}; the triton backend needs a multiple of 16"
    return None


@dataclass(frozen=True)
class KernelConfig:
    block_m: int      # query rows per own-block tile (divides chunk_size)
    block_n: int      # keys per inner step
    pair_m: int       # selection pairs per gathered tile
    num_warps: int
    num_stages: int
    dkdv_m: int = 32      # dK/dV kernel: query rows (or selection pairs) per step
    dkdv_n: int = 64      # dK/dV kernel: keys per program (its dK/dV tile stays in registers)
    dkdv_warps: int = 8
    dkdv_stages: int = 2
    dq_n: int = 32        # keys per inner step of the dQ kernels (64 spills on sm_80 at head dim 64)


def kernel_config(dim: int, chunk_size: int) -> KernelConfig:
    """Tile sizes by head dim and chunk size (few enough that each compiles once).  Chosen so
    that no kernel spills registers on sm_80 or sm_90 (tools/triton_aot_report.py)."""
    block_m = next(b for b in (64, 32, 16) if chunk_size % b == 0)
    if dim > 128:
        return KernelConfig(min(block_m, 32), 32, 32, 4, 1, 32, 32, 8, 1)
    return KernelConfig(block_m, 64 if dim <= 64 else 32, 64, 4, 2, 32, 64, 8, 2)


def _plan_key(q, k, cu_seqlens, chunk_size, q_tok, sel) -> tuple:
    return (sel._version, cu_seqlens.data_ptr(), chunk_size, tuple(q.shape), k.shape[1],
            None if q_tok is None else q_tok.data_ptr())


TILINGS = TensorKeyedCache(size=8)


def _tiling(q, k, cu_seqlens, chunk_size, q_tok):
    """Block layout, tile sizes, query tiles and the query rows' tokens: built once for all
    layers that share ``cu_seqlens`` (and ``q_positions``), see cache.py."""
    def build():
        from .tiles import query_tiles
        layout = layout_of(cu_seqlens, k.shape[0], chunk_size)
        cfg = kernel_config(q.shape[-1], chunk_size)
        rows = torch.arange(q.shape[0], device=q.device) if q_tok is None else None
        return layout, cfg, query_tiles(layout, cfg.block_m, q_tok if rows is None else rows), rows
    layout, cfg, tiles, rows = TILINGS.get_or_build(
        (cu_seqlens, q_tok), (q.shape[0], k.shape[0], q.shape[-1], chunk_size), build)
    return layout, cfg, tiles, rows if q_tok is None else q_tok


def _plan(q, k, sel, cu_seqlens, chunk_size, q_tok):
    """Block layout, tile sizes, query tiles and the reverse index of ``sel``.

    They are kept on ``sel``: the select op leaves the layout and tiles on the selection it
    returns, the forward adds the reverse index, and the backward (``sel`` is saved for it)
    rebuilds nothing.  A stale or missing entry is simply rebuilt."""
    from .tiles import past_index
    key = _plan_key(q, k, cu_seqlens, chunk_size, q_tok, sel)
    cached = getattr(sel, "_moba_plan", None)
    if cached is not None and cached[0] == key:
        layout, cfg, tiles, past, tok = cached[1]
        if past is not None:
            return cached[1]
    else:
        layout, cfg, tiles, tok = _tiling(q, k, cu_seqlens, chunk_size, q_tok)
    plan = layout, cfg, tiles, past_index(sel, layout, tok, k.shape[1], cfg.pair_m), tok
    sel._moba_plan = (key, plan)
    return plan


@torch.library.custom_op("moba_kernels::triton_select", mutates_args=())
def triton_select_op(q: Tensor, k: Tensor, cu_seqlens: Tensor, chunk_size: int, topk: int,
                     q_tok: Optional[Tensor] = None) -> Tensor:
    from .gate import select_blocks_triton
    layout, cfg, tiles, tok = _tiling(q, k, cu_seqlens, chunk_size, q_tok)
    sel = select_blocks_triton(q, k, layout, topk, tiles, cfg.block_m, tok)
    sel._moba_plan = (_plan_key(q, k, cu_seqlens, chunk_size, q_tok, sel), (layout, cfg, tiles, None, tok))
    return sel


@triton_select_op.register_fake
def _(q, k, cu_seqlens, chunk_size, topk, q_tok=None):
    return q.new_empty(q.shape[0], q.shape[1], topk, dtype=torch.int32)


@torch.library.custom_op("moba_kernels::triton_fwd", mutates_args=())
def triton_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, sel: Tensor, chunk_size: int,
                  softmax_scale: float, q_tok: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    from .fwd import moba_fwd_triton
    layout, cfg, tiles, past, _ = _plan(q, k, sel, cu_seqlens, chunk_size, q_tok)
    return moba_fwd_triton(q, k, v, layout, tiles, past, softmax_scale, cfg)


@triton_fwd_op.register_fake
def _(q, k, v, cu_seqlens, sel, chunk_size, softmax_scale, q_tok=None):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)


@torch.library.custom_op("moba_kernels::triton_bwd", mutates_args=())
def triton_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                  sel: Tensor, chunk_size: int, softmax_scale: float,
                  q_tok: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    from .bwd import moba_bwd_triton
    layout, cfg, tiles, past, q_tok = _plan(q, k, sel, cu_seqlens, chunk_size, q_tok)
    return moba_bwd_triton(dout, q, k, v, out, lse, layout, tiles, past, softmax_scale, cfg, q_tok, dq_mode())


@triton_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, sel, chunk_size, softmax_scale, q_tok=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_attention_autograd("moba_kernels::triton_fwd", triton_bwd_op)


def attend(q, k, v, cu_seqlens, chunk_size, topk, softmax_scale, q_tok=None):
    """The backend entry (``api.Backend.attend``)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    sel = triton_select_op(q.detach(), k.detach(), cu_seqlens, chunk_size, topk, q_tok)
    out, _ = triton_fwd_op(q, k, v, cu_seqlens, sel, chunk_size, softmax_scale, q_tok)
    return out
