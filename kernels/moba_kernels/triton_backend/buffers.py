"""The one place the Triton kernels' output buffers are allocated.

``empty`` / ``empty_like`` are ``torch.empty`` / ``torch.empty_like`` and ``zeros`` is
``torch.zeros`` (for buffers accumulated with atomics).  ``WATCH`` is None in production, so
nothing else happens.  The race and coverage checker (tests/kernels/triton_launch_check.py) sets
it to an object whose ``allocated(tensor, zero)`` fills each fresh ``empty`` buffer with NaN (or an
integer sentinel) and keeps track of it, so that an element no program writes shows up instead of
whatever ``torch.empty`` happened to hold.
"""
from __future__ import annotations

import torch

WATCH = None


def _seen(out: torch.Tensor, zero: bool) -> torch.Tensor:
    if WATCH is not None:
        WATCH.allocated(out, zero)
    return out


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    return _seen(torch.empty(*shape, dtype=dtype, device=device), False)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return _seen(torch.empty_like(t), False)


def zeros(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    return _seen(torch.zeros(*shape, dtype=dtype, device=device), True)
