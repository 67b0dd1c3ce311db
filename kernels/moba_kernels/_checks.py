"""Argument checks shared by every MoBA entry point.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong value or shape) with a message that names the offending argument, so a
bad call fails loudly instead of returning a silently wrong result.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .cache import TensorKeyedCache

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not softmax_scale > 0 or softmax_scale == float("inf"):
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale}")
    return float(softmax_scale)


def check_qkv(q, k, v, token_dims: int, same_tokens: bool = True) -> None:
    """Check q/k/v kinds, ranks, dtypes, devices and head layout.

    ``token_dims`` is 1 for the varlen layout ``[total, H, D]`` and 2 for the
    batched layout ``[batch, seqlen, H, D]``.
    """
    ndim = token_dims + 2
    layout = "[total_tokens, heads, head_dim]" if token_dims == 1 else "[batch, seqlen, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    if same_tokens and q.shape[:token_dims] != k.shape[:token_dims]:
        what = "total_tokens" if token_dims == 1 else "batch and seqlen"
        raise ValueError(f"q and k must agree on {what}, got q={tuple(q.shape)}, k={tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] < 1:
        raise ValueError("head_dim (last dim of q) must be >= 1")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads (q.shape[-2]={hq}) must be a multiple of the number of "
            f"key/value heads (k.shape[-2]={hkv})"
        )


def check_cu_seqlens(cu_seqlens, max_seqlen, device: torch.device) -> None:
    """Static checks of flash-attention style ``cu_seqlens`` (no host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype torch.int32 (flash-attention convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with num_seqs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the device of q ({device}), got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")


HOST_VALUES = TensorKeyedCache(size=16)       # cu_seqlens tensor -> its values on the host


def cu_seqlens_values(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen=None) -> List[int]:
    """Read ``cu_seqlens`` to the host (once per tensor: see cache.py), check its values and
    return them as a list."""
    cu: List[int] = HOST_VALUES.get_or_build((cu_seqlens,), (), cu_seqlens.tolist)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths cannot be negative)")
    if cu[-1] != total_tokens:
        raise ValueError(f"cu_seqlens[-1] ({cu[-1]}) must equal total_tokens = q.shape[0] ({total_tokens})")
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence in cu_seqlens ({longest})")
    return cu


def check_q_positions(q_positions, rows: int, total_tokens: int, device: torch.device, check_values: bool):
    """``q_positions``: int64 [rows], strictly ascending tokens of k at which the query rows sit."""
    if not isinstance(q_positions, torch.Tensor):
        raise TypeError(f"q_positions must be a torch.Tensor, got {type(q_positions).__name__}")
    if q_positions.dtype != torch.int64:
        raise TypeError(f"q_positions must have dtype torch.int64, got {q_positions.dtype}")
    if q_positions.dim() != 1 or q_positions.numel() != rows:
        raise ValueError(f"q_positions must be 1-D with one entry per query row ({rows}), "
                         f"got shape {tuple(q_positions.shape)}")
    if q_positions.device != device:
        raise ValueError(f"q_positions must be on the device of q ({device}), got {q_positions.device}")
    if check_values and rows:
        if int(q_positions[0]) < 0 or int(q_positions[-1]) >= total_tokens:
            raise ValueError(f"q_positions must lie in [0, {total_tokens}) (the tokens of k)")
        if rows > 1 and not bool((q_positions[1:] > q_positions[:-1]).all()):
            raise ValueError("q_positions must be strictly ascending")


def check_backend(backend: Optional[str], available: dict) -> None:
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    if backend not in available:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(available)} or None (automatic)")
