"""The ``torch`` backend: memory-efficient MoBA in pure PyTorch (CPU and GPU).

Each query's softmax is split into two parts and merged by log-sum-exp:

* own block (``_diag_*``): causal attention inside every key block, done as a
  batch over zero-padded blocks ``[NB, C, H, D]`` (padding sits after the real
  keys, so the causal mask hides it);
* earlier blocks (``_past_*``): every (token, head, slot) choice of an earlier
  block is a *pair*; pairs are grouped by (block, kv head) and each group is one
  dense product of its queries against that block's ``C`` keys -- no mask
  (earlier blocks are always full), no copy of K/V.

The backward recomputes scores from the saved output and LSE (flash-attention
style): ``P = exp(S - lse)``, ``dS = P * (dO V^T - rowsum(dO * O))``, and adds
dK/dV per key block.  Memory is O(tokens * heads * topk * D) for the partials
plus O(budget) scores, never O(S^2).  Math in fp32 (fp64 for fp64 inputs);
GQA reads K/V through the kv-head index.  On CPU the own-block part uses
PyTorch's fused flash-attention CPU kernel, which also returns the LSE.
"""
from __future__ import annotations

import torch

from .layout import BlockLayout

_SCORE_BUDGET = 1 << 21      # score elements per step (8 MiB fp32)
USE_CPU_FLASH = True         # tests switch it off to exercise the portable own-block path


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _block_positions(layout: BlockLayout) -> torch.Tensor:
    """[NB, C] token index of each slot of each block, -1 past the end of a short block."""
    offs = torch.arange(layout.chunk_size, device=layout.block_start.device)
    pos = layout.block_start[:, None] + offs[None, :]
    return torch.where(offs[None, :] < layout.block_len[:, None], pos, -1)


