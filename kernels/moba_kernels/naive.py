"""The ``reference`` backend: MoBA as a dense attention mask.

Readable, O(S^2) memory per sequence, math in fp32 (fp64 for fp64 inputs),
gradients by autograd.  This is the specification the fast backends are
tested against.
"""
from __future__ import annotations

import torch

from .layout import BlockLayout


def selection_mask(sel: torch.Tensor, q_pos: torch.Tensor, key_block: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Dense MoBA mask of one sequence.

    sel: [Lq, Hq, topk] local selected blocks (-1 = none) of queries at positions
    ``q_pos`` [Lq]; key_block: [L] block of each key position.  Returns bool
    [Hq, Lq, L]: key s is visible to query t in head h iff block(s) is selected
    by (t, h) and s <= pos(t).
    """
    lq, hq, _ = sel.shape
    chosen = torch.zeros(lq, hq, num_blocks + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(2, torch.where(sel < 0, num_blocks, sel).long(), True)      # slot NB soaks up -1
    visible = chosen[:, :, key_block]                                            # [Lq, Hq, L]
    key_pos = torch.arange(key_block.shape[0], device=sel.device)
    causal = key_pos[None, :] <= q_pos[:, None]                                  # [Lq, L]
    return (visible & causal[:, None, :]).permute(1, 0, 2)


def naive_moba_attn(q, k, v, sel, layout: BlockLayout, softmax_scale: float, q_tok=None) -> torch.Tensor:
    """q: [Tq, Hq, D] at tokens ``q_tok`` (ascending; None = every token), k/v: [T, Hkv, D],
    sel: [Tq, Hq, topk] -> out [Tq, Hq, D] (dtype of q)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    if q_tok is None:
        q_tok = torch.arange(q.shape[0], device=q.device)
    outs = []
    for s, length in enumerate(layout.seqlens):
        a = int(layout.seq_start[s])
        r0, r1 = torch.searchsorted(q_tok, torch.tensor([a, a + length], device=q.device)).tolist()
        if r1 == r0:
            continue
        qs = q[r0:r1].to(compute).transpose(0, 1)                                          # [Hq, Lq, D]
        ks = k[a:a + length].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        vs = v[a:a + length].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
        blocks = layout.token_local_block[a:a + length]
        mask = selection_mask(sel[r0:r1], q_tok[r0:r1] - a, blocks, int(blocks[-1]) + 1)  # [Hq, Lq, L]
        scores = (qs @ ks.transpose(1, 2)) * softmax_scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append((probs @ vs).transpose(0, 1))                                        # [Lq, Hq, D]
    if not outs:
        return q * 0                                   # no tokens: keep the autograd graph
    return torch.cat(outs, dim=0).to(q.dtype)
