"""MoBA backward in Triton (flash-attention style: scores recomputed from q, k and the saved LSE).

* ``_dkdv_kernel``     one program per (key block, kv head, key tile): the one writer of those
  keys' dK/dV.  It walks (1) the queries of the same block at or after the key tile (own block,
  causal), for every query head of the kv head, then (2) the reverse index: every selection pair,
  of any slot and query head, that chose this block (tiles.PastIndex.group_start).  No atomics.
* dQ, two ways (``dq_mode``):
  - ``"separate"`` (deterministic, the default): ``_own_dq_kernel``, one program per (query tile,
    query head), writes the own block's dQ; then ``_past_dq_kernel`` per slot, one program per
    pair tile, adds the earlier blocks' dQ (a row appears once per slot: race-free).  Scores are
    recomputed once more.
  - ``"atomic"``: the dK/dV kernel also adds dS @ K into dq with fp32 atomics (no recompute, but
    the summation order varies from run to run).  Never used under
    ``torch.use_deterministic_algorithms(True)``.
dq is accumulated in fp32; P = exp2(S * scale * log2e - lse * log2e), dS = P * (dP - delta) with
delta = rowsum(dO * O).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers
from .fwd import LOG2E
from .tuning import launch_kwargs, tune


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with acc as the dot's own accumulator (no temporary [M, N] tile)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_queries(Q, DO, LSE, DELTA, t, h, live, sq_t, sq_h, sdo_t, sdo_h, HQ, D: tl.constexpr):
    """q, dO [BM, D], lse (log2 units) and delta [BM] of query rows (token t, head h)."""
    d = tl.arange(0, D)
    t = t.to(tl.int64)                                                              # int64: T * H * D may pass 2^31
    q = tl.load(Q + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :], mask=live[:, None], other=0.0)
    do = tl.load(DO + t[:, None] * sdo_t + h[:, None] * sdo_h + d[None, :], mask=live[:, None], other=0.0)
    flat = t * HQ + h
    lse2 = tl.load(LSE + flat, mask=live, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + flat, mask=live, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _dkdv_from_queries(q, do, lse2, delta, k, v, dk, dv, visible, qk_scale, DQ, flat, live, scale,
                       D: tl.constexpr, ATOMIC_DQ: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate one tile of queries (q/do [BM, D], lse2/delta [BM]) into dk/dv [BN, D]
    (and, with ATOMIC_DQ, their dQ into DQ rows ``flat``)."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale                                      # [BM, BN]
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    dv = _dot_acc(tl.trans(p.to(do.dtype)), do, dv, IEEE)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    dk = _dot_acc(tl.trans(ds.to(q.dtype)), q, dk, IEEE)
    if ATOMIC_DQ:
        d = tl.arange(0, D)
        tl.atomic_add(DQ + flat.to(tl.int64)[:, None] * D + d[None, :], _dot(ds.to(k.dtype), k, IEEE) * scale,
                      mask=live[:, None])
    return dk, dv


@tune(key=("D", "GROUP", "BLOCK_M", "BLOCK_N", "ATOMIC_DQ", "IEEE"), restore=("DQ",), block_n=False, kind="dkdv")
@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, ROWS, GROUP_START, BLOCK_START, BLOCK_LEN, QTOK,
                 KT_FIRST, BLK_END, kt_per_block,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
                 qk_scale, scale, HQ, HKV,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                 ATOMIC_DQ: tl.constexpr, IEEE: tl.constexpr):
    grp, j = tl.program_id(0), tl.program_id(1)
    blk, g = grp // HKV, grp % HKV
    bstart, blen = tl.load(BLOCK_START + blk), tl.load(BLOCK_LEN + blk)
    if j * BLOCK_N < blen:
        d = tl.arange(0, D)
        m = tl.arange(0, BLOCK_M)
        kcol = (bstart + j * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        kin = kcol < bstart + blen
        k = tl.load(K + kcol[:, None] * sk_t + g * sk_h + d[None, :], mask=kin[:, None], other=0.0)
        v = tl.load(V + kcol[:, None] * sv_t + g * sv_h + d[None, :], mask=kin[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        # One loop, one copy of the body (two loops made ptxas spill): steps [0, GROUP * n_own) walk
        # (1) the own block's query rows at or after the first key of this tile, causal on their
        # tokens, head by head; the rest walk (2) the earlier-block selections of this (block, kv
        # head), all slots (the reverse index).
        r_first, r_end = tl.load(KT_FIRST + blk * kt_per_block + j), tl.load(BLK_END + blk)
        n_own = tl.cdiv(r_end - r_first, BLOCK_M)                                   # steps per query head
        p0, p1 = tl.load(GROUP_START + grp), tl.load(GROUP_START + grp + 1)
        for i in range(0, GROUP * n_own + tl.cdiv(p1 - p0, BLOCK_M)):
            own = i < GROUP * n_own
            per = tl.maximum(n_own, 1)
            orow = r_first + (i % per) * BLOCK_M + m
            olive = (orow < r_end) & own
            prow = p0 + (i - GROUP * n_own) * BLOCK_M + m
            plive = (prow < p1) & (i >= GROUP * n_own)
            pflat = tl.load(ROWS + prow, mask=plive, other=0)
            tok = tl.load(QTOK + orow, mask=olive, other=0)
            rows = tl.where(olive, orow, pflat // HQ)
            heads = tl.where(olive, g * GROUP + i // per, pflat % HQ)
            live = olive | plive
            q, do, lse2, delta = _load_queries(Q, DO, LSE, DELTA, rows, heads, live, sq_t, sq_h, sdo_t, sdo_h, HQ, D)
            visible = live[:, None] & kin[None, :] & ((kcol[None, :] <= tok[:, None]) | (i >= GROUP * n_own))
            dk, dv = _dkdv_from_queries(q, do, lse2, delta, k, v, dk, dv, visible, qk_scale, DQ, rows * HQ + heads,
                                        live, scale, D, ATOMIC_DQ, IEEE)
        tl.store(DK + kcol[:, None] * sdk_t + g * sdk_h + d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=kin[:, None])
        tl.store(DV + kcol[:, None] * sdv_t + g * sdv_h + d[None, :], dv.to(DV.dtype.element_ty),
                 mask=kin[:, None])


@triton.jit
def _dq_over_keys(q, do, lse2, delta, dq, K, V, k_lo, k_hi, rows, g, sk_t, sk_h, sv_t, sv_h, qk_scale,
                  CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    d = tl.arange(0, D)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        inside = cols < k_hi
        k = tl.load(K + cols[:, None] * sk_t + g * sk_h + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * sv_t + g * sv_h + d[None, :], mask=inside[:, None], other=0.0)
        visible = inside[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq = _dot_acc(ds.to(k.dtype), k, dq, IEEE)
    return dq


@tune(key=("D", "BLOCK_M", "GROUP", "IEEE"), kind="dq")
@triton.jit
def _own_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, T_ROW, T_TOK, T_LEN, T_BSTART,
                   sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, qk_scale, scale, HQ,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                   IEEE: tl.constexpr):
    tile, h = tl.program_id(0), tl.program_id(1)
    row0, tok0 = tl.load(T_ROW + tile), tl.load(T_TOK + tile)
    n, bstart = tl.load(T_LEN + tile), tl.load(T_BSTART + tile)
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    rows = (row0 + m).to(tl.int64)                                                 # query rows; tokens tok0 + m
    live = m < n
    q, do, lse2, delta = _load_queries(Q, DO, LSE, DELTA, rows, tl.zeros([BLOCK_M], tl.int32) + h, live,
                                       sq_t, sq_h, sdo_t, sdo_h, HQ, D)
    flat = rows * HQ + h
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dq = _dq_over_keys(q, do, lse2, delta, dq, K, V, bstart, tok0 + n, tok0 + m, h // GROUP,
                       sk_t, sk_h, sv_t, sv_h, qk_scale, True, BLOCK_N, D, IEEE)
    tl.store(DQ + flat[:, None] * D + d[None, :], dq * scale, mask=live[:, None])


@tune(key=("D", "CHUNK", "BLOCK_M", "IEEE"), restore=("DQ",), kind="dq")
@triton.jit
def _past_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, ROWS, TILE_PAIR, TILE_LEN, TILE_GROUP, BLOCK_START,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, qk_scale, scale, HQ, HKV, SLOT_RANGE, slot,
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
    flat = tl.load(ROWS + first + m, mask=live, other=0).to(tl.int64)
    q, do, lse2, delta = _load_queries(Q, DO, LSE, DELTA, flat // HQ, flat % HQ, live, sq_t, sq_h, sdo_t, sdo_h,
                                       HQ, D)
    kstart = tl.load(BLOCK_START + blk)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dq = _dq_over_keys(q, do, lse2, delta, dq, K, V, kstart, kstart + CHUNK, m, g,
                       sk_t, sk_h, sv_t, sv_h, qk_scale, False, BLOCK_N, D, IEEE)
    ptr = DQ + flat[:, None] * D + d[None, :]
    tl.store(ptr, tl.load(ptr, mask=live[:, None], other=0.0) + dq * scale, mask=live[:, None])


def moba_bwd_triton(dout, q, k, v, out, lse, layout, tiles, past, softmax_scale: float, cfg, q_tok,
                    dq_mode: str = "separate"):
    """Gradients: dq [Tq, Hq, D], dk, dv [T, Hkv, D] in the input dtypes (q_tok: int64 [Tq])."""
    from .tiles import block_rows
    atomic = dq_mode == "atomic"
    total, hq, dim = q.shape
    hkv = k.shape[1]
    ieee = q.dtype == torch.float32
    qk_scale = softmax_scale * LOG2E
    delta = (dout.float() * out.float()).sum(-1).reshape(-1)                        # [T*Hq]
    lse = lse.reshape(-1).contiguous()
    dq = (buffers.zeros if atomic else buffers.empty)(total * hq, dim, dtype=torch.float32, device=q.device)
    dk, dv = buffers.empty_like(k), buffers.empty_like(v)
    qkv = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
           dout.stride(0), dout.stride(1))
    block_start = layout.block_start.to(torch.int32)
    if layout.num_blocks:
        kt_first, blk_end = block_rows(layout, q_tok, cfg.dkdv_n)
        _dkdv_kernel[(layout.num_blocks * hkv, kt_first.shape[1])](
            q, k, v, dout, lse, delta, dk, dv, dq, past.rows, past.group_start, block_start,
            layout.block_len.to(torch.int32), q_tok.to(torch.int32), kt_first, blk_end, kt_first.shape[1], *qkv,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            qk_scale, softmax_scale, hq, hkv, GROUP=hq // hkv, BLOCK_M=cfg.dkdv_m, D=dim, ATOMIC_DQ=atomic,
            IEEE=ieee, **launch_kwargs(cfg, block_n=False, dkdv=True))
    if atomic:
        return dq.view(total, hq, dim).to(q.dtype), dk, dv
    if tiles.count:
        _own_dq_kernel[(tiles.count, hq)](
            q, k, v, dout, lse, delta, dq, tiles.row, tiles.token, tiles.length, tiles.block_start, *qkv,
            qk_scale, softmax_scale, hq, GROUP=hq // hkv, BLOCK_M=cfg.block_m, D=dim, IEEE=ieee,
            **launch_kwargs(cfg, dq=True))
    for slot in range(past.slots):
        _past_dq_kernel[(past.grid,)](
            q, k, v, dout, lse, delta, dq, past.rows, past.tile_pair, past.tile_len, past.tile_group,
            block_start, *qkv, qk_scale, softmax_scale, hq, hkv, past.slot_range, slot, CHUNK=layout.chunk_size,
            BLOCK_M=cfg.pair_m, D=dim, IEEE=ieee, **launch_kwargs(cfg, dq=True))
    return dq.view(total, hq, dim).to(q.dtype), dk, dv
