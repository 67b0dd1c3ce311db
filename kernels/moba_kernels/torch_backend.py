"""The ``torch`` backend: memory-efficient MoBA in pure PyTorch (CPU and GPU).

Each query's softmax is split into parts merged by log-sum-exp, one part at a time into the
output itself (no per-part buffers):

* own block (``_own_*``): causal attention inside every key block.  Runs of full blocks are
  views of q/k/v (``[blocks, C, H, D]``, no copy); short blocks and query subsets (``q_tok``)
  are packed, a few blocks at a time;
* earlier blocks (``_past_*``): every (query row, head, slot) choice of an earlier block is a
  *pair*; pairs are grouped by (block, kv head) and each group is attention of its gathered
  queries against that block's ``C`` keys (a view of k/v), merged into the output rows.

Every step holds at most ``_TILE`` elements per gathered tensor, so the extra memory is a few
tiles plus the index of the pairs (12 bytes per pair), never a [tokens, topk, ...] buffer and
never O(S^2).  The backward recomputes each part from the saved output and LSE (flash-attention
style: ``P = exp(S - lse)``, ``dS = P * (dO V^T - rowsum(dO * O))``), adding dK/dV per block.

On CPU every part is PyTorch's fused flash-attention CPU kernel (it takes strided views, GQA and
fp64, and returns the LSE); elsewhere (and in tests, ``USE_CPU_FLASH = False``) a portable
matmul-softmax path in score tiles of ``_SCORE_BUDGET`` elements.  Math in fp32 (fp64 for fp64
inputs).
"""
from __future__ import annotations

import torch

from .layout import BlockLayout

_TILE = 1 << 16              # elements of one gathered [rows, D] tile (256 KiB fp32)
_SCORE_BUDGET = 1 << 21      # score elements per step of the portable path (8 MiB fp32)
USE_CPU_FLASH = True         # tests switch it off to exercise the portable path


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _flash_cpu(x: torch.Tensor) -> bool:
    return USE_CPU_FLASH and x.device.type == "cpu"


