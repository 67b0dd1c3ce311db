"""Public MoBA functions: argument checks, backend choice, layout handling."""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import torch

from . import _checks
from .cache import register_clearer
from .gate import select_blocks
from .layout import block_layout
from .naive import naive_moba_attn


class Backend:
    """One way of computing MoBA attention.

    ``attend(q, k, v, cu_seqlens, chunk_size, topk, softmax_scale, q_tok=None)``
    returns the output; ``unsupported(q, chunk_size, q_positions)`` returns None or the
    reason this backend cannot serve the call (dtype, head dim, chunk size);
    ``available(device)`` says whether it runs on ``device`` at all and ``auto(device)``
    whether ``backend=None`` may pick it there.
    """

    def __init__(self, name: str, attend: Callable, unsupported: Callable = lambda q, chunk, pos: None,
                 available: Callable = lambda device: True, auto: Callable = lambda device: True):
        self.name, self.attend, self.unsupported, self.available = name, attend, unsupported, available
        self.auto = auto


def _reference(q, k, v, cu_seqlens, chunk_size, topk, softmax_scale, q_tok=None):
    layout = block_layout(_checks.cu_seqlens_values(cu_seqlens, k.shape[0]), chunk_size, q.device)
    sel = select_blocks(q.detach(), k.detach(), layout, topk, q_tok)
    return naive_moba_attn(q, k, v, sel, layout, softmax_scale, q_tok)


def _torch(q, k, v, cu_seqlens, chunk_size, topk, softmax_scale, q_tok=None):
    from . import ops  # registers the custom ops on first use
    sel = ops.select_blocks_op(q.detach(), k.detach(), cu_seqlens, chunk_size, topk, q_tok)
    out, _ = ops.torch_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, sel,
                              chunk_size, softmax_scale, q_tok)
    return out


def _triton(*args):
    from . import triton_backend
    return triton_backend.attend(*args)


def _triton_unsupported(q, chunk_size, q_positions):
    from . import triton_backend
    return triton_backend.unsupported(q, chunk_size, q_positions)


def _missing_triton(err: ImportError) -> bool:
    """Whether ``err`` says that the ``triton`` package itself is not installed."""
    name = getattr(err, "name", None) or ""
    return isinstance(err, ModuleNotFoundError) and (name == "triton" or name.startswith("triton."))


def _triton_available(device: torch.device) -> bool:
    try:
        from . import triton_backend
    except ImportError as err:
        if _missing_triton(err):     # no triton installed: the backend is unavailable
            return False
        raise                        # a broken install or a bug in triton_backend: say so
    return triton_backend.available(device)


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("reference", _reference),
    "torch": Backend("torch", _torch),
    # on CPU only under TRITON_INTERPRET=1 (tests), and never chosen by backend=None there
    "triton": Backend("triton", _triton, _triton_unsupported, _triton_available,
                      auto=lambda device: device.type == "cuda"),
}
# Order in which backend=None tries them (fastest first).
AUTO_ORDER = ["triton", "torch"]


def backend_names() -> list:
    """Every backend name ``backend=`` accepts (available here or not)."""
    return list(BACKENDS)


