"""The ``torch`` backend: memory-efficient MoBA in pure PyTorch (CPU and GPU).

Work is organised by key block, like a flash-attention kernel over a sparse
block list:

1. every (token, query head, slot) selection is a *pair*; pairs are grouped by
   (kv head, key block) and each group is padded to tiles of ``TILE_M`` pairs;
2. a tile is one dense problem: ``TILE_M`` query rows against one key block of
   ``chunk_size`` keys (causal mask for the query's own block), giving a partial
   output and log-sum-exp per pair;
3. the partials of each (token, head) -- its own block and the ``topk - 1``
   chosen ones -- are merged by their log-sum-exp into one softmax.

Memory is O(tokens * heads * topk * (head_dim + 1)) for the partials plus a
bounded batch of tiles, never O(S^2).  The backward recomputes scores per tile
from the saved LSE (flash-attention style) and accumulates dK/dV per key block.
Math runs in fp32 (fp64 for fp64 inputs); GQA reads K/V through the kv-head
index, never copies them per query head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import BlockLayout

TILE_M = 64                  # query rows per tile
_TILE_BUDGET = 1 << 22       # score elements per batch of tiles (16 MiB fp32)


@dataclass
class _Tiles:
    pair: torch.Tensor       # [n, M] pair id (row * topk + slot); dummy = rows * topk
    row: torch.Tensor        # [n, M] query row (token * Hq + head); dummy = rows
    qpos: torch.Tensor       # [n, M] query token, -1 for padding
    kv_row: torch.Tensor     # [n, C] row of k.view(T * Hkv, D) for each key of the tile's block
    key_pos: torch.Tensor    # [n, C] key token, -1 past the end of a short block


def _build_tiles(sel: torch.Tensor, layout: BlockLayout, hkv: int) -> _Tiles:
    total, hq, topk = sel.shape
    device = sel.device
    chunk, nb = layout.chunk_size, layout.num_blocks
    gblock = sel.long() + layout.seq_first_block[layout.token_seq][:, None, None]  # [T, Hq, topk]
    kvh = torch.arange(hq, device=device) // (hq // hkv)
    group = (kvh[None, :, None] * nb + gblock).flatten()                            # (kv head, block)
    pair = torch.nonzero(sel.flatten() >= 0).squeeze(1)
    group = group[pair]
    order = torch.argsort(group, stable=True)
    pair, group = pair[order], group[order]

    counts = torch.bincount(group, minlength=hkv * nb)
    tiles = (counts + TILE_M - 1) // TILE_M                                          # tiles per group
    first_tile = torch.cumsum(tiles, 0) - tiles
    first_pair = torch.cumsum(counts, 0) - counts
    slot = first_tile[group] * TILE_M + torch.arange(pair.numel(), device=device) - first_pair[group]
    n = int(tiles.sum())
    dummy_pair = total * hq * topk
    tile_pair = torch.full((n * TILE_M,), dummy_pair, dtype=torch.long, device=device)
    tile_pair[slot] = pair
    tile_pair = tile_pair.view(n, TILE_M)
    row = tile_pair // topk                                                          # dummy -> T * Hq
    qpos = torch.where(tile_pair == dummy_pair, -1, row // hq)

    tile_group = torch.repeat_interleave(torch.arange(hkv * nb, device=device), tiles)  # [n]
    tile_kvh, tile_block = tile_group // nb, tile_group % nb
    offs = torch.arange(chunk, device=device)
    key_pos = layout.block_start[tile_block][:, None] + offs[None, :]                 # [n, C]
    inside = offs[None, :] < layout.block_len[tile_block][:, None]
    key_pos = torch.where(inside, key_pos, -1)
    kv_row = key_pos.clamp(min=0) * hkv + tile_kvh[:, None]
    return _Tiles(tile_pair, row, qpos, kv_row, key_pos)


def _batches(tiles: _Tiles, chunk: int):
    step = max(1, _TILE_BUDGET // (TILE_M * chunk))
    for a in range(0, tiles.pair.shape[0], step):
        sl = slice(a, a + step)
        visible = (tiles.key_pos[sl, None, :] >= 0) & (tiles.key_pos[sl, None, :] <= tiles.qpos[sl, :, None])
        yield sl, visible                                                            # [b, M, C]


def _with_dummy_row(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, H, D] -> [T * H + 1, D] in ``dtype``; the extra zero row serves tile padding."""
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    return torch.cat([flat, flat.new_zeros(1, flat.shape[1])], dim=0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def moba_fwd(q, k, v, sel, layout: BlockLayout, softmax_scale: float):
    """q: [T, Hq, D], k/v: [T, Hkv, D], sel: [T, Hq, topk].

    Returns out [T, Hq, D] (dtype of q) and lse [T, Hq] (fp32, fp64 for fp64).
    """
    total, hq, dim = q.shape
    topk = sel.shape[2]
    ct = _compute_dtype(q)
    tiles = _build_tiles(sel, layout, k.shape[1])
    qf = _with_dummy_row(q, ct)                                      # [T*Hq + 1, D]
    kf = k.reshape(-1, dim).to(ct)                                   # [T*Hkv, D]
    vf = v.reshape(-1, dim).to(ct)
    part_out = torch.zeros(total * hq * topk + 1, dim, dtype=ct, device=q.device)
    part_lse = torch.full((total * hq * topk + 1,), float("-inf"), dtype=ct, device=q.device)
    for sl, visible in _batches(tiles, layout.chunk_size):
        qt, kt, vt = qf[tiles.row[sl]], kf[tiles.kv_row[sl]], vf[tiles.kv_row[sl]]  # [b,M,D], [b,C,D]
        scores = torch.bmm(qt, kt.transpose(1, 2)).mul_(softmax_scale)
        scores.masked_fill_(~visible, float("-inf"))                                # [b, M, C]
        m = scores.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp_(scores.sub_(m))
        denom = p.sum(dim=-1, keepdim=True)                                          # [b, M, 1]
        o = torch.bmm(p, vt).div_(denom.clamp(min=torch.finfo(ct).tiny))
        part_out[tiles.pair[sl]] = o
        part_lse[tiles.pair[sl]] = (m + torch.log(denom)).squeeze(-1)
    part_lse = part_lse[:-1].view(total * hq, topk)
    lse = torch.logsumexp(part_lse, dim=-1)                                          # [T*Hq]
    weight = torch.exp(part_lse - lse[:, None])                                      # [T*Hq, topk]
    out = torch.einsum("rs,rsd->rd", weight, part_out[:-1].view(total * hq, topk, dim))
    return out.view(total, hq, dim).to(q.dtype), lse.view(total, hq)


def moba_bwd(dout, q, k, v, out, lse, sel, layout: BlockLayout, softmax_scale: float):
    """Gradients of ``moba_fwd``: returns dq, dk, dv in the input dtype."""
    total, hq, dim = q.shape
    hkv = k.shape[1]
    ct = _compute_dtype(q)
    tiles = _build_tiles(sel, layout, hkv)
    qf, dof = _with_dummy_row(q, ct), _with_dummy_row(dout, ct)
    kf = k.reshape(-1, dim).to(ct)
    vf = v.reshape(-1, dim).to(ct)
    delta = (dout.to(ct) * out.to(ct)).sum(-1).flatten()                             # [T*Hq]
    delta = torch.cat([delta, delta.new_zeros(1)])
    lse_r = torch.cat([lse.flatten().to(ct), lse.new_zeros(1, dtype=ct)])
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for sl, visible in _batches(tiles, layout.chunk_size):
        row, kv_row = tiles.row[sl], tiles.kv_row[sl]
        qt, kt, vt, dot = qf[row], kf[kv_row], vf[kv_row], dof[row]
        scores = torch.bmm(qt, kt.transpose(1, 2)).mul_(softmax_scale)
        p = torch.exp(torch.where(visible, scores - lse_r[row][:, :, None], float("-inf")))  # [b, M, C]
        dv.index_add_(0, kv_row.flatten(), torch.bmm(p.transpose(1, 2), dot).flatten(0, 1))
        dp = torch.bmm(dot, vt.transpose(1, 2))
        ds = p.mul_(dp.sub_(delta[row][:, :, None])).mul_(softmax_scale)
        dq.index_add_(0, row.flatten(), torch.bmm(ds, kt).flatten(0, 1))
        dk.index_add_(0, kv_row.flatten(), torch.bmm(ds.transpose(1, 2), qt).flatten(0, 1))
    return (dq[:-1].view(total, hq, dim).to(q.dtype),
            dk.view(total, hkv, dim).to(k.dtype),
            dv.view(total, hkv, dim).to(v.dtype))
