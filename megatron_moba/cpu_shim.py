"""Running megatron-core 0.16.1 on machines without CUDA (development, demo, CI).

megatron-core assumes CUDA in a few places that matter for small CPU runs over gloo.
``apply_cpu_shim()`` patches exactly those, and only when CUDA is absent:

* ``torch.cuda.current_device()`` returns ``"cpu"`` (used as a ``device=`` argument for
  buffers and p2p shape tensors);
* ``torch.cuda.synchronize()`` is a no-op (dist_checkpointing and p2p call it);
* the pipeline schedules create their token counter with ``device="cuda"``: the schedules
  module sees a ``torch`` whose ``zeros`` maps ``device="cuda"`` to the CPU.

What the shim does *not* cover is avoided by the callers instead: no
``model_parallel_cuda_manual_seed`` (CUDA RNG tracker), torch ``AdamW`` instead of
megatron's optimizer (hardcodes CUDA), and a CPU-safe core attention for full-attention
layers in place of the local ``DotProductAttention`` (CUDA memory buffer).
"""
from __future__ import annotations

import types

import torch

_APPLIED = False


class _CpuZerosTorch(types.ModuleType):
    """A stand-in for the ``torch`` module inside megatron's schedules."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def apply_cpu_shim() -> bool:
    """Apply the shim if CUDA is unavailable; returns whether it is active. Idempotent."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if not _APPLIED:
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *args, **kwargs: None
        from megatron.core.pipeline_parallel import schedules
        schedules.torch = _CpuZerosTorch()
        _APPLIED = True
    return True
