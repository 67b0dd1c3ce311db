#!/usr/bin/env python
"""A tour of the MoBA op on CPU (what `make demo` runs until the training job lands).

    python examples/moba_op_demo.py [--seqlen 8192] [--chunk-size 512] [--topk 3]

1. packs three documents of different lengths (varlen, flash-attention layout) and
   checks the fast `torch` backend against the dense `reference` backend;
2. shows the blocks the gate picks for a few tokens;
3. times MoBA against dense causal SDPA on one long sequence, forward and backward.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from moba_kernels import moba_attn, moba_attn_varlen, moba_select_blocks


def timed(fn, reps=3):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=8192, help="length of the timed sequence")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 64

    # 1. packed documents [total, H, D] with int32 cu_seqlens
    lens = [300, 1500, 2200]
    cu = torch.tensor([0, 300, 1800, 4000], dtype=torch.int32)
    q, k, v = torch.randn(4000, hq, d), torch.randn(4000, hkv, d), torch.randn(4000, hkv, d)
    fast = moba_attn_varlen(q, k, v, cu, max(lens), chunk_size=256, topk=3, backend="torch")
    ref = moba_attn_varlen(q, k, v, cu, max(lens), chunk_size=256, topk=3, backend="reference")
    print(f"[1] packed docs {lens}, GQA {hq}/{hkv}, chunk 256, topk 3: "
          f"torch vs reference max |diff| = {(fast - ref).abs().max().item():.2e}")

    # 2. the gate's choices (block indices within each document, -1 = fewer blocks exist)
    sel = moba_select_blocks(q, k, chunk_size=256, topk=3, cu_seqlens=cu, max_seqlen=max(lens))
    for t in (10, 299, 300 + 1400, 1800 + 2150):
        print(f"[2] token {t:>4}, head 0 attends blocks {sel[t, 0].tolist()}")

    # 3. one long sequence: MoBA vs dense causal attention
    s, c, kk = args.seqlen, args.chunk_size, args.topk
    qb, kb, vb = (torch.randn(1, s, 4, d, requires_grad=True) for _ in range(3))
    dense = lambda: F.scaled_dot_product_attention(
        qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), is_causal=True)
    moba = lambda: moba_attn(qb, kb, vb, c, kk, backend="torch")
    frac = min(1.0, (kk * c) / ((s + 1) / 2))
    print(f"[3] seqlen {s}, 4 heads, head dim 64, chunk {c}, topk {kk} "
          f"(each late query sees <= {kk * c} keys, ~{100 * frac:.0f}% of the causal average)")
    for name, fn in (("dense SDPA", dense), ("MoBA torch", moba)):
        fwd = timed(fn)
        fb = timed(lambda fn=fn: fn().sum().backward())
        print(f"    {name:>10}: forward {fwd:8.1f} ms   forward+backward {fb:8.1f} ms")
    print("done: see tools/bench_attention.py for the full benchmark")


if __name__ == "__main__":
    main()
