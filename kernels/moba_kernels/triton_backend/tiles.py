"""Work lists for the Triton kernels, built with torch ops on the device.

Query tiles (``query_tiles``)
    Runs of at most ``block_m`` query rows whose tokens are consecutive and lie in one key block:
    every row of a tile has the same own block, attends it causally and chooses among the same
    earlier blocks.  Without ``q_positions`` rows are tokens and ``block_m`` divides the chunk
    size, so tiles are full except at block and sequence ends.

Selection pairs (``PastIndex``)
    Every (query row, query head, slot) whose selected block is an *earlier* block (not the
    query's own).  Pairs are sorted by (global key block, kv head, slot), which gives
    * per (key block, kv head): one contiguous run over all slots -- the reverse index the
      dK/dV kernel walks, so each key tile's gradient has exactly one writer (no atomics);
    * per (key block, kv head, slot): contiguous sub-runs, cut into tiles of ``block_m`` pairs.
      Within one slot a query row appears at most once, so the forward and dQ kernels launched
      slot by slot can read-modify-write a row's accumulator without races.
Memory: O(tokens x heads x topk) integers, never O(tokens x blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import BlockLayout


@dataclass
class QueryTiles:
    row: torch.Tensor           # [n] int32 first query row of the tile
    token: torch.Tensor         # [n] int32 its token (== row unless q_positions are given)
    length: torch.Tensor        # [n] int32 rows in the tile (<= block_m); their tokens are consecutive
    block_start: torch.Tensor   # [n] int32 first token of the tile's own key block
    own: torch.Tensor           # [n] int32 the own block's index within its sequence
    first_block: torch.Tensor   # [n] int32 global id of the sequence's block 0
    count: int


def query_tiles(layout: BlockLayout, block_m: int, q_tok: torch.Tensor) -> QueryTiles:
    """Tiles of at most ``block_m`` query rows with consecutive tokens inside one key block.
    q_tok: int64 [Tq] ascending tokens of the query rows (arange(T) when q covers every token)."""
    rows = q_tok.shape[0]
    device = q_tok.device
    i = torch.arange(rows, device=device)
    gblock = layout.token_block[q_tok]                                                # [Tq]
    new_run = torch.ones(rows, dtype=torch.bool, device=device)
    new_run[1:] = (q_tok[1:] != q_tok[:-1] + 1) | (gblock[1:] != gblock[:-1])
    run_start = torch.cummax(torch.where(new_run, i, 0), 0).values                   # first row of each run
    starts = torch.nonzero(((i - run_start) % block_m) == 0).squeeze(1)               # [n] first row of each tile
    ends = torch.cat([starts[1:], starts.new_tensor([rows])])
    run_end = torch.searchsorted(run_start, run_start[starts], right=True)            # end of each tile's run
    length = torch.minimum(ends, run_end) - starts
    tok = q_tok[starts]
    seq = layout.token_seq[tok]
    own = layout.token_local_block[tok]
    i32 = lambda x: x.to(torch.int32).contiguous()
    return QueryTiles(i32(starts), i32(tok), i32(length), i32(layout.block_start[gblock[starts]]), i32(own),
                      i32(layout.seq_first_block[seq]), int(starts.numel()))


def block_rows(layout: BlockLayout, q_tok: torch.Tensor, block_n: int):
    """For the dK/dV kernel: the first query row at or after each key tile ([NB, tiles per block]
    int32) and the end of each block's query rows ([NB] int32)."""
    offs = torch.arange(0, layout.chunk_size, block_n, device=q_tok.device)
    tile_tok = layout.block_start[:, None] + offs[None, :]                             # [NB, tiles]
    first = torch.searchsorted(q_tok, tile_tok.reshape(-1)).view(tile_tok.shape)
    end = torch.searchsorted(q_tok, layout.block_start + layout.block_len)
    return first.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