def _pack(x: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, H, ...] -> [NB, C, H, ...], zero where ``pos`` (from _block_positions) is -1."""
    packed = x.to(dtype)[pos.clamp(min=0)]
    mask = (pos >= 0).view(*pos.shape, *([1] * (x.dim() - 1)))
    return packed * mask


def _flash_cpu(x: torch.Tensor) -> bool:
    return USE_CPU_FLASH and x.device.type == "cpu"


# ---------------------------------------------------------------- own block
def _diag_fwd(qb, kb, vb, scale):
    """Causal attention inside each block.  qb [NB, C, Hq, D], kb/vb [NB, C, Hkv, D]
    -> out [NB, C, Hq, D], lse [NB, C, Hq]."""
    nb, c, hq, d = qb.shape
    g = hq // kb.shape[2]
    q_, k_, v_ = (x.permute(0, 2, 1, 3) for x in (qb, kb, vb))                    # [NB, H, C, D]
    k_, v_ = (x.repeat_interleave(g, 1) if g > 1 else x for x in (k_, v_))
    if _flash_cpu(qb):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_, k_, v_, 0.0, True, scale=scale)
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)
    causal = torch.ones(c, c, dtype=torch.bool, device=qb.device).tril()
    outs, lses = [], []
    step = max(1, _SCORE_BUDGET // (hq * c * c))
    for a in range(0, nb, step):
        s = torch.matmul(q_[a:a + step], k_[a:a + step].transpose(-1, -2)).mul_(scale)
        s.masked_fill_(~causal, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                                            # [b, Hq, C]
        outs.append(torch.matmul(torch.exp_(s.sub_(lse[..., None])), v_[a:a + step]))
        lses.append(lse)
    return torch.cat(outs).permute(0, 2, 1, 3), torch.cat(lses).permute(0, 2, 1)


def _diag_bwd(dob, qb, kb, vb, ob, lseb, scale):
    """Gradients of the own-block part given the *final* out/LSE of each query."""
    nb, c, hq, d = qb.shape
    hkv = kb.shape[2]
    g = hq // hkv
    q_, k_, v_, do_, o_ = (x.permute(0, 2, 1, 3) for x in (qb, kb, vb, dob, ob))
    k_, v_ = (x.repeat_interleave(g, 1) if g > 1 else x for x in (k_, v_))
    lse_ = lseb.permute(0, 2, 1)                                                    # [NB, Hq, C]
    if _flash_cpu(qb):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do_, q_, k_, v_, o_, lse_, 0.0, True, scale=scale)
    else:
        causal = torch.ones(c, c, dtype=torch.bool, device=qb.device).tril()
        delta = (do_ * o_).sum(-1, keepdim=True)                                   # [NB, Hq, C, 1]
        dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
        step = max(1, _SCORE_BUDGET // (hq * c * c))
        for a in range(0, nb, step):
            sl = slice(a, a + step)
            s = torch.matmul(q_[sl], k_[sl].transpose(-1, -2)).mul_(scale).sub_(lse_[sl, ..., None])
            p = torch.exp_(s.masked_fill_(~causal, float("-inf")))
            dv[sl] = torch.matmul(p.transpose(-1, -2), do_[sl])
            ds = p.mul_(torch.matmul(do_[sl], v_[sl].transpose(-1, -2)).sub_(delta[sl])).mul_(scale)
            dq[sl] = torch.matmul(ds, k_[sl])
            dk[sl] = torch.matmul(ds.transpose(-1, -2), q_[sl])
    unexpand = lambda x: x.view(nb, hkv, g, c, d).sum(2) if g > 1 else x
    return dq.permute(0, 2, 1, 3), unexpand(dk).permute(0, 2, 1, 3), unexpand(dv).permute(0, 2, 1, 3)


# ---------------------------------------------------------------- earlier blocks
def _past_groups(sel: torch.Tensor, layout: BlockLayout, hkv: int, q_tok: torch.Tensor):
    """Yield (block, kv_head, pairs) for every (global block, kv head) chosen as an earlier
    block; ``pairs`` are flat indices into ``[Tq, Hq, topk]``, query row = pair // topk."""
    rows, hq, topk = sel.shape
    device = sel.device
    s64 = sel.long()
    earlier = (s64 >= 0) & (s64 != layout.token_local_block[q_tok][:, None, None])
    gblock = s64 + layout.seq_first_block[layout.token_seq[q_tok]][:, None, None]
    kvh = torch.arange(hq, device=device) // (hq // hkv)
    group = (gblock * hkv + kvh[None, :, None]).flatten()
    pairs = torch.nonzero(earlier.flatten()).squeeze(1)
    group = group[pairs]
    order = torch.argsort(group, stable=True)
    pairs, group = pairs[order], group[order]
    counts = torch.bincount(group, minlength=layout.num_blocks * hkv).tolist()
    for gid, chunk in enumerate(torch.split(pairs, counts)):
        if chunk.numel():
            blk, h = divmod(gid, hkv)
            step = max(1, _SCORE_BUDGET // layout.chunk_size)
            for a in range(0, chunk.numel(), step):
                yield blk, h, chunk[a:a + step]


class _Blocked:
    """K/V cut into zero-padded blocks, and where each query row sits among the blocks
    that hold at least one query (only those need the own-block pass)."""

    def __init__(self, k, v, layout: BlockLayout, q_tok: torch.Tensor):
        self.ct = _compute_dtype(k)
        pos = _block_positions(layout)
        self.kb, self.vb = _pack(k, pos, self.ct), _pack(v, pos, self.ct)         # [NB, C, Hkv, D]
        qblock = layout.token_block[q_tok]                                         # [Tq]
        self.touched = torch.unique(qblock)                                        # [nt] ascending
        self.tidx = torch.searchsorted(self.touched, qblock)                       # [Tq] -> 0..nt-1
        self.slot = q_tok - layout.block_start[qblock]                             # [Tq] position in block
        self.real = pos >= 0
        self.chunk = layout.chunk_size

    def pack_rows(self, x):
        """[Tq, H, ...] query-row tensor -> [nt, C, H, ...] (zeros where no query sits)."""
        out = x.new_zeros(self.touched.numel(), self.chunk, *x.shape[1:], dtype=self.ct)
        out[self.tidx, self.slot] = x.to(self.ct)
        return out

    def unpack_rows(self, xb):
        return xb[self.tidx, self.slot]


def _rows(q, q_tok):
    return torch.arange(q.shape[0], device=q.device) if q_tok is None else q_tok


def moba_fwd(q, k, v, sel, layout: BlockLayout, softmax_scale: float, q_tok=None):
    """q: [Tq, Hq, D] at tokens ``q_tok`` of k (ascending; None = every token),
    k/v: [T, Hkv, D], sel: [Tq, Hq, topk] (from gate.select_blocks).

    Returns out [Tq, Hq, D] (dtype of q) and lse [Tq, Hq] (fp32; fp64 for fp64 inputs).
    """
    rows, hq, dim = q.shape
    hkv, topk = k.shape[1], sel.shape[2]
    q_tok = _rows(q, q_tok)
    b = _Blocked(k, v, layout, q_tok)
    diag_out, diag_lse = _diag_fwd(b.pack_rows(q), b.kb[b.touched], b.vb[b.touched], softmax_scale)
    diag_out, diag_lse = b.unpack_rows(diag_out), b.unpack_rows(diag_lse)          # [Tq, Hq, D], [Tq, Hq]

    qs = q.reshape(-1, dim).to(b.ct) * softmax_scale                               # [Tq*Hq, D]
    part_out = torch.zeros(rows * hq * topk, dim, dtype=b.ct, device=q.device)
    part_lse = torch.full((rows * hq * topk,), float("-inf"), dtype=b.ct, device=q.device)
    for blk, h, pairs in _past_groups(sel, layout, hkv, q_tok):
        s = qs[pairs // topk] @ b.kb[blk, :, h].T                                    # [n, C]
        m = s.amax(dim=-1, keepdim=True)
        p = torch.exp_(s.sub_(m))
        denom = p.sum(dim=-1, keepdim=True)
        part_out[pairs] = (p @ b.vb[blk, :, h]).div_(denom)
        part_lse[pairs] = (m + torch.log(denom)).squeeze(-1)
    all_lse = torch.cat([part_lse.view(rows, hq, topk), diag_lse[..., None]], dim=-1)  # [Tq, Hq, topk+1]
    lse = torch.logsumexp(all_lse, dim=-1)                                          # [Tq, Hq]
    w = torch.exp(all_lse - lse[..., None])
    out = torch.einsum("ths,thsd->thd", w[..., :topk], part_out.view(rows, hq, topk, dim))
    out = out + w[..., topk:] * diag_out
    return out.to(q.dtype), lse


def moba_bwd(dout, q, k, v, out, lse, sel, layout: BlockLayout, softmax_scale: float, q_tok=None):
    """Gradients of ``moba_fwd``: returns dq [Tq, Hq, D], dk, dv [T, Hkv, D] in the input dtypes."""
    rows, hq, dim = q.shape
    hkv, topk = k.shape[1], sel.shape[2]
    q_tok = _rows(q, q_tok)
    b = _Blocked(k, v, layout, q_tok)
    dqb, dkt, dvt = _diag_bwd(b.pack_rows(dout), b.pack_rows(q), b.kb[b.touched], b.vb[b.touched],
                              b.pack_rows(out), b.pack_rows(lse), softmax_scale)
    dq = b.unpack_rows(dqb).reshape(-1, dim).clone()                               # [Tq*Hq, D]
    dkb, dvb = torch.zeros_like(b.kb), torch.zeros_like(b.vb)
    dkb[b.touched], dvb[b.touched] = dkt, dvt

    qs = q.reshape(-1, dim).to(b.ct) * softmax_scale
    do = dout.reshape(-1, dim).to(b.ct)
    lse_r = lse.reshape(-1).to(b.ct)
    delta = (do * out.reshape(-1, dim).to(b.ct)).sum(-1)                            # [Tq*Hq]
    for blk, h, pairs in _past_groups(sel, layout, hkv, q_tok):
        r = pairs // topk
        kt, vt, dot = b.kb[blk, :, h], b.vb[blk, :, h], do[r]
        p = torch.exp_((qs[r] @ kt.T).sub_(lse_r[r, None]))                          # [n, C]
        dvb[blk, :, h] += p.T @ dot
        ds = p.mul_((dot @ vt.T).sub_(delta[r, None]))                               # w.r.t. scaled scores
        dq.index_add_(0, r, (ds @ kt).mul_(softmax_scale))
        dkb[blk, :, h] += ds.T @ qs[r]
    return (dq.view(rows, hq, dim).to(q.dtype), dkb[b.real].to(k.dtype), dvb[b.real].to(v.dtype))