def available_backends(device: Optional[torch.device] = None) -> list:
    """Names of the backends usable on ``device`` (default: the current CUDA device, else CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [name for name, b in BACKENDS.items() if b.available(torch.device(device))]


def _pick_backend(backend: Optional[str], q: torch.Tensor, chunk_size: int, q_positions=None) -> Backend:
    _checks.check_backend(backend, BACKENDS)
    if backend is None:
        for name in AUTO_ORDER:
            b = BACKENDS[name]
            if b.available(q.device) and b.auto(q.device) and b.unsupported(q, chunk_size, q_positions) is None:
                return b
        raise ValueError("no MoBA backend supports these inputs")  # unreachable: torch serves all
    b = BACKENDS[backend]
    if not b.available(q.device):
        raise ValueError(f"backend {backend!r} is not available on {q.device}; available: "
                         f"{available_backends(q.device)}")
    reason = b.unsupported(q, chunk_size, q_positions)
    if reason is not None:
        raise ValueError(f"backend {backend!r} does not support these inputs ({reason}); "
                         f"use backend='torch' (any dtype, head_dim, chunk_size) or backend=None")
    return b


def moba_attn_varlen(q, k, v, cu_seqlens, max_seqlen, chunk_size, topk, softmax_scale=None, backend=None, *,
                     q_positions=None):
    """MoBA attention over packed variable-length sequences (flash-attention's varlen layout).

    Args:
        q: ``[total_tokens, Hq, D]``.
        k, v: ``[total_tokens, Hkv, D]``; ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA).
        cu_seqlens: int32 ``[num_seqs + 1]`` cumulative sequence lengths, starting at 0 and
            ending at ``total_tokens``; zero-length sequences are allowed.
        max_seqlen: int, at least the longest sequence.
        chunk_size: key block size in tokens (>= 1); blocks restart at each sequence.
        topk: blocks per query, its own block included (>= 1).  ``topk >= blocks`` is dense
            causal attention, ``topk == 1`` is block-local causal attention.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        backend: ``"triton"`` (CUDA), ``"torch"``, ``"reference"`` or ``None`` (the fastest
            that supports the inputs: ``triton`` on CUDA when it can, else ``torch``).
        q_positions: optional int64 ``[Tq]``, strictly ascending: the tokens of k/v at which the
            rows of ``q`` (then ``[Tq, Hq, D]``) sit.  For context parallelism: each rank's queries
            are a subset of the gathered sequence, attended with their global positions.

    Returns:
        ``[total_tokens, Hq, D]`` (``[Tq, Hq, D]`` with ``q_positions``) in the dtype of ``q``.
    """
    _checks.check_qkv(q, k, v, token_dims=1, same_tokens=q_positions is None)
    _checks.check_cu_seqlens(cu_seqlens, max_seqlen, q.device)
    checking = not torch.compiler.is_compiling()   # compiled graphs check the values inside the ops
    if checking:
        _checks.cu_seqlens_values(cu_seqlens, k.shape[0], max_seqlen)
    if q_positions is not None:
        _checks.check_q_positions(q_positions, q.shape[0], k.shape[0], q.device, checking)
    chunk_size = _checks.check_int("chunk_size", chunk_size)
    topk = _checks.check_int("topk", topk)
    softmax_scale = _checks.check_softmax_scale(softmax_scale, q.shape[-1])
    b = _pick_backend(backend, q, chunk_size, q_positions)
    if q.shape[0] == 0:
        return q * 0
    return b.attend(q, k, v, cu_seqlens, chunk_size, topk, softmax_scale, q_positions)


def batch_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """int32 cu_seqlens of ``batch`` sequences of ``seqlen`` tokens: one tensor per shape (outside
    torch.compile tracing), so that every layer's call finds the layout built by the first (see
    cache.py).  Do not modify it."""
    if torch.compiler.is_compiling():
        return _arange_cu_seqlens(batch, seqlen, device)
    return _shared_cu_seqlens(batch, seqlen, device)


def _arange_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


_shared_cu_seqlens = functools.lru_cache(maxsize=16)(_arange_cu_seqlens)
register_clearer(_shared_cu_seqlens.cache_clear)


def moba_attn(q, k, v, chunk_size, topk, softmax_scale=None, backend=None):
    """MoBA attention on equal-length sequences.

    q: ``[batch, seqlen, Hq, D]``, k/v: ``[batch, seqlen, Hkv, D]`` -> ``[batch, seqlen, Hq, D]``.
    Other arguments as in :func:`moba_attn_varlen`.
    """
    _checks.check_qkv(q, k, v, token_dims=2)
    batch, seqlen = q.shape[:2]
    cu = batch_cu_seqlens(batch, seqlen, q.device)
    out = moba_attn_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, seqlen,
                           chunk_size, topk, softmax_scale, backend)
    return out.view(q.shape)


def moba_select_blocks(q, k, chunk_size, topk, cu_seqlens=None, max_seqlen=None):
    """The key blocks MoBA's gate selects for every (token, query head).

    Takes the varlen layout (q ``[total, Hq, D]`` with ``cu_seqlens``/``max_seqlen``) or the
    batched one (q ``[batch, seqlen, Hq, D]``, no ``cu_seqlens``).  Returns int32
    ``[..., Hq, topk]``: block indices within the token's own sequence, ascending, the
    token's own block always last among the valid ones, ``-1`` where fewer than ``topk``
    blocks exist up to the token.
    """
    batched = isinstance(q, torch.Tensor) and q.dim() == 4
    if batched:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is only for the varlen layout; q is 4-D [batch, seqlen, H, D]")
        _checks.check_qkv(q, k, k, token_dims=2)
        batch, seqlen = q.shape[:2]
        cu_seqlens, max_seqlen = batch_cu_seqlens(batch, seqlen, q.device), seqlen
        q, k = q.flatten(0, 1), k.flatten(0, 1)
    else:
        _checks.check_qkv(q, k, k, token_dims=1)
        if cu_seqlens is None:
            raise ValueError("cu_seqlens is required for 3-D q [total_tokens, H, D]")
    _checks.check_cu_seqlens(cu_seqlens, max_seqlen, q.device)
    cu_list = _checks.cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    chunk_size = _checks.check_int("chunk_size", chunk_size)
    topk = _checks.check_int("topk", topk)
    sel = select_blocks(q.detach(), k.detach(), block_layout(cu_list, chunk_size, q.device), topk)
    return sel.view(batch, seqlen, *sel.shape[1:]) if batched else sel
