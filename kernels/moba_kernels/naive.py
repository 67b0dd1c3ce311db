"""The ``reference`` backend: MoBA as a dense attention mask.

Readable, O(S^2) memory per sequence, math in fp32 (fp64 for fp64 inputs),
gradients by autograd.  This is the specification the fast backends are
tested against.
"""
from __future__ import annotations

import torch

from .layout import BlockLayout


def selection_mask(sel: torch.Tensor, token_block: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Dense MoBA mask of one sequence.

    sel: [L, Hq, topk] local selected blocks (-1 = none), token_block: [L]
    local block of each position.  Returns bool [Hq, L(query), L(key)]:
    key s is visible to query t in head h iff block(s) is selected by (t, h)
    and s <= t.
    """
    length, hq, _ = sel.shape
    chosen = torch.zeros(length, hq, num_blocks + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(2, torch.where(sel < 0, num_blocks, sel).long(), True)      # slot NB soaks up -1
    visible = chosen[:, :, token_block]                                          # [L, Hq, L]
    pos = torch.arange(length, device=sel.device)
    causal = pos[None, :] <= pos[:, None]                                        # [L, L]
    return (visible & causal[:, None, :]).permute(1, 0, 2)


def naive_moba_attn(q, k, v, sel, layout: BlockLayout, softmax_scale: float) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hkv, D], sel: [T, Hq, topk] -> out [T, Hq, D] (dtype of q)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    outs = []
    for s, length in enumerate(layout.seqlens):
        if length == 0:
            continue
        a = int(layout.seq_start[s])
        qs = q[a:a + length].to(compute).transpose(0, 1)                                   # [Hq, L, D]
        ks = k[a:a + length].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        vs = v[a:a + length].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
        blocks = layout.token_local_block[a:a + length]
        mask = selection_mask(sel[a:a + length], blocks, int(blocks[-1]) + 1)            # [Hq, L, L]
        scores = (qs @ ks.transpose(1, 2)) * softmax_scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append((probs @ vs).transpose(0, 1))                                        # [L, Hq, D]
    if not outs:
        return q * 0                                   # no tokens: keep the autograd graph
    return torch.cat(outs, dim=0).to(q.dtype)
