"""Autotuning of the attention kernels: a few configs each, keyed on head dim and tile sizes.

On CUDA the forward, dQ and dK/dV kernels are wrapped in ``triton.autotune`` over at most six
configs (keys per inner step x warps/pipeline stages; the dK/dV kernel: 8 warps x 1-3 stages),
less those whose shared memory would exceed the GPU's (``smem_bytes``, an upper bound checked
against ahead-of-time compiles for sm_80 and sm_90 by tests/kernels/test_triton_aot.py); the choice is
made once per key (head dim, chunk size, tile size, GQA group, dtype) and reused.  Kernels that
read-modify-write a buffer (``ACC``/``LSE``/``DQ``) get it restored between trials.  The first
call at a new key pays for compiling and timing the configs: tools/bench_attention.py reports it
as ``first_call_s``.

Off under Triton's interpreter and with ``MOBA_TRITON_AUTOTUNE=0``; then the fixed configs of
``kernel_config`` run.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = not INTERPRET and os.environ.get("MOBA_TRITON_AUTOTUNE", "1") != "0"
_WARPS_STAGES = ((4, 2), (8, 3))
_DKDV_WARPS_STAGES = ((8, 1), (8, 2), (8, 3))    # 4 warps spill the dK/dV kernel's [BLOCK_N, D] tiles
# Opt-in maximum of dynamic shared memory per block (CUDA programming guide, compute capabilities):
# sm_80 (A100) 163 KiB, sm_90 (H100/H200) 227 KiB.  Where a GPU is present its own figure is used.
SMEM_LIMIT = {80: 166_912, 90: 232_448}
CHUNK_REF = 512          # the chunk size the AOT report compiles the fixed configs for


def configs(block_n=True, kind="fwd"):
    """The autotune space of a kernel (before pruning by shared memory)."""
    metas = [{"BLOCK_N": n} for n in (32, 64, 128)] if block_n else [{}]
    pairs = _DKDV_WARPS_STAGES if kind == "dkdv" else _WARPS_STAGES
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta in metas for w, s in pairs]


def smem_bytes(kind, D, BLOCK_M, BLOCK_N, num_stages, elt=2, atomic=False) -> int:
    """An upper bound of a launch's shared memory (tests/kernels/test_triton_aot.py checks it against
    the compiled kernels on sm_80 and sm_90): the pipelined tiles of every stage plus the
    resident ones.  fwd/dq: q (and dO) resident, a K and a V tile per stage; dkdv: K and V
    resident, q and dO per stage (at least two: sm_90 stages them without pipelining too), the
    transposed P/dS, and the fp32 dQ tile with atomics."""
    kv = 2 * BLOCK_N * D * elt
    if kind == "dkdv":
        rows = max(num_stages, 2) * 2 * BLOCK_M * D * elt
        return kv + rows + 2 * BLOCK_M * BLOCK_N * elt + (4 * BLOCK_M * D if atomic else 0)
    return (1 if kind == "fwd" else 2) * BLOCK_M * D * elt + num_stages * kv


def fits(kind, D, BLOCK_M, BLOCK_N, num_stages, limit, elt=2, atomic=False) -> bool:
    return smem_bytes(kind, D, BLOCK_M, BLOCK_N, num_stages, elt, atomic) <= limit


def prune(configs, kind, limit, D, BLOCK_M, BLOCK_N=None, elt=2, atomic=False):
    """The configs whose shared memory fits ``limit`` (the smallest one if none does)."""
    def size(c):
        return smem_bytes(kind, D, BLOCK_M, c.kwargs.get("BLOCK_N", BLOCK_N), c.num_stages, elt, atomic)
    kept = [c for c in configs if size(c) <= limit]
    return kept or [min(configs, key=size)]


def _device_smem() -> int:
    from triton.runtime import driver
    return driver.active.utils.get_device_properties(driver.active.get_current_device())["max_shared_mem"]


def _early_prune(kind):
    def early(configs, named_args, **kwargs):
        q = named_args.get("Q")
        return prune(configs, kind, _device_smem(), kwargs["D"], kwargs["BLOCK_M"], kwargs.get("BLOCK_N"),
                     q.element_size() if q is not None else 2, bool(kwargs.get("ATOMIC_DQ", False)))
    return early


def tune(key, restore=(), block_n=True, kind="fwd"):
    """Decorator: autotune the kernel over BLOCK_N (if ``block_n``) and warps/stages, leaving out
    the configs whose shared memory exceeds the GPU's (``smem_bytes``)."""
    def wrap(kernel):
        kernel.tuning = dict(key=tuple(key), restore=tuple(restore), block_n=block_n, kind=kind)   # for the tests
        if not AUTOTUNE:
            return kernel
        return triton.autotune(configs(block_n, kind), key=list(key), restore_value=list(restore) or None,
                               prune_configs_by={"early_config_prune": _early_prune(kind)})(kernel)
    return wrap


def launch_kwargs(cfg, block_n=True, dkdv=False, dq=False) -> dict:
    """The meta-parameters a launcher passes itself: all of them without autotuning, else those
    the tuner does not choose (the dK/dV kernel's come from ``cfg.dkdv_*``)."""
    if dq and not AUTOTUNE:
        return dict(BLOCK_N=cfg.dq_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if dkdv:
        n, w, s = cfg.dkdv_n, cfg.dkdv_warps, cfg.dkdv_stages
        return dict(BLOCK_N=n, num_warps=w, num_stages=s) if not AUTOTUNE else dict(BLOCK_N=n)
    if not AUTOTUNE:
        return dict(BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return {} if block_n else dict(BLOCK_N=cfg.block_n)
