"""Work lists for the Triton kernels, built with torch ops on the device.

Query tiles (``query_tiles``)
    Runs of ``block_m`` consecutive tokens of one sequence.  ``block_m`` divides the chunk size,
    so a tile never straddles a key block: every row of a tile has the same own block, and the
    tile attends its own block causally and chooses among the same earlier blocks.

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
from typing import List

import torch

from ..layout import BlockLayout


@dataclass
class QueryTiles:
    start: torch.Tensor         # [n] int32 first token of the tile
    length: torch.Tensor        # [n] int32 rows in the tile (<= block_m)
    block_start: torch.Tensor   # [n] int32 first token of the tile's own key block
    own: torch.Tensor           # [n] int32 the own block's index within its sequence
    first_block: torch.Tensor   # [n] int32 global id of the sequence's block 0
    count: int


def query_tiles(layout: BlockLayout, block_m: int) -> QueryTiles:
    device = layout.seq_start.device
    i64 = dict(dtype=torch.int64, device=device)
    lens = torch.tensor(layout.seqlens, **i64)
    per_seq = (lens + block_m - 1) // block_m                                        # [S]
    count = int(sum(-(-n // block_m) for n in layout.seqlens))
    seq = torch.repeat_interleave(torch.arange(len(layout.seqlens), **i64), per_seq, output_size=count)
    local = torch.arange(count, **i64) - (torch.cumsum(per_seq, 0) - per_seq)[seq]   # tile index in its sequence
    offset = local * block_m                                                         # first row, local position
    own = offset // layout.chunk_size
    start = layout.seq_start[seq] + offset
    i32 = lambda x: x.to(torch.int32).contiguous()                                   # noqa: E731
    return QueryTiles(i32(start), i32(torch.clamp(lens[seq] - offset, max=block_m)),
                      i32(layout.seq_start[seq] + own * layout.chunk_size), i32(own),
                      i32(layout.seq_first_block[seq]), count)


@dataclass
class PastIndex:
    rows: torch.Tensor          # [P] int32 flat query row (token * Hq + head) of each sorted pair
    group_start: torch.Tensor   # [NB * Hkv + 1] int32 run of pairs per (key block, kv head)
    tile_pair: torch.Tensor     # [n] int32 first pair of each tile (tiles ordered by slot)
    tile_len: torch.Tensor      # [n] int32 pairs in the tile (<= block_m)
    tile_group: torch.Tensor    # [n] int32 (key block * Hkv + kv head) of the tile
    slot_tiles: List[int]       # tiles of each slot (host): slot r owns a contiguous range


def past_index(sel: torch.Tensor, layout: BlockLayout, q_tok: torch.Tensor, hkv: int, block_m: int) -> PastIndex:
    """sel: [Tq, Hq, topk] from the gate (local block ids, own block included, -1 padding)."""
    rows_n, hq, topk = sel.shape
    device = sel.device
    slots = max(topk - 1, 1)
    ngroups = layout.num_blocks * hkv
    s64 = sel.long()
    own = layout.token_local_block[q_tok][:, None, None]
    past = (s64 >= 0) & (s64 != own)                                                  # [Tq, Hq, topk]
    # past entries sit at slots 0..topk-2 (the own block is the last valid entry)
    gblock = s64 + layout.seq_first_block[layout.token_seq[q_tok]][:, None, None]
    kvh = (torch.arange(hq, device=device) // (hq // hkv))[None, :, None]
    slot = torch.arange(topk, device=device)[None, None, :]
    key = ((gblock * hkv + kvh) * slots + slot)[past]                                 # [P]
    flat_row = (torch.arange(rows_n, device=device)[:, None, None] * hq
                + torch.arange(hq, device=device)[None, :, None]).expand(-1, -1, topk)[past]
    key, order = torch.sort(key, stable=True)
    rows = flat_row[order].to(torch.int32)

    group = key // slots
    counts = torch.bincount(group, minlength=ngroups)
    group_start = torch.zeros(ngroups + 1, dtype=torch.int64, device=device)
    group_start[1:] = torch.cumsum(counts, 0)

    sub_counts = torch.bincount(key, minlength=ngroups * slots)                      # per (group, slot)
    sub_start = torch.cumsum(sub_counts, 0) - sub_counts
    ntiles = (sub_counts + block_m - 1) // block_m
    # tiles ordered by slot, then by group: slot-major view of the (group, slot) grid
    ntiles_sm = ntiles.view(ngroups, slots).t().reshape(-1)
    sub_start_sm = sub_start.view(ngroups, slots).t().reshape(-1)
    sub_counts_sm = sub_counts.view(ngroups, slots).t().reshape(-1)
    per_slot = ntiles_sm.view(slots, ngroups).sum(1).tolist()
    total = int(sum(per_slot))
    sub = torch.repeat_interleave(torch.arange(ngroups * slots, device=device), ntiles_sm, output_size=total)
    local = torch.arange(total, device=device) - (torch.cumsum(ntiles_sm, 0) - ntiles_sm)[sub]
    first = sub_start_sm[sub] + local * block_m
    i32 = lambda x: x.to(torch.int32).contiguous()                                   # noqa: E731
    return PastIndex(rows, i32(group_start), i32(first),
                     i32(torch.clamp(sub_counts_sm[sub] - local * block_m, max=block_m)),
                     i32(sub % ngroups), per_slot)
