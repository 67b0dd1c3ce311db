"""Every patch megatron_moba makes to megatron-core's (and torch's) behaviour, in one place.

Library code never patches: the entry points apply what their process needs once, through
``apply_patches()`` (``python -m megatron_moba.pretrain``, the tools, the tests' process harness),
and library code that needs a patch checks for it and names this function in its error.  Each
patch first checks that the installed megatron-core is supported (``core.versions``), since it
replaces megatron's internals by name; patches that only some releases need are listed per release.

1. The CPU shim (``apply_cpu_shim``; only without CUDA): megatron-core (0.16.1 to 0.19.x) assumes
   CUDA in a few places that matter for small CPU runs over gloo:

   * ``torch.cuda.current_device()`` returns ``"cpu"`` (used as a ``device=`` argument for
     buffers and p2p shape tensors);
   * ``torch.cuda.synchronize()`` is a no-op (dist_checkpointing and p2p call it);
   * the pipeline schedules create their token counter with ``device="cuda"``: the schedules
     module sees a ``torch`` whose ``zeros`` maps ``device="cuda"`` to the CPU;
   * the model-parallel RNG tracker (``get_cuda_rng_tracker().fork()``, entered around dropout
     under sequence/tensor parallelism) keeps CUDA generator states: on CPU its ``fork`` runs on
     the default CPU generator instead;
   * activation recomputation (``tensor_parallel.checkpoint``) saves and restores the CUDA RNG
     state beside the CPU one: on CPU there is only the CPU one;
   * RoPE's context-parallel slicing (``get_pos_emb_on_this_cp_rank``) builds its index in
     pinned memory and calls ``.cuda()``: replaced by the same slicing with a CPU index.

   What it does *not* cover is avoided by the callers instead: no ``model_parallel_cuda_manual_seed``
   (CUDA RNG tracker), and a CPU-safe core attention for full-attention layers in place of the local
   ``DotProductAttention`` (CUDA memory buffer).

2. The CPU optimizer shim (``apply_cpu_optimizer_shim``; only without CUDA, for
   ``--optimizer-impl megatron``, how the tests run the GPU default path on CPU): megatron's
   optimizer (``get_megatron_optimizer``, the distributed optimizer, grad clipping) allocates its
   scalars with ``device='cuda'`` and accepts only parameters whose ``Tensor.type()`` reads
   ``torch.cuda.*Tensor``:

   * the ``torch`` seen by megatron's optimizer modules (the fp16 loss scaler's too) and
     ``megatron.core.utils`` maps ``device='cuda'`` to the CPU in ``tensor/zeros/empty/ones/full``;
   * ``Tensor.type()`` without arguments reports CPU tensors as ``torch.cuda.*Tensor``;
   * the fp16 loss scaler loads its scale onto the CPU (megatron's moves it with ``.cuda()``);
   * 0.19+: DDP's grad buffers wait for CUDA-graph events on ``torch.cuda.current_stream()`` before
     every gradient reduction: the ``torch`` seen by ``param_and_grad_buffer`` has a ``cuda`` whose
     ``current_stream()`` is a stream that waits for nothing.

3. Loading megatron's distributed optimizer over torch's Adam (``load_optimizer_state``; on CUDA too,
   whenever megatron's optimizer wraps ``torch.optim.Adam``/``AdamW``, i.e. without TE's or apex's
   FusedAdam, as in a plain PyTorch install): not process-wide, it replaces one method on one
   optimizer instance for the duration of one ``load_state_dict`` (see ``load_optimizer_state``).
"""
from __future__ import annotations

import contextlib
import types
from functools import partial
from typing import List, Optional

import torch

from megatron_moba.core.versions import megatron_core_version

PATCH_HINT = ("call megatron_moba.training.compat.apply_patches() once at the start of the process "
              "(python -m megatron_moba.pretrain and the tools do)")

_APPLIED = False