@dataclass
class PastIndex:
    rows: torch.Tensor          # [>= P] int32 flat query row (token * Hq + head) of each sorted pair
    group_start: torch.Tensor   # [NB * Hkv + 1] int32 run of pairs per (key block, kv head)
    tile_pair: torch.Tensor     # [capacity] int32 first pair of each tile (tiles ordered by slot)
    tile_len: torch.Tensor      # [capacity] int32 pairs in the tile (<= block_m)
    tile_group: torch.Tensor    # [capacity] int32 (key block * Hkv + kv head) of the tile
    slot_range: torch.Tensor    # [slots, 2] int32 the tiles [start, end) of each slot
    slots: int                  # launches: one per slot, 0 when topk == 1
    grid: int                   # programs per launch: a bound on any slot's tiles (the rest exit)


def past_index(sel: torch.Tensor, layout: BlockLayout, q_tok: torch.Tensor, hkv: int, block_m: int) -> PastIndex:
    """sel: [Tq, Hq, topk] from the gate (local block ids, own block included, -1 padding).
    Built without reading anything back to the host: the tile counts stay on the device, and
    each slot's launch covers ``grid`` programs, those past the slot's last tile exiting at once."""
    rows_n, hq, topk = sel.shape
    device = sel.device
    slots = max(topk - 1, 1)
    ngroups = layout.num_blocks * hkv
    nsub = ngroups * slots
    if nsub == 0:                                    # no key blocks (no tokens): nothing to launch
        none = torch.zeros(0, dtype=torch.int32, device=device)
        return PastIndex(none, torch.zeros(1, dtype=torch.int32, device=device), none, none, none,
                         torch.zeros(slots, 2, dtype=torch.int32, device=device), 0, 0)
    s64 = sel.long()
    own = layout.token_local_block[q_tok][:, None, None]
    past = (s64 >= 0) & (s64 != own)                                                  # [Tq, Hq, topk]
    # past entries sit at slots 0..topk-2 (the own block is the last valid entry)
    gblock = s64 + layout.seq_first_block[layout.token_seq[q_tok]][:, None, None]
    kvh = (torch.arange(hq, device=device) // (hq // hkv))[None, :, None]
    slot = torch.arange(topk, device=device)[None, None, :]
    key = torch.where(past, (gblock * hkv + kvh) * slots + slot, nsub).reshape(-1)    # others sort last
    key, order = torch.sort(key, stable=True)
    rows = (order // topk).to(torch.int32)                                            # row * Hq + head

    sub_counts = torch.bincount(key, minlength=nsub + 1)[:nsub]                       # per (group, slot)
    group_start = torch.zeros(ngroups + 1, dtype=torch.int64, device=device)
    group_start[1:] = torch.cumsum(sub_counts.view(ngroups, slots).sum(1), 0)
    sub_start = torch.cumsum(sub_counts, 0) - sub_counts
    ntiles = (sub_counts + block_m - 1) // block_m
    # tiles ordered by slot, then by group: slot-major view of the (group, slot) grid
    ntiles_sm = ntiles.view(ngroups, slots).t().reshape(-1)
    sub_start_sm = sub_start.view(ngroups, slots).t().reshape(-1)
    sub_counts_sm = sub_counts.view(ngroups, slots).t().reshape(-1)
    ends = torch.cumsum(ntiles_sm, 0)                                                 # inclusive
    slot_end = ends.view(slots, ngroups)[:, -1]
    slot_range = torch.stack([slot_end - ntiles_sm.view(slots, ngroups).sum(1), slot_end], 1)
    grid = -(-rows_n * hq // block_m) + ngroups          # a slot has <= Tq*Hq pairs, one partial tile per group
    t = torch.arange(slots * grid, device=device)
    sub = torch.searchsorted(ends, t, right=True).clamp(max=nsub - 1)                # tiles past the end: unused
    local = t - (ends - ntiles_sm)[sub]
    first = sub_start_sm[sub] + local * block_m
    length = torch.clamp(sub_counts_sm[sub] - local * block_m, max=block_m)
    i32 = lambda x: x.to(torch.int32).contiguous()
    return PastIndex(rows, i32(group_start), i32(first), i32(length), i32(sub % ngroups),
                     i32(slot_range), slots if topk > 1 else 0, grid)
