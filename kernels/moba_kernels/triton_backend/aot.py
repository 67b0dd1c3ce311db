"""Ahead-of-time compilation of the backend's kernels for CUDA targets, without a GPU or driver.

``compile_kernel`` lowers one kernel with Triton's own compiler and the ``ptxas`` bundled with
Triton for ``GPUTarget("cuda", arch, 32)`` and reports what the hardware limits depend on:
registers, spill bytes, shared memory and ptxas performance warnings (C7515 and the like).
Used by ``aot_report`` (tools/triton_aot_report.py) and tests/kernels/test_triton_aot.py.

Must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``): callers start a
child process with that variable removed (``child_env``).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch

from . import kernel_config
from .tuning import CHUNK_REF, SMEM_LIMIT, configs, fits, smem_bytes

ARCHS = (80, 90)
# Spill bytes (stores + loads) allowed per kernel at the fixed launch configs, head dims 64-256,
# gate topk up to 17, both targets (tests/kernels/test_triton_aot.py; the full report adds fp16).
SPILL_BUDGET = {"_block_mean_kernel": 0, "_gate_topk_kernel": 0, "_own_fwd_kernel": 0, "_past_fwd_kernel": 0,
                "_own_dq_kernel": 0, "_past_dq_kernel": 0, "_dkdv_kernel": 0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS = ("Q", "K", "V", "DO", "DK", "DV")        # pointers in the input dtype
FP32_BUFFERS = ("ACC", "LSE", "DELTA", "DQ", "KM")      # fp32 accumulators; other pointers are int32
SCALARS = ("HQ", "HKV")                                  # upper-case names that are not pointers
TUNED = ("_own_fwd_kernel", "_past_fwd_kernel", "_dkdv_kernel", "_own_dq_kernel", "_past_dq_kernel")


def child_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "aot-cache"))
    return env


@dataclass
class Result:
    kernel: str
    arch: int
    dtype: str
    D: int
    config: str            # "default" (kernel_config) or "tune:BLOCK_N=..,w..s.."
    meta: Dict[str, int]
    num_warps: int
    num_stages: int
    ok: bool = True
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    smem_limit: int = 0
    warnings: List[str] = field(default_factory=list)
    kept: bool = True

    @property
    def spill(self) -> int:
        return self.spill_stores + self.spill_loads

    def as_dict(self) -> dict:
        return dict(asdict(self), spill=self.spill)


def _jit(kernel):
    from triton.runtime.autotuner import Autotuner
    return kernel.fn if isinstance(kernel, Autotuner) else kernel      # the jitted function under a tuner


def kernels() -> Dict[str, object]:
    from . import bwd, fwd, gate
    out = {n: _jit(getattr(m, n)) for m in (gate, fwd, bwd) for n in dir(m) if n.endswith("_kernel")}
    return dict(sorted(out.items()))


def signature(fn, dtype: str, constexprs: dict):
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            continue
        if name in ACTIVATIONS:
            sig[name] = "*" + dtype
        elif name in FP32_BUFFERS:
            sig[name] = "*fp32"
        elif name[0].isupper() and name not in SCALARS:
            sig[name] = "*i32"
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # as at run time: aligned pointers, and row strides that are multiples of the head dim
        if sig[name][0] == "*" or re.fullmatch(r"s(q|k|v|do|dk|dv|km)_[thb]", name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_PTXAS_INFO = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """Registers, spills and warnings of the one entry function in a ``ptxas -v`` log."""
    regs = re.findall(r"Used (\d+) registers", log)
    spill = _PTXAS_INFO.findall(log)
    warns = sorted({m.strip() for m in re.findall(r"(?:ptxas )?(?:warning|info)\s*:\s*(.*\(C\d{4}\).*)", log)})
    return dict(registers=int(regs[-1]) if regs else 0,
                spill_stores=int(spill[-1][1]) if spill else 0, spill_loads=int(spill[-1][2]) if spill else 0,
                warnings=warns)


def compile_kernel(name: str, arch: int, dtype: str, D: int, constexprs: dict, num_warps: int,
                   num_stages: int, config: str = "default", maxnreg: Optional[int] = None) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.knobs import compilation
    from triton.knobs import nvidia as nv_knobs

    fn = kernels()[name]
    res = Result(name, arch, dtype, D, config, dict(constexprs), num_warps, num_stages, smem_limit=SMEM_LIMIT[arch])
    sig, attrs = signature(fn, dtype, constexprs)
    target = GPUTarget("cuda", arch, 32)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    options = make_backend(target).parse_options(opts).__dict__
    log = io.StringIO()
    old = nv_knobs.dump_ptxas_log, compilation.always_compile
    nv_knobs.dump_ptxas_log, compilation.always_compile = True, True       # the log comes from a fresh ptxas run
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options)
    except Exception as exc:
        res.ok, res.error = False, f"{type(exc).__name__}: " + " | ".join(str(exc).strip().splitlines()[-3:])[:400]
        return res
    finally:
        nv_knobs.dump_ptxas_log, compilation.always_compile = old
    res.shared = compiled.metadata.shared
    for k, v in parse_ptxas_log(log.getvalue()).items():
        setattr(res, k, v)
    return res


def default_launch(name: str, D: int, chunk: int = CHUNK_REF, group: int = 2, topk: int = 3,
                   atomic: bool = False):
    """(constexprs, num_warps, num_stages) of a launch at the fixed config (no autotuning)."""
    cfg = kernel_config(D, chunk)
    w, s = cfg.num_warps, cfg.num_stages
    if name == "_block_mean_kernel":
        return dict(D=D, BLOCK_T=64), 4, 3
    if name == "_gate_topk_kernel":
        from .gate import gate_meta
        meta = gate_meta(D, topk, cfg.block_m)
        w, s = meta.pop("num_warps"), meta.pop("num_stages")
        return dict(D=D, GROUP=group, **meta), w, s
    n = cfg.dq_n if name.endswith("_dq_kernel") else cfg.block_n
    if name in ("_own_fwd_kernel", "_own_dq_kernel"):
        return dict(D=D, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=n, IEEE=False), w, s
    if name in ("_past_fwd_kernel", "_past_dq_kernel"):
        return dict(D=D, CHUNK=chunk, BLOCK_M=cfg.pair_m, BLOCK_N=n, IEEE=False), w, s
    if name == "_dkdv_kernel":
        return (dict(D=D, GROUP=group, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, ATOMIC_DQ=atomic, IEEE=False),
                cfg.dkdv_warps, cfg.dkdv_stages)
    raise KeyError(name)


def tuning_space(name: str, D: int, chunk: int = CHUNK_REF, atomic: bool = False):
    """Every autotune config of a tuned kernel at its fixed tile sizes:
    [(constexprs, num_warps, num_stages, {arch: kept by tuning.prune})]."""
    base, _, _ = default_launch(name, D, chunk, atomic=atomic)
    spec = kernels()[name].tuning
    out = []
    for c in configs(spec["block_n"], spec["kind"]):
        meta = dict(base, **c.kwargs)
        kept = {a: fits(spec["kind"], D, meta["BLOCK_M"], meta["BLOCK_N"], c.num_stages, SMEM_LIMIT[a], atomic=atomic)
                for a in ARCHS}
        out.append((meta, c.num_warps, c.num_stages, kept))
    return out


@dataclass
class Job:
    kernel: str
    arch: int
    dtype: str
    D: int
    config: str
    meta: dict
    num_warps: int
    num_stages: int
    kept: bool = True        # kept by the shared-memory pruning on this arch (tuned configs)

    def run(self) -> Result:
        r = compile_kernel(self.kernel, self.arch, self.dtype, self.D, self.meta, self.num_warps,
                           self.num_stages, self.config)
        r.kept = self.kept
        return r


def _config_smem(kind: str, D: int, atomic: bool, config) -> int:
    """Shared memory of one tuning config ``(meta, warps, stages, kept)`` (the largest one is compiled)."""
    return smem_bytes(kind, D, config[0]["BLOCK_M"], config[0]["BLOCK_N"], config[2], atomic=atomic)


def jobs(archs=ARCHS, dims=(64, 128, 256), dtypes=tuple(DTYPES), topks=(3, 8, 17), tuned="all",
         names=None) -> List[Job]:
    """The report's grid: every kernel at its fixed config (the gate at each topk, dK/dV with and
    without atomic dQ) and the autotune configs: ``tuned`` "all", "largest" (the kept config with
    the largest shared-memory estimate: the one nearest the limit) or "none"."""
    out = []
    for name in names or kernels():
        for arch in archs:
            for dt in dtypes:
                for D in dims:
                    variants = [dict(topk=t) for t in topks] if name == "_gate_topk_kernel" else \
                        [dict(atomic=False), dict(atomic=True)] if name == "_dkdv_kernel" else [{}]
                    for v in variants:
                        label = "default" + "".join(f" {k}={int(x)}" for k, x in v.items())
                        meta, w, s = default_launch(name, D, **v)
                        out.append(Job(name, arch, dt, D, label, meta, w, s))
                        if tuned == "none" or name not in TUNED:
                            continue
                        space = tuning_space(name, D, atomic=v.get("atomic", False))
                        if tuned == "largest":
                            kind, atomic = kernels()[name].tuning["kind"], v.get("atomic", False)
                            space = [max((c for c in space if c[3][arch]),
                                         key=partial(_config_smem, kind, D, atomic))]
                        for meta, w, s, kept in space:
                            tag = f"tune BLOCK_N={meta['BLOCK_N']} w{w}s{s}" + label[7:]
                            out.append(Job(name, arch, dt, D, tag, meta, w, s, kept[arch]))
    return out
