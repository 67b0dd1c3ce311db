"""The MoBA gate: block mean-pooling of keys and top-k block selection.

The gate is parameter-free and discrete (no gradient flows through it):

    score[t, h, j] = q[t, h] . mean(k[block j, kv_head(h)])      (fp32)

A query in block ``c`` keeps its own block plus the ``topk - 1`` best-scoring
blocks ``j < c`` of its own sequence (all of them when fewer exist).

Both the ``reference`` and the ``torch`` backends select with this one
function, so they differ only in how they attend.  It never holds the full
``[tokens, heads, blocks]`` score tensor: scores are made per sequence, in
token tiles of at most ``_SCORE_BUDGET`` elements.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import BlockLayout

_SCORE_BUDGET = 1 << 18   # fp32 elements of one score tile (1 MiB: the gate stays a small part of peak memory)


def block_mean_keys(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean of the keys of every block.  k: [T, Hkv, D] -> [NB, Hkv, D] float32."""
    total, hkv, dim = k.shape
    sums = torch.zeros(layout.num_blocks, hkv, dim, dtype=torch.float32, device=k.device)
    sums.index_add_(0, layout.token_block, k.float())
    return sums / layout.block_len.to(torch.float32)[:, None, None]


def select_blocks(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int,
                  q_tok: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selected blocks of every (query row, query head).

    q: [Tq, Hq, D], k: [T, Hkv, D].  ``q_tok`` (int64 [Tq], ascending) gives the token of k
    that each query row sits at; None means q covers every token (Tq == T).  Returns int32
    ``[Tq, Hq, topk]``: block indices local to each query's sequence, ascending, the
    query's own block always present (it is the largest), padded with -1 at the end when
    fewer than ``topk`` blocks exist up to the query.
    """
    rows, hq, dim = q.shape
    hkv = k.shape[1]
    device = q.device
    if q_tok is None:
        q_tok = torch.arange(rows, device=device)
    # Default for every query: all blocks 0..own (right when own block < topk).
    slots = torch.arange(topk, device=device)                                   # [topk]
    own = layout.token_local_block[q_tok][:, None]                              # [Tq, 1]
    if topk == 1:
        return own[:, None, :].expand(rows, hq, 1).to(torch.int32).contiguous()
    sel = torch.where(slots[None, :] <= own, slots[None, :], -1)                # [Tq, topk]
    sel = sel[:, None, :].expand(rows, hq, topk).to(torch.int32).contiguous()   # [Tq, Hq, topk]

    nbs = layout.blocks_per_seq
    if topk >= max(nbs, default=0):
        return sel                      # no sequence has more blocks than topk: nothing to choose
    kmean = block_mean_keys(k, layout)                                          # [NB, Hkv, D]
    group = hq // hkv
    for s, nb in enumerate(nbs):
        if nb <= topk:
            continue
        start = int(layout.seq_start[s])
        first = int(layout.seq_first_block[s])
        km = kmean[first:first + nb]                                            # [nb, Hkv, D]
        # Queries in the first `topk` blocks already have all their blocks selected.
        bounds = torch.tensor([start + topk * layout.chunk_size, start + layout.seqlens[s]], device=device)
        r0, r1 = torch.searchsorted(q_tok, bounds).tolist()
        tile = max(1, _SCORE_BUDGET // (hq * nb))
        for t0 in range(r0, r1, tile):
            t1 = min(r1, t0 + tile)
            qt = q[t0:t1].float().view(t1 - t0, hkv, group, dim)
            scores = torch.einsum("nhgd,bhd->nhgb", qt, km).reshape(t1 - t0, hq, nb)
            own_t = own[t0:t1, 0]                                               # [n]
            past = torch.arange(nb, device=device)[None, :] < own_t[:, None]    # [n, nb]
            scores = scores.masked_fill(~past[:, None, :], float("-inf"))
            best = torch.topk(scores, topk - 1, dim=-1).indices                 # [n, Hq, topk-1]
            chosen = torch.cat([best, own_t[:, None, None].expand(-1, hq, 1)], dim=-1)
            sel[t0:t1] = torch.sort(chosen, dim=-1).values.to(torch.int32)
    return sel
