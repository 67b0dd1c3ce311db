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
    unexpand = lambda x: x.view(nb, hkv, g, c, d).sum(2) if g > 1 else x          # noqa: E731
    return dq.permute(0, 2, 1, 3), unexpand(dk).permute(0, 2, 1, 3), unexpand(dv).permute(0, 2, 1, 3)


# ---------------------------------------------------------------- earlier blocks
def _past_groups(sel: torch.Tensor, layout: BlockLayout, hkv: int):
    """Yield (block, kv_head, pairs) for every (global block, kv head) chosen as an earlier
    block; ``pairs`` are flat indices into ``[T, Hq, topk]``, row = pair // topk."""
    total, hq, topk = sel.shape
    device = sel.device
    s64 = sel.long()
    earlier = (s64 >= 0) & (s64 != layout.token_local_block[:, None, None])
    gblock = s64 + layout.seq_first_block[layout.token_seq][:, None, None]
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


def _blocked_kv(k, v, layout: BlockLayout):
    """Compute dtype, block slot positions [NB, C], their validity, and K/V as [NB, C, Hkv, D]."""
    ct = _compute_dtype(k)
    pos = _block_positions(layout)
    return ct, pos, pos >= 0, _pack(k, pos, ct), _pack(v, pos, ct)


def moba_fwd(q, k, v, sel, layout: BlockLayout, softmax_scale: float):
    """q: [T, Hq, D], k/v: [T, Hkv, D], sel: [T, Hq, topk] (from gate.select_blocks).

    Returns out [T, Hq, D] (dtype of q) and lse [T, Hq] (fp32; fp64 for fp64 inputs).
    """
    total, hq, dim = q.shape
    hkv, topk = k.shape[1], sel.shape[2]
    ct, pos, real, kb, vb = _blocked_kv(k, v, layout)
    diag_out, diag_lse = _diag_fwd(_pack(q, pos, ct), kb, vb, softmax_scale)
    diag_out, diag_lse = diag_out[real], diag_lse[real]                            # [T, Hq, D], [T, Hq]

    qs = q.reshape(-1, dim).to(ct) * softmax_scale                                 # [T*Hq, D]
    part_out = torch.zeros(total * hq * topk, dim, dtype=ct, device=q.device)
    part_lse = torch.full((total * hq * topk,), float("-inf"), dtype=ct, device=q.device)
    for blk, h, pairs in _past_groups(sel, layout, hkv):
        s = qs[pairs // topk] @ kb[blk, :, h].T                                      # [n, C]
        m = s.amax(dim=-1, keepdim=True)
        p = torch.exp_(s.sub_(m))
        denom = p.sum(dim=-1, keepdim=True)
        part_out[pairs] = (p @ vb[blk, :, h]).div_(denom)
        part_lse[pairs] = (m + torch.log(denom)).squeeze(-1)
    all_lse = torch.cat([part_lse.view(total, hq, topk), diag_lse[..., None]], dim=-1)  # [T, Hq, topk+1]
    lse = torch.logsumexp(all_lse, dim=-1)                                          # [T, Hq]
    w = torch.exp(all_lse - lse[..., None])
    out = torch.einsum("ths,thsd->thd", w[..., :topk], part_out.view(total, hq, topk, dim))
    out = out + w[..., topk:] * diag_out
    return out.to(q.dtype), lse


def moba_bwd(dout, q, k, v, out, lse, sel, layout: BlockLayout, softmax_scale: float):
    """Gradients of ``moba_fwd``: returns dq, dk, dv in the input dtypes."""
    total, hq, dim = q.shape
    hkv, topk = k.shape[1], sel.shape[2]
    ct, pos, real, kb, vb = _blocked_kv(k, v, layout)
    dqb, dkb, dvb = _diag_bwd(_pack(dout, pos, ct), _pack(q, pos, ct), kb, vb, _pack(out, pos, ct),
                              _pack(lse, pos, ct), softmax_scale)
    dq = dqb[real].reshape(-1, dim).clone()                                       # [T*Hq, D]
    dkb, dvb = dkb.contiguous(), dvb.contiguous()

    qs = q.reshape(-1, dim).to(ct) * softmax_scale
    do = dout.reshape(-1, dim).to(ct)
    lse_r = lse.reshape(-1).to(ct)
    delta = (do * out.reshape(-1, dim).to(ct)).sum(-1)                              # [T*Hq]
    for blk, h, pairs in _past_groups(sel, layout, hkv):
        rows = pairs // topk
        kt, vt, dot = kb[blk, :, h], vb[blk, :, h], do[rows]
        p = torch.exp_((qs[rows] @ kt.T).sub_(lse_r[rows, None]))                    # [n, C]
        dvb[blk, :, h] += p.T @ dot
        ds = p.mul_((dot @ vt.T).sub_(delta[rows, None]))                            # w.r.t. scaled scores
        dq.index_add_(0, rows, (ds @ kt).mul_(softmax_scale))
        dkb[blk, :, h] += ds.T @ qs[rows]
    return (dq.view(total, hq, dim).to(q.dtype), dkb[real].to(k.dtype), dvb[real].to(v.dtype))
