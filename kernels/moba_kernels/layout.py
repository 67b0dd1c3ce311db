"""Where the MoBA key blocks of a packed (varlen) batch lie.

Blocks are cut per sequence from its first token: block ``i`` of a sequence of
length ``L`` covers local positions ``[i*chunk, min((i+1)*chunk, L))``, so the
last block may be shorter.  Blocks of all sequences are numbered globally in
order (``global = seq_first_block[seq] + local``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from ._checks import cu_seqlens_values
from .cache import TensorKeyedCache


@dataclass
class BlockLayout:
    seqlens: List[int]            # host lengths, one per sequence
    chunk_size: int
    num_blocks: int               # NB, summed over sequences
    seq_start: torch.Tensor       # [num_seqs] int64, first token of each sequence
    seq_first_block: torch.Tensor  # [num_seqs] int64, global id of each sequence's block 0
    block_start: torch.Tensor     # [NB] int64, first token (global) of each block
    block_len: torch.Tensor       # [NB] int64, tokens in each block (<= chunk_size)
    token_seq: torch.Tensor       # [T] int64, sequence of each token
    token_block: torch.Tensor     # [T] int64, global block of each token
    token_local_block: torch.Tensor  # [T] int64, block index of each token within its sequence

    @property
    def blocks_per_seq(self) -> List[int]:
        return [-(-n // self.chunk_size) for n in self.seqlens]


def block_layout(cu_seqlens: List[int], chunk_size: int, device: torch.device) -> BlockLayout:
    """Build the block table from host ``cu_seqlens`` (already validated)."""
    seqlens = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    total = cu_seqlens[-1]
    nbs = [-(-n // chunk_size) for n in seqlens]
    i64 = dict(dtype=torch.int64, device=device)
    seq_start = torch.tensor(cu_seqlens[:-1], **i64)
    lens = torch.tensor(seqlens, **i64)
    nb = torch.tensor(nbs, **i64)
    seq_first_block = torch.cumsum(nb, 0) - nb
    num_blocks = sum(nbs)

    block_seq = torch.repeat_interleave(torch.arange(len(seqlens), **i64), nb)            # [NB]
    block_local = torch.arange(num_blocks, **i64) - seq_first_block[block_seq]            # [NB]
    block_start = seq_start[block_seq] + block_local * chunk_size
    block_len = torch.clamp(lens[block_seq] - block_local * chunk_size, max=chunk_size)

    token_seq = torch.repeat_interleave(torch.arange(len(seqlens), **i64), lens)         # [T]
    token_local_block = (torch.arange(total, **i64) - seq_start[token_seq]) // chunk_size
    token_block = seq_first_block[token_seq] + token_local_block
    return BlockLayout(seqlens, chunk_size, num_blocks, seq_start, seq_first_block, block_start,
                       block_len, token_seq, token_block, token_local_block)


LAYOUTS = TensorKeyedCache(size=8)


def layout_of(cu_seqlens: torch.Tensor, total_tokens: int, chunk_size: int) -> BlockLayout:
    """The block layout of a ``cu_seqlens`` tensor, its values checked; built once per tensor and
    chunk size while the tensor lives unmodified (every layer reuses it: see cache.py)."""
    return LAYOUTS.get_or_build((cu_seqlens,), (total_tokens, chunk_size), lambda: block_layout(
        cu_seqlens_values(cu_seqlens, total_tokens), chunk_size, cu_seqlens.device))
