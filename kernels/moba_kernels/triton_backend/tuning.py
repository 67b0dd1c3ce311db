"""Autotuning of the attention kernels: a few configs each, keyed on head dim and tile sizes.

On CUDA the forward, dQ and dK/dV kernels are wrapped in ``triton.autotune`` over at most six
configs (keys per inner step x warps/pipeline stages); the choice is made once per key (head dim,
chunk size, tile size, GQA group, dtype) and reused.  Kernels that read-modify-write a buffer
(``ACC``/``LSE``/``DQ``) get it restored between trials.  The first call at a new key pays for
compiling and timing the configs: tools/bench_attention.py reports it as ``first_call_s``.

Off under Triton's interpreter and with ``MOBA_TRITON_AUTOTUNE=0``; then the fixed configs of
``kernel_config`` run.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = not INTERPRET and os.environ.get("MOBA_TRITON_AUTOTUNE", "1") != "0"
_WARPS_STAGES = ((4, 2), (8, 3))


def tune(key, restore=(), block_n=True):
    """Decorator: autotune the kernel over BLOCK_N (if ``block_n``) and warps/stages."""
    def wrap(kernel):
        kernel.tuning = dict(key=tuple(key), restore=tuple(restore), block_n=block_n)   # for the tests
        if not AUTOTUNE:
            return kernel
        metas = [{"BLOCK_N": n} for n in (32, 64, 128)] if block_n else [{}]
        configs = [triton.Config(meta, num_warps=w, num_stages=s) for meta in metas for w, s in _WARPS_STAGES]
        return triton.autotune(configs, key=list(key), restore_value=list(restore) or None)(kernel)
    return wrap


def launch_kwargs(cfg, block_n=True) -> dict:
    """The meta-parameters a launcher passes itself: all of them without autotuning, else those
    the tuner does not choose."""
    if not AUTOTUNE:
        return dict(BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return {} if block_n else dict(BLOCK_N=cfg.block_n)
