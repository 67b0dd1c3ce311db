"""The `reference` backend and the gate against an independent token-by-token definition."""
import pytest
import torch
import torch.nn.functional as F

from helpers import brute_force_moba, cu_from_lens, max_err, rand_qkv
from moba_kernels import moba_attn, moba_attn_varlen, moba_select_blocks

CASES = [  # (lens, hq, hkv, dim, chunk, topk)
    ([37], 2, 2, 8, 8, 3),            # partial last block
    ([5, 0, 29, 16], 4, 2, 8, 8, 2),  # short, empty and exact-multiple sequences
    ([40], 8, 1, 4, 4, 3),            # MQA, many blocks
    ([33, 20], 4, 4, 8, 5, 1),        # topk = 1
    ([24], 2, 1, 8, 4, 10),           # topk >= blocks
    ([9, 12], 2, 2, 8, 16, 2),        # chunk >= seqlen
]


@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", CASES)
def test_reference_matches_brute_force(lens, hq, hkv, dim, chunk, topk):
    q, k, v = rand_qkv(sum(lens), hq, hkv, dim, torch.float64, seed=sum(lens) + topk)
    cu = cu_from_lens(lens)
    out = moba_attn_varlen(q, k, v, cu, max(lens), chunk, topk, backend="reference")
    expected, _ = brute_force_moba(q, k, v, lens, chunk, topk)
    assert max_err(out, expected) < 1e-12


@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", CASES)
def test_select_blocks_matches_brute_force(lens, hq, hkv, dim, chunk, topk):
    q, k, v = rand_qkv(sum(lens), hq, hkv, dim, torch.float32, seed=7)
    sel = moba_select_blocks(q, k, chunk, topk, cu_seqlens=cu_from_lens(lens), max_seqlen=max(lens))
    assert sel.dtype == torch.int32 and sel.shape == (sum(lens), hq, topk)
    _, chosen = brute_force_moba(q, k, v, lens, chunk, topk)
    for (t, h), blocks in chosen.items():
        assert sel[t, h].tolist() == blocks + [-1] * (topk - len(blocks)), (t, h)


def test_select_blocks_batched_layout():
    q, k, _ = rand_qkv(2 * 30, 4, 2, 8, seed=3)
    qb, kb = q.view(2, 30, 4, 8), k.view(2, 30, 2, 8)
    sel = moba_select_blocks(qb, kb, 6, 3)
    flat = moba_select_blocks(q, k, 6, 3, cu_seqlens=cu_from_lens([30, 30]), max_seqlen=30)
    assert sel.shape == (2, 30, 4, 3)
    assert torch.equal(sel.flatten(0, 1), flat)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
def test_topk_covering_all_blocks_is_dense_causal(backend, hq, hkv):
    b, s, d = 2, 45, 16
    q, k, v = (t.view(b, s, -1, d) for t in rand_qkv(b * s, hq, hkv, d, seed=11))
    out = moba_attn(q, k, v, chunk_size=8, topk=6, backend=backend)
    g = hq // hkv
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    assert max_err(out, dense) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_topk_one_is_block_local_causal(backend):
    s, h, d, chunk = 50, 2, 8, 8
    q, k, v = (t.view(1, s, h, d) for t in rand_qkv(s, h, h, d, seed=5))
    out = moba_attn(q, k, v, chunk_size=chunk, topk=1, backend=backend)
    pos = torch.arange(s)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] // chunk == pos[:, None] // chunk)
    local = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask).transpose(1, 2)
    assert max_err(out, local) < 1e-5
    full = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)
    assert max_err(out, full) > 1e-2   # no fallback to full attention for topk = 1


def test_sparse_selection_differs_from_dense():
    q, k, v = rand_qkv(64, 2, 2, 8, seed=2)
    cu = cu_from_lens([64])
    sparse = moba_attn_varlen(q, k, v, cu, 64, 8, 2, backend="reference")
    dense = moba_attn_varlen(q, k, v, cu, 64, 8, 8, backend="reference")
    assert max_err(sparse[:8], dense[:8]) < 1e-6       # block 0 sees the same keys either way
    assert max_err(sparse[16:], dense[16:]) > 1e-2     # later blocks drop some keys
