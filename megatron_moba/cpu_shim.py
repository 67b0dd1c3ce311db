"""Running megatron-core 0.16.1 on machines without CUDA (development, demo, CI).

megatron-core assumes CUDA in a few places that matter for small CPU runs over gloo.
``apply_cpu_shim()`` patches exactly those, and only when CUDA is absent:

* ``torch.cuda.current_device()`` returns ``"cpu"`` (used as a ``device=`` argument for
  buffers and p2p shape tensors);
* ``torch.cuda.synchronize()`` is a no-op (dist_checkpointing and p2p call it);
* the pipeline schedules create their token counter with ``device="cuda"``: the schedules
  module sees a ``torch`` whose ``zeros`` maps ``device="cuda"`` to the CPU;
* the model-parallel RNG tracker (``get_cuda_rng_tracker().fork()``, entered around dropout
  under sequence/tensor parallelism) keeps CUDA generator states: on CPU its ``fork`` runs on
  the default CPU generator instead;
* RoPE's context-parallel slicing (``get_pos_emb_on_this_cp_rank``) builds its index in
  pinned memory and calls ``.cuda()``: replaced by the same slicing with a CPU index.

What the shim does *not* cover is avoided by the callers instead: no
``model_parallel_cuda_manual_seed`` (CUDA RNG tracker), torch ``AdamW`` instead of
megatron's optimizer (hardcodes CUDA), and a CPU-safe core attention for full-attention
layers in place of the local ``DotProductAttention`` (CUDA memory buffer).
"""
from __future__ import annotations

import contextlib
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


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """megatron's load-balanced RoPE slice (chunks r and 2cp-1-r), with a CPU index."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp, r = cp_group.size(), cp_group.rank()
    idx = torch.tensor([r, 2 * cp - r - 1], device=pos_emb.device)
    emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    emb = emb.index_select(seq_dim, idx)
    return emb.view(*emb.shape[:seq_dim], -1, *emb.shape[seq_dim + 2:])


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
        from megatron.core.tensor_parallel import random as tp_random
        tp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
        from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
        rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
        rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
        _APPLIED = True
    return True