def _on_cpu(factory):
    def make(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return staticmethod(make)


class _CpuZerosTorch(types.ModuleType):
    """A stand-in for the ``torch`` module inside megatron's schedules."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    zeros = _on_cpu(torch.zeros)


class _CpuFactoriesTorch(_CpuZerosTorch):
    """The stand-in for megatron's optimizer modules: every factory they call with device='cuda'."""

    tensor, empty, ones, full = (_on_cpu(f) for f in (torch.tensor, torch.empty, torch.ones, torch.full))


class _NullStream:
    """A CUDA stream stand-in on CPU: there is nothing to wait for."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


class _CpuStreamsCuda(types.ModuleType):
    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_stream(device=None):
        return _NullStream()


class _CpuStreamsTorch(types.ModuleType):
    """The stand-in for megatron's grad buffers (0.19+): ``torch.cuda.current_stream()`` on CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuStreamsCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _scaler_load_state_dict_on_cpu(self, state_dict):
    """megatron's ``DynamicGradScaler.load_state_dict`` (fp16 loss scale), keeping the scale on the CPU."""
    self._scale = state_dict["scale"].cpu()
    self._growth_tracker = state_dict["growth_tracker"]
    self._hysteresis_tracker = state_dict["hysteresis_tracker"]


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
    """Apply the CPU shim (patch 1) if CUDA is unavailable; returns whether it is active. Idempotent."""
    global _APPLIED
    megatron_core_version()             # a clear error outside the supported releases
    if torch.cuda.is_available():
        return False
    if not _APPLIED:
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *args, **kwargs: None
        from megatron.core.pipeline_parallel import schedules
        schedules.torch = _CpuZerosTorch()
        from megatron.core.tensor_parallel import random as tp_random
        tp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
        # activation recomputation (tensor_parallel.checkpoint) saves and restores the CUDA RNG state
        # next to the CPU one: without CUDA there is only the CPU one
        tp_random._get_cuda_rng_state = lambda *args, **kwargs: None
        tp_random._set_cuda_rng_state = lambda *args, **kwargs: None
        from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
        rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
        rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
        _APPLIED = True
    return True


_OPTIMIZER_APPLIED = False


def _grad_buffer_streams_on_cpu():
    from megatron.core.distributed import param_and_grad_buffer
    param_and_grad_buffer.torch = _CpuStreamsTorch()


# (first release that needs it, patch): the optimizer-path patches that only some releases need
_OPTIMIZER_PATCHES = [
    ((0, 19, 0), _grad_buffer_streams_on_cpu),      # start_grad_sync waits on torch.cuda.current_stream()
]


def apply_cpu_optimizer_shim() -> bool:
    """Let megatron's optimizer run on CPU (patch 2 of the module docstring); returns whether it is
    active.  Only without CUDA; implies ``apply_cpu_shim()``.  Idempotent."""
    global _OPTIMIZER_APPLIED
    if not apply_cpu_shim():
        return False
    if not _OPTIMIZER_APPLIED:
        import megatron.core.utils as core_utils
        from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler, optimizer
        for module in (optimizer, distrib_optimizer, clip_grads, grad_scaler, core_utils):
            module.torch = _CpuFactoriesTorch()
        grad_scaler.DynamicGradScaler.load_state_dict = _scaler_load_state_dict_on_cpu
        plain_type = torch.Tensor.type

        def cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
            if dtype is None and not kwargs and not self.is_cuda:
                return plain_type(self).replace("torch.", "torch.cuda.", 1)
            return plain_type(self, dtype, non_blocking, **kwargs)
        torch.Tensor.type = cuda_type_name
        version = megatron_core_version()
        for since, patch in _OPTIMIZER_PATCHES:
            if version >= since:
                patch()
        _OPTIMIZER_APPLIED = True
    return True


def apply_patches(optimizer_impl: Optional[str] = "megatron") -> List[str]:
    """What an entry point calls once: on a machine without CUDA the CPU shim, plus the CPU optimizer
    shim unless ``optimizer_impl`` is ``"torch"`` (the job's ``--optimizer-impl``); on CUDA nothing.
    Checks the megatron-core release first.  Returns the names of the active patches."""
    megatron_core_version()
    active = []
    if apply_cpu_shim():
        active.append("cpu_shim")
        if optimizer_impl != "torch" and apply_cpu_optimizer_shim():
            active.append("cpu_optimizer_shim")
    return active


def require_cpu_shim(what: str) -> None:
    """Raise a clear error when ``what`` is about to run megatron-core on a machine without CUDA and
    the entry point did not apply the CPU shim."""
    if not torch.cuda.is_available() and not _APPLIED:
        raise RuntimeError(f"{what} runs megatron-core without CUDA, which needs megatron_moba's CPU shim: "
                           + PATCH_HINT)


def require_cpu_optimizer_shim(what: str) -> None:
    """As ``require_cpu_shim``, for megatron's optimizer on a machine without CUDA."""
    if not torch.cuda.is_available() and not _OPTIMIZER_APPLIED:
        raise RuntimeError(f"{what} runs megatron's optimizer without CUDA, which needs megatron_moba's CPU "
                           "optimizer shim: " + PATCH_HINT + " (with optimizer_impl='megatron')")


# Patch 3.  megatron-core's distributed optimizer (0.16.1 to 0.19.x alike) over torch's Adam keeps the
# Adam step in its param groups, but its param-state loaders then (a) copy every per-parameter state
# key, "step" included, from a source without it (fully_reshardable: KeyError) or (b) overwrite
# "step" with the placeholder of the request (dp_reshardable).  On that optimizer instance only, for
# one load: copy the keys present, then restore the step from the loaded param groups.

def _set_present_states(part, model_param, tensors):
    group_index, group_order = part.model_param_group_index_map[model_param]
    main_param = part.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **part.optimizer.state[main_param]}
    for key, value in destination.items():
        if key != "step" and key in tensors:
            value.copy_(tensors[key])


def _restore_adam_step(part, part_state):
    steps = {g["step"] for g in part_state["optimizer"]["param_groups"] if g.get("step") is not None}
    if len(steps) == 1:
        step = float(steps.pop())
        for st in part.optimizer.state.values():
            st["step"] = torch.tensor(step, dtype=torch.float32)


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` for megatron's (possibly chained) optimizer, with patch 3
    applied to the parts that are megatron's distributed optimizer over torch's Adam(W)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(parts) == 1 else [state[i] for i in range(len(parts))]
    torch_adam = [isinstance(part.optimizer, (torch.optim.Adam, torch.optim.AdamW)) and "param_state" in st
                  for part, st in zip(parts, states)]
    for part, fix in zip(parts, torch_adam):
        if fix:
            part._set_main_param_and_optimizer_states = partial(_set_present_states, part)
    try:
        with torch.no_grad():             # main-weight shards are views of leaves that require grad
            optimizer.load_state_dict(state)
    finally:
        for part, fix in zip(parts, torch_adam):
            if fix:
                del part._set_main_param_and_optimizer_states
    for part, part_state, fix in zip(parts, states, torch_adam):
        if fix:
            _restore_adam_step(part, part_state)
