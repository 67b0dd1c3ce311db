"""Every documented bad input raises a clear error that names the argument."""
import pytest
import torch

from helpers import cu_from_lens, rand_qkv
from moba_kernels import moba_attn, moba_attn_varlen, moba_select_blocks


def _call(q=None, k=None, v=None, cu=None, max_seqlen=20, chunk_size=4, topk=2, **kw):
    q0, k0, v0 = rand_qkv(20, 4, 2, 8)
    return moba_attn_varlen(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v,
                            cu_from_lens([12, 8]) if cu is None else cu, max_seqlen, chunk_size, topk, **kw)


BAD = [  # (kwargs, exception, text the message must contain)
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(20, 4)), ValueError, "q must have 3 dims"),
    (dict(k=torch.randn(20, 2, 8, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(q=torch.randint(0, 3, (20, 4, 8))), TypeError, "q has dtype torch.int64"),
    (dict(k=torch.randn(20, 3, 8), v=torch.randn(20, 3, 8)), ValueError, "multiple of the number of key/value heads"),
    (dict(v=torch.randn(20, 2, 6)), ValueError, "k and v must have the same shape"),
    (dict(k=torch.randn(20, 2, 6), v=torch.randn(20, 2, 6)), ValueError, "same head_dim"),
    (dict(k=torch.randn(19, 2, 8), v=torch.randn(19, 2, 8)), ValueError, "q and k must agree on total_tokens"),
    (dict(k=torch.randn(20, 2, 8, device="meta"), v=torch.randn(20, 2, 8, device="meta")), ValueError, "one device"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=4.0), TypeError, "chunk_size must be an int"),
    (dict(topk=0), ValueError, "topk must be >= 1"),
    (dict(topk=True), TypeError, "topk must be an int"),
    (dict(cu=torch.tensor([0, 12, 20], dtype=torch.int64)), TypeError, "cu_seqlens must have dtype torch.int32"),
    (dict(cu=[0, 12, 20]), TypeError, "cu_seqlens must be a torch.Tensor"),
    (dict(cu=torch.tensor([20], dtype=torch.int32)), ValueError, "cu_seqlens must be 1-D"),
    (dict(cu=torch.tensor([1, 12, 20], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
    (dict(cu=torch.tensor([0, 12, 8, 20], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu=torch.tensor([0, 12, 19], dtype=torch.int32)), ValueError, "cu_seqlens[-1] (19) must equal total_tokens"),
    (dict(max_seqlen=10), ValueError, "max_seqlen (10) is smaller than the longest sequence"),
    (dict(max_seqlen=None), TypeError, "max_seqlen must be an int"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a finite positive number"),
    (dict(softmax_scale="x"), TypeError, "softmax_scale must be a float"),
    (dict(backend="flash"), ValueError, "unknown backend 'flash'"),
    (dict(backend=3), TypeError, "backend must be a string"),
]


@pytest.mark.parametrize("kwargs,exc,text", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_raises(kwargs, exc, text):
    with pytest.raises(exc) as info:
        _call(**kwargs)
    assert text in str(info.value)


def test_batched_layout_errors():
    q, k, v = (t.view(2, 10, -1, 8) for t in rand_qkv(20, 4, 2, 8))
    with pytest.raises(ValueError, match="q must have 4 dims"):
        moba_attn(q[0], k, v, 4, 2)
    with pytest.raises(ValueError, match="q and k must agree on batch and seqlen"):
        moba_attn(q, k[:, :9], v[:, :9], 4, 2)
    with pytest.raises(ValueError, match="cu_seqlens is only for the varlen layout"):
        moba_select_blocks(q, k, 4, 2, cu_seqlens=cu_from_lens([10, 10]))
    with pytest.raises(ValueError, match="cu_seqlens is required"):
        moba_select_blocks(q[0], k[0], 4, 2)


def test_unsupported_input_for_a_backend_names_the_alternative(monkeypatch):
    from moba_kernels import api
    picky = api.Backend("picky", api._torch,
                        unsupported=lambda q, chunk, pos: f"head_dim {q.shape[-1]} not in (64, 128)")
    monkeypatch.setitem(api.BACKENDS, "picky", picky)
    with pytest.raises(ValueError,
                       match=r"backend 'picky' does not support these inputs \(head_dim 8.*backend='torch'"):
        _call(backend="picky")
    monkeypatch.setattr(api, "AUTO_ORDER", ["picky", "torch"])
    assert _call().shape == (20, 4, 8)     # automatic choice falls back to torch


@pytest.mark.parametrize("pos,exc,text", [
    ([0, 5], TypeError, "q_positions must be a torch.Tensor"),
    (torch.tensor([0, 5], dtype=torch.int32), TypeError, "q_positions must have dtype torch.int64"),
    (torch.tensor([0, 5, 6]), ValueError, "one entry per query row (2)"),
    (torch.tensor([5, 3]), ValueError, "q_positions must be strictly ascending"),
    (torch.tensor([3, 20]), ValueError, r"q_positions must lie in [0, 20)"),
])
def test_bad_q_positions(pos, exc, text):
    q, k, v = rand_qkv(20, 4, 2, 8)
    with pytest.raises(exc) as info:
        moba_attn_varlen(q[:2], k, v, cu_from_lens([12, 8]), 12, 4, 2, q_positions=pos)
    assert text in str(info.value)