# ---------------------------------------------------------------- one attention part
def _attend_fwd(q, k, v, causal: bool, scale: float):
    """q [B, Hq, n, D], k/v [B, Hkv, m, D] (any strides; Hq a multiple of Hkv; causal: n == m,
    aligned at the first key) -> out [B, Hq, n, D], lse [B, Hq, n]."""
    if _flash_cpu(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    qg, kg, vg = q.unflatten(1, (hkv, hq // hkv)), k[:, :, None], v[:, :, None]     # [B, Hkv, g, ., D]
    out, lse = q.new_empty(b, hq, n, d), q.new_empty(b, hq, n)
    step = max(1, _SCORE_BUDGET // (b * hq * m))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        s = torch.matmul(qg[..., r0:r1, :], kg.transpose(-1, -2)).mul_(scale)        # [B, Hkv, g, r, m]
        if causal:
            s.masked_fill_(_above_diagonal(r0, r1, m, q.device), float("-inf"))
        rl = torch.logsumexp(s, dim=-1)                                              # [B, Hkv, g, r]
        out[:, :, r0:r1] = torch.matmul(torch.exp_(s.sub_(rl[..., None])), vg).flatten(1, 2)
        lse[:, :, r0:r1] = rl.flatten(1, 2)
    return out, lse


def _attend_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    """Gradients of one part given the *final* output/LSE of its rows (shapes of _attend_fwd)
    -> dq [B, Hq, n, D], dk/dv [B, Hkv, m, D]."""
    if _flash_cpu(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, scale=scale)
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    qg, dog = q.unflatten(1, (hkv, hq // hkv)), do.unflatten(1, (hkv, hq // hkv))    # [B, Hkv, g, n, D]
    kg, vg = k[:, :, None], v[:, :, None]
    lseg = lse.unflatten(1, (hkv, hq // hkv))
    delta = (dog * o.unflatten(1, (hkv, hq // hkv))).sum(-1)                         # [B, Hkv, g, n]
    dq = q.new_empty(b, hq, n, d)
    dk, dv = k.new_zeros(b, hkv, m, d), v.new_zeros(b, hkv, m, d)
    step = max(1, _SCORE_BUDGET // (b * hq * m))
    for r0 in range(0, n, step):
        r = slice(r0, min(n, r0 + step))
        s = torch.matmul(qg[..., r, :], kg.transpose(-1, -2)).mul_(scale).sub_(lseg[..., r, None])
        if causal:
            s.masked_fill_(_above_diagonal(r.start, r.stop, m, q.device), float("-inf"))
        p = torch.exp_(s)                                                            # [B, Hkv, g, r, m]
        dv += torch.matmul(p.transpose(-1, -2), dog[..., r, :]).sum(2)
        ds = p.mul_(torch.matmul(dog[..., r, :], vg.transpose(-1, -2)).sub_(delta[..., r, None])).mul_(scale)
        dq[:, :, r] = torch.matmul(ds, kg).flatten(1, 2)
        dk += torch.matmul(ds.transpose(-1, -2), qg[..., r, :]).sum(2)
    return dq, dk, dv


def _above_diagonal(r0: int, r1: int, m: int, device) -> torch.Tensor:
    """[r, m] True where key j comes after query row i (causal mask of rows r0..r1)."""
    return torch.arange(m, device=device)[None, :] > torch.arange(r0, r1, device=device)[:, None]


# ---------------------------------------------------------------- own block
def _own_runs(layout: BlockLayout, per: int):
    """Without q_tok: (first token, blocks, tokens per block) of runs of at most ``per``
    consecutive full blocks (their tokens are contiguous), and each short block alone."""
    c = layout.chunk_size
    lens, starts = layout.block_len.tolist(), layout.block_start.tolist()
    i = 0
    while i < len(lens):
        if lens[i] < c:
            yield starts[i], 1, lens[i]
            i += 1
            continue
        j = i
        while j < len(lens) and j - i < per and lens[j] == c:
            j += 1
        yield starts[i], j - i, c
        i = j


def _bhsd(x, blocks, n, ct):
    """Token rows [blocks * n, H, ...] -> [blocks, H, n, ...] (a view unless a dtype change)."""
    return x.to(ct).unflatten(0, (blocks, n)).transpose(1, 2)


class _QueryBlocks:
    """With q_tok: the blocks holding at least one query row, where each row sits among them,
    and batches of at most ``per`` of those blocks (each batch a contiguous range of rows)."""

    def __init__(self, layout: BlockLayout, q_tok: torch.Tensor, per: int):
        qblock = layout.token_block[q_tok]                                          # [Tq]
        self.touched = torch.unique(qblock)                                         # [nt] ascending
        self.tidx = torch.searchsorted(self.touched, qblock)                        # [Tq] -> 0..nt-1
        self.slot = q_tok - layout.block_start[qblock]                              # [Tq] position in block
        nt = self.touched.numel()
        bounds = torch.searchsorted(self.tidx, torch.arange(0, nt + per, per, device=q_tok.device))
        self.batches = [(a, min(nt, a + per), r0, r1)
                        for a, (r0, r1) in zip(range(0, nt, per), zip(bounds.tolist(), bounds[1:].tolist()))]
        offs = torch.arange(layout.chunk_size, device=q_tok.device)
        pos = layout.block_start[self.touched, None] + offs[None, :]                 # [nt, C]
        self.pos = torch.where(offs[None, :] < layout.block_len[self.touched, None], pos, -1)

    def keys(self, x, a, b, ct):
        """[T, Hkv, D] -> [b - a, Hkv, C, D] keys/values of touched blocks a..b, zero-padded."""
        pos = self.pos[a:b]
        packed = x[pos.clamp(min=0)].to(ct) * (pos >= 0)[..., None, None]
        return packed.transpose(1, 2)

    def rows(self, x, a, b, r0, r1, ct):
        """Query rows r0..r1 [r, H, ...] -> [b - a, H, C, ...], zeros where no query sits."""
        packed = torch.zeros(b - a, self.pos.shape[1], *x.shape[1:], dtype=ct, device=x.device)
        packed[self.tidx[r0:r1] - a, self.slot[r0:r1]] = x[r0:r1].to(ct)
        return packed.transpose(1, 2)

    def unpack(self, xb, a, r0, r1):
        """[b - a, H, C, ...] -> the rows r0..r1 [r, H, ...]."""
        return xb.transpose(1, 2)[self.tidx[r0:r1] - a, self.slot[r0:r1]]


def _blocks_per_step(layout: BlockLayout, hq: int, dim: int) -> int:
    return max(1, _TILE // (layout.chunk_size * hq * dim))


def _own_fwd(q, k, v, layout, scale, q_tok, out, lse):
    """Writes every row of out [Tq, Hq, D] and lse [Tq, Hq] (compute dtype) with its own block."""
    ct = out.dtype
    per = _blocks_per_step(layout, q.shape[1], q.shape[2])
    if q_tok is None:
        for t0, blocks, n in _own_runs(layout, per):
            sl = slice(t0, t0 + blocks * n)
            o, l_ = _attend_fwd(_bhsd(q[sl], blocks, n, ct), _bhsd(k[sl], blocks, n, ct),
                                _bhsd(v[sl], blocks, n, ct), True, scale)
            out[sl] = o.transpose(1, 2).flatten(0, 1)
            lse[sl] = l_.transpose(1, 2).flatten(0, 1)
        return
    qb = _QueryBlocks(layout, q_tok, per)
    for a, b, r0, r1 in qb.batches:
        o, l_ = _attend_fwd(qb.rows(q, a, b, r0, r1, ct), qb.keys(k, a, b, ct), qb.keys(v, a, b, ct), True, scale)
        out[r0:r1], lse[r0:r1] = qb.unpack(o, a, r0, r1), qb.unpack(l_, a, r0, r1)


def _own_bwd(dout, q, k, v, out, lse, layout, scale, q_tok, dq, dk, dv):
    """Own-block gradients: writes every row of dq, adds into dk/dv (all compute dtype)."""
    ct = dq.dtype
    per = _blocks_per_step(layout, q.shape[1], q.shape[2])
    if q_tok is None:
        for t0, blocks, n in _own_runs(layout, per):
            sl = slice(t0, t0 + blocks * n)
            rows = [_bhsd(x[sl], blocks, n, ct) for x in (dout, q, k, v, out)]
            l_ = lse[sl].unflatten(0, (blocks, n)).transpose(1, 2)
            g = _attend_bwd(*rows[:4], rows[4], l_, True, scale)
            dq[sl] = g[0].transpose(1, 2).flatten(0, 1)
            dk[sl] += g[1].transpose(1, 2).flatten(0, 1)
            dv[sl] += g[2].transpose(1, 2).flatten(0, 1)
        return
    qb = _QueryBlocks(layout, q_tok, per)
    for a, b, r0, r1 in qb.batches:
        dob, qq, ob = (qb.rows(x, a, b, r0, r1, ct) for x in (dout, q, out))
        lb = qb.rows(lse, a, b, r0, r1, ct)
        gq, gk, gv = _attend_bwd(dob, qq, qb.keys(k, a, b, ct), qb.keys(v, a, b, ct), ob, lb, True, scale)
        dq[r0:r1] = qb.unpack(gq, a, r0, r1)
        pos = qb.pos[a:b]
        real = pos >= 0
        dk.index_add_(0, pos[real], gk.transpose(1, 2)[real])
        dv.index_add_(0, pos[real], gv.transpose(1, 2)[real])


# ---------------------------------------------------------------- earlier blocks
def _past_groups(sel: torch.Tensor, layout: BlockLayout, hkv: int, q_tok, step: int):
    """Yield (block start token, kv head, rows) for every (global block, kv head) chosen as an
    earlier block; ``rows`` (int64, at most ``step``) index the flat query rows ``[Tq * Hq]``.
    Holds 12 bytes per (row, head, slot) pair: an int32 group key, then its int64 sort order."""
    rows, hq, topk = sel.shape
    device = sel.device
    q_tok = torch.arange(rows, device=device) if q_tok is None else q_tok
    none = layout.num_blocks * hkv                                                  # key of "no group"
    first = layout.seq_first_block[layout.token_seq[q_tok]].to(torch.int32)        # [Tq]
    own = layout.token_local_block[q_tok].to(torch.int32)                           # [Tq]
    kvh = (torch.arange(hq, device=device, dtype=torch.int32) // (hq // hkv))[None, :, None]
    key = (sel + first[:, None, None]) * hkv + kvh                                  # [Tq, Hq, topk] int32
    key.masked_fill_((sel < 0) | (sel == own[:, None, None]), none)
    key, order = torch.sort(key.flatten(), stable=True)
    counts = torch.bincount(key, minlength=none + 1)[:none].tolist()
    del key
    order = order.div_(topk, rounding_mode="floor")                                 # pair -> query row
    starts = layout.block_start.tolist()
    at = 0
    for gid, n in enumerate(counts):
        blk, h = divmod(gid, hkv)
        for a in range(at, at + n, step):
            yield starts[blk], h, order[a:min(at + n, a + step)]
        at += n


def _row_step(dim: int) -> int:
    return max(1, _TILE // dim)


def moba_fwd(q, k, v, sel, layout: BlockLayout, softmax_scale: float, q_tok=None):
    """q: [Tq, Hq, D] at tokens ``q_tok`` of k (ascending; None = every token),
    k/v: [T, Hkv, D], sel: [Tq, Hq, topk] (from gate.select_blocks).

    Returns out [Tq, Hq, D] (dtype of q) and lse [Tq, Hq] (fp32; fp64 for fp64 inputs).
    """
    rows, hq, dim = q.shape
    hkv, c = k.shape[1], layout.chunk_size
    ct = _compute_dtype(q)
    out = torch.empty(rows, hq, dim, dtype=ct, device=q.device)        # the running merge, normalised
    lse = torch.empty(rows, hq, dtype=ct, device=q.device)
    _own_fwd(q, k, v, layout, softmax_scale, q_tok, out, lse)
    qf, of, lf = q.view(-1, dim), out.view(-1, dim), lse.view(-1)       # [Tq * Hq, ...]
    for t0, h, r in _past_groups(sel, layout, hkv, q_tok, _row_step(dim)):
        kb, vb = (x[t0:t0 + c, h].to(ct)[None, None] for x in (k, v))   # [1, 1, C, D] views
        po, pl = _attend_fwd(qf.index_select(0, r).to(ct)[None, None], kb, vb, False, softmax_scale)
        po, pl = po[0, 0], pl[0, 0]                                      # [n, D], [n]
        lo = lf.index_select(0, r)
        new = torch.logaddexp(lo, pl)
        merged = of.index_select(0, r).mul_(torch.exp_(lo.sub_(new))[:, None])
        merged += po.mul_(torch.exp_(pl.sub_(new))[:, None])
        of.index_copy_(0, r, merged)
        lf.index_copy_(0, r, new)
    return out.to(q.dtype), lse


def moba_bwd(dout, q, k, v, out, lse, sel, layout: BlockLayout, softmax_scale: float, q_tok=None):
    """Gradients of ``moba_fwd``: returns dq [Tq, Hq, D], dk, dv [T, Hkv, D] in the input dtypes."""
    rows, hq, dim = q.shape
    hkv, c = k.shape[1], layout.chunk_size
    ct = _compute_dtype(q)
    dq = torch.empty(rows, hq, dim, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    lse = lse.to(ct)
    _own_bwd(dout, q, k, v, out, lse, layout, softmax_scale, q_tok, dq, dk, dv)
    qf, dof, of, lf, dqf = q.view(-1, dim), dout.view(-1, dim), out.view(-1, dim), lse.view(-1), dq.view(-1, dim)
    for t0, h, r in _past_groups(sel, layout, hkv, q_tok, _row_step(dim)):
        kb, vb = (x[t0:t0 + c, h].to(ct)[None, None] for x in (k, v))   # [1, 1, C, D]
        part = [x.index_select(0, r).to(ct)[None, None] for x in (dof, qf, of, lf)]   # [1, 1, n, (D)]
        gq, gk, gv = _attend_bwd(*part[:2], kb, vb, *part[2:], False, softmax_scale)
        dqf.index_add_(0, r, gq[0, 0])
        dk[t0:t0 + c, h] += gk[0, 0]
        dv[t0:t0 + c, h] += gv[0, 0]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
