"""Fused MoBA gate: block means of the keys, then block scores and the running top-(k-1) in one
pass per query tile.

For ``BLOCK_M`` (16) rows of a query tile (one own block ``c``, see tiles.py; a tile of up to
64 rows gets one program per 16 rows) and one query head, the kernel walks the earlier blocks
``0..c-1`` of the sequence ``BLOCK_N`` at a time, scores them against the mean-pooled keys
(fp32, IEEE) and merges each score tile into a running top-(k-1) kept in registers.  The
``[tokens, heads, blocks]`` score tensor never exists: memory is O(tokens x heads x topk).
Semantics are those of ``moba_kernels.gate.select_blocks``.  16 rows keep the fp32 query tile,
the score tile and the top-(k-1) in registers without spills for head dims up to 256 and topk up
to 17 (tools/triton_aot_report.py; 64-row programs spilled up to 20 KB at D=128).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BlockLayout
from . import buffers
from .tiles import QueryTiles


@triton.jit
def _block_mean_kernel(K, KM, BLOCK_START, BLOCK_LEN, sk_t, sk_h, skm_b, skm_h,
                       BLOCK_T: tl.constexpr, D: tl.constexpr):
    """Mean of each key block, fp32: one program per (block, kv head)."""
    blk, g = tl.program_id(0), tl.program_id(1)
    start, n = tl.load(BLOCK_START + blk), tl.load(BLOCK_LEN + blk)
    d = tl.arange(0, D)
    total = tl.zeros([D], tl.float32)
    for t0 in range(0, n, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        k = tl.load(K + (start + t)[:, None] * sk_t + g * sk_h + d[None, :], mask=(t < n)[:, None], other=0.0)
        total += tl.sum(k.to(tl.float32), 0)
    tl.store(KM + blk * skm_b + g * skm_h + d, total / n)


def block_mean_keys_triton(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """k [T, Hkv, D] -> [NB, Hkv, D] float32 block means (no fp32 copy of k)."""
    kmean = buffers.empty(layout.num_blocks, k.shape[1], k.shape[2], dtype=torch.float32, device=k.device)
    if layout.num_blocks:
        _block_mean_kernel[(layout.num_blocks, k.shape[1])](
            k, kmean, layout.block_start.to(torch.int32), layout.block_len.to(torch.int32), k.stride(0), k.stride(1),
            kmean.stride(0), kmean.stride(1), BLOCK_T=64, D=k.shape[2])
    return kmean


@triton.jit
def _gate_topk_kernel(Q, KM, OUT, T_ROW, T_LEN, T_OWN, T_FIRST,
                      sq_t, sq_h, skm_b, skm_h, so_t, so_h,
                      GROUP: tl.constexpr, K1: tl.constexpr, KP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    tile, h, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, n = tl.load(T_ROW + tile), tl.load(T_LEN + tile)
    if part * BLOCK_M >= n:                                                      # a short tile
        return
    own, first = tl.load(T_OWN + tile), tl.load(T_FIRST + tile)
    m = part * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    rows = (start + m).to(tl.int64)                    # int64 offsets: T * Hq * D may pass 2^31
    q = tl.load(Q + rows[:, None] * sq_t + h * sq_h + d[None, :], mask=(m < n)[:, None], other=0.0)
    q = q.to(tl.float32)                                                            # [BM, D]
    slot = tl.arange(0, KP)[None, :]
    # padding slots (>= K1) hold +inf so they are never the minimum that gets replaced
    top_v = tl.where(slot < K1, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    top_i = tl.full([BLOCK_M, KP], -1, tl.int32)
    cols = tl.arange(0, BLOCK_N)
    for j0 in range(0, own, BLOCK_N):
        blk = j0 + cols
        km = tl.load(KM + (first + blk)[:, None] * skm_b + (h // GROUP) * skm_h + d[None, :],
                     mask=(blk < own)[:, None], other=0.0)                          # [BN, D]
        s = tl.dot(q, tl.trans(km), input_precision="ieee")                          # [BM, BN]
        s = tl.where((blk < own)[None, :], s, float("-inf"))
        for _ in tl.static_range(K1):          # move the tile's best entries into the running top-(k-1)
            best = tl.max(s, 1)
            best_at = tl.argmax(s, 1)
            worst = tl.min(top_v, 1)
            worst_at = tl.argmin(top_v, 1)
            take = (best > worst)[:, None] & (slot == worst_at[:, None])
            top_v = tl.where(take, best[:, None], top_v)
            top_i = tl.where(take, (j0 + best_at)[:, None].to(tl.int32), top_i)
            s = tl.where(cols[None, :] == best_at[:, None], float("-inf"), s)
    top_i = tl.where(top_v == float("-inf"), -1, top_i)
    tl.store(OUT + rows[:, None] * so_t + h * so_h + slot, top_i, mask=(m < n)[:, None] & (slot < K1))


GATE_ROWS = 16


def gate_meta(dim: int, topk: int, block_m: int) -> dict:
    """Meta-parameters of a ``_gate_topk_kernel`` launch (also compiled by aot.py)."""
    k1 = max(topk - 1, 1)
    return dict(K1=k1, KP=triton.next_power_of_2(k1), BLOCK_M=min(GATE_ROWS, block_m), BLOCK_N=32,
                num_warps=4, num_stages=2)


def select_blocks_triton(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int,
                         tiles: QueryTiles, block_m: int, q_tok: torch.Tensor) -> torch.Tensor:
    """Same contract as ``gate.select_blocks``: int32 ``[Tq, Hq, topk]``, ascending, own block
    last among the valid entries, -1 padding."""
    total, hq, dim = q.shape
    own = layout.token_local_block[q_tok].to(torch.int32)[:, None, None].expand(total, hq, 1)
    if topk == 1:
        return own.contiguous()
    kmean = block_mean_keys_triton(k, layout)                                       # [NB, Hkv, D] fp32
    past = buffers.empty(total, hq, topk - 1, dtype=torch.int32, device=q.device)
    if tiles.count:
        meta = gate_meta(dim, topk, block_m)
        _gate_topk_kernel[(tiles.count, hq, triton.cdiv(block_m, meta["BLOCK_M"]))](
            q, kmean, past, tiles.row, tiles.length, tiles.own, tiles.first_block,
            q.stride(0), q.stride(1), kmean.stride(0), kmean.stride(1), past.stride(0), past.stride(1),
            GROUP=hq // k.shape[1], D=dim, **meta)
    sel = torch.cat([past, own], dim=-1)
    # ascending with the -1 padding at the end (the own block is the largest valid id)
    big = torch.iinfo(torch.int32).max
    ordered = torch.sort(torch.where(sel < 0, big, sel), dim=-1).values
    return ordered.masked_fill_(ordered == big, -1)
