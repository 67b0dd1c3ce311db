"""Shared test helpers: random inputs, packed layouts, an independent brute-force MoBA,
flash-attention's error-ratio rule, and running a tool's command line in-process."""
from __future__ import annotations

import math
import os
import runpy
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repository


def tool_exit_code(monkeypatch, tool: str, *argv) -> int:
    """The exit code of `python tools/<tool> ARGV`, run as a script in this process (faster than a
    subprocess: torch and megatron-core are imported already)."""
    path = os.path.join(ROOT, "tools", tool)
    monkeypatch.setattr(sys, "argv", [path, *map(str, argv)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(path, run_name="__main__")
    return done.value.code


def cu_from_lens(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


def rand_qkv(total, hq, hkv, dim, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, hq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(total, hkv, dim, generator=g, dtype=torch.float64)
    v = torch.randn(total, hkv, dim, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def brute_force_moba(q, k, v, lens, chunk, topk, scale=None):
    """MoBA written token by token in float64 from the issue's definition, sharing no code
    with moba_kernels. Returns (out [T, Hq, D], selected: dict[(t, h)] -> sorted block list)."""
    q, k, v = q.double(), k.double(), v.double()
    total, hq, dim = q.shape
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(total, hq, dim, dtype=torch.float64)
    selected = {}
    start = 0
    for length in lens:
        nblocks = -(-length // chunk)
        for h in range(hq):
            kh = h // group
            means = [k[start + j * chunk:start + min(length, (j + 1) * chunk), kh].mean(0) for j in range(nblocks)]
            for i in range(length):
                t, own = start + i, i // chunk
                past = sorted(range(own), key=lambda j: -float(q[t, h] @ means[j]))
                blocks = sorted(past[:topk - 1] + [own])
                selected[(t, h)] = blocks
                keys = [start + s for j in blocks for s in range(j * chunk, min(length, (j + 1) * chunk)) if s <= i]
                w = torch.softmax(torch.stack([q[t, h] @ k[s, kh] for s in keys]) * scale, 0)
                out[t, h] = sum(wi * v[s, kh] for wi, s in zip(w, keys))
        start += length
    return out, selected


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def run_with_grads(fn, inputs, grad_out):
    """Run fn(*inputs) and return (out, grads of inputs) for the given output gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def assert_error_ratio(out, grads, ref_out, ref_grads, true_out, true_grads, names="qkv", fwd=2.0, bwd=3.0):
    """flash-attention's low-precision rule: the kernel's error against the truth is at most
    ``fwd`` x (output) / ``bwd`` x (each gradient) the error of the same-precision PyTorch
    reference against that truth.  out/grads: the kernel under test; ref_*: the same-precision
    reference; true_*: the fp64 (or fp32) truth."""
    checks = [("out", out, ref_out, true_out, fwd)]
    checks += [(f"d{n}", g, rg, tg, bwd) for n, g, rg, tg in zip(names, grads, ref_grads, true_grads, strict=True)]
    for name, x, ref, truth, factor in checks:
        err, ref_err = max_err(x, truth), max_err(ref, truth)
        ratio = err / ref_err if ref_err > 0 else (math.inf if err > 0 else 0.0)
        assert err <= factor * ref_err, (f"{name}: error {err:.3e} vs truth is {ratio:.2f}x the reference's "
                                         f"{ref_err:.3e} (allowed {factor:g}x)")
