"""MoBA forward in Triton: the own block (causal), then the selected earlier blocks, slot by slot.

Output is kept as a running fp32 accumulator ``acc`` [T*Hq, D] (already normalized) and its
log-sum-exp ``lse`` [T*Hq] (natural log):

* ``_own_fwd_kernel``   one program per (query tile, query head): flash attention of the tile
  against the keys of its own block up to the tile's last row (causal mask on the diagonal);
  writes acc / lse.
* ``_past_fwd_kernel``  one launch per slot r; one program per tile of selection pairs that chose
  the same (earlier key block, kv head) in slot r (tiles.PastIndex): the pairs' query rows
  (any query heads of that kv head: native GQA, K/V read once per tile) against the whole block
  (earlier blocks are full and entirely in the past: no mask), then merged into the rows'
  acc / lse by log-sum-exp.  A row appears once per slot, so the read-modify-write is race-free.

Exponentials are base 2 (``exp2``) with the scale folded in, as in flash-attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers
from .tuning import launch_kwargs, tune

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _attend_tile(q, K, V, m_i, l_i, acc, k_lo, k_hi, rows, g, sk_t, sk_h, sv_t, sv_h, qk_scale,
                 CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of q [BM, D] (at tokens ``rows``) over keys [k_lo, k_hi) of kv head g
    (scores in log2 units)."""
    d = tl.arange(0, D)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)                           # int64: T * H * D may pass 2^31
        inside = cols < k_hi
        k = tl.load(K + cols[:, None] * sk_t + g * sk_h + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * sv_t + g * sv_h + d[None, :], mask=inside[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        visible = inside[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]                 # rescaled first, then the accumulator of the dot
        if IEEE:                                   # (no temporary [BM, D] tile)
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return m_i, l_i, acc


@tune(key=("D", "BLOCK_M", "GROUP", "IEEE"))
@triton.jit
def _own_fwd_kernel(Q, K, V, ACC, LSE, T_ROW, T_TOK, T_LEN, T_BSTART,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, qk_scale, HQ,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                    IEEE: tl.constexpr):
    tile, h = tl.program_id(0), tl.program_id(1)
    row0, tok0 = tl.load(T_ROW + tile), tl.load(T_TOK + tile)
    n, bstart = tl.load(T_LEN + tile), tl.load(T_BSTART + tile)
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    rows = (row0 + m).to(tl.int64)                                                 # query rows; tokens tok0 + m
    live = m < n
    q = tl.load(Q + rows[:, None] * sq_t + h * sq_h + d[None, :], mask=live[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m_i, l_i, acc = _attend_tile(q, K, V, m_i, l_i, acc, bstart, tok0 + n, tok0 + m, h // GROUP,
                                 sk_t, sk_h, sv_t, sv_h, qk_scale, True, BLOCK_N, D, IEEE)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    flat = rows * HQ + h
    tl.store(ACC + flat[:, None] * D + d[None, :], acc / l_safe[:, None], mask=live[:, None])
    tl.store(LSE + flat, (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=live)


@tune(key=("D", "CHUNK", "BLOCK_M", "IEEE"), restore=("ACC", "LSE"))
@triton.jit
def _past_fwd_kernel(Q, K, V, ACC, LSE, ROWS, TILE_PAIR, TILE_LEN, TILE_GROUP, BLOCK_START,
                     sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, qk_scale, HQ, HKV, SLOT_RANGE, slot,
                     CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                     IEEE: tl.constexpr):
    tile = tl.load(SLOT_RANGE + 2 * slot) + tl.program_id(0)
    if tile >= tl.load(SLOT_RANGE + 2 * slot + 1):                                # the grid is a bound
        return
    first, n, grp = tl.load(TILE_PAIR + tile), tl.load(TILE_LEN + tile), tl.load(TILE_GROUP + tile)
    blk, g = grp // HKV, grp % HKV
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    live = m < n
    flat = tl.load(ROWS + first + m, mask=live, other=0).to(tl.int64)            # token * HQ + head
    q = tl.load(Q + (flat // HQ)[:, None] * sq_t + (flat % HQ)[:, None] * sq_h + d[None, :],
                mask=live[:, None], other=0.0)
    kstart = tl.load(BLOCK_START + blk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m_i, l_i, acc = _attend_tile(q, K, V, m_i, l_i, acc, kstart, kstart + CHUNK, m, g,
                                 sk_t, sk_h, sv_t, sv_h, qk_scale, False, BLOCK_N, D, IEEE)
    lse_p = (m_i + tl.log2(l_i)) * 0.6931471805599453                            # natural log, finite
    lse_a = tl.load(LSE + flat, mask=live, other=0.0)
    o_a = tl.load(ACC + flat[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    top = tl.maximum(lse_a, lse_p)
    w_a, w_p = tl.exp(lse_a - top), tl.exp(lse_p - top)
    tot = w_a + w_p
    tl.store(ACC + flat[:, None] * D + d[None, :],
             (o_a * w_a[:, None] + (acc / l_i[:, None]) * w_p[:, None]) / tot[:, None], mask=live[:, None])
    tl.store(LSE + flat, top + tl.log(tot), mask=live)


def moba_fwd_triton(q, k, v, layout, tiles, past, softmax_scale: float, cfg):
    """q [Tq, Hq, D], k/v [T, Hkv, D] -> out [Tq, Hq, D] (dtype of q), lse [Tq, Hq] fp32."""
    total, hq, dim = q.shape
    hkv = k.shape[1]
    ieee = q.dtype == torch.float32
    acc = buffers.empty(total * hq, dim, dtype=torch.float32, device=q.device)
    lse = buffers.empty(total * hq, dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    qk_scale = softmax_scale * LOG2E
    if tiles.count:
        _own_fwd_kernel[(tiles.count, hq)](
            q, k, v, acc, lse, tiles.row, tiles.token, tiles.length, tiles.block_start, *strides, qk_scale, hq,
            GROUP=hq // hkv, BLOCK_M=cfg.block_m, D=dim, IEEE=ieee, **launch_kwargs(cfg))
    block_start = layout.block_start.to(torch.int32)
    for slot in range(past.slots):
        _past_fwd_kernel[(past.grid,)](
            q, k, v, acc, lse, past.rows, past.tile_pair, past.tile_len, past.tile_group, block_start,
            *strides, qk_scale, hq, hkv, past.slot_range, slot, CHUNK=layout.chunk_size, BLOCK_M=cfg.pair_m,
            D=dim, IEEE=ieee, **launch_kwargs(cfg))
    return acc.view(total, hq, dim).to(q.dtype), lse.view(total, hq)
