"""The memory-efficient `torch` backend against the `reference` backend: forward and gradients."""
from functools import partial

import pytest
import torch

from helpers import assert_error_ratio, cu_from_lens, max_err, rand_qkv, run_with_grads
from moba_kernels import moba_attn, moba_attn_varlen

CASES = [  # (lens, hq, hkv, dim, chunk, topk)
    ([63], 4, 4, 32, 8, 3),                 # odd length, MHA
    ([63], 4, 2, 64, 8, 3),                 # GQA 2
    ([70], 8, 1, 32, 16, 2),                # MQA / GQA 8
    ([5, 0, 40, 3, 17], 4, 2, 32, 8, 3),    # ragged varlen: shorter than a block, empty, partial blocks
    ([48, 31], 2, 2, 128, 8, 1),            # topk = 1, head dim 128
    ([33], 2, 1, 64, 8, 9),                 # topk >= blocks
    ([20, 9], 2, 2, 32, 32, 2),             # chunk >= seqlen
]


def _varlen(q, k, v, cu, max_seqlen, chunk, topk, backend):
    return moba_attn_varlen(q, k, v, cu, max_seqlen, chunk, topk, backend=backend)


def _both(lens, hq, hkv, dim, chunk, topk, dtype, seed=0):
    q, k, v = rand_qkv(sum(lens), hq, hkv, dim, dtype, seed=seed)
    cu = cu_from_lens(lens)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    results = {}
    for backend, dt in (("torch", dtype), ("reference", dtype), ("truth", torch.float64)):
        fn = partial(_varlen, cu=cu, max_seqlen=max(lens), chunk=chunk, topk=topk,
                     backend="reference" if backend == "truth" else backend)
        results[backend] = run_with_grads(fn, [t.to(dt) for t in (q, k, v)], grad)
    return results


@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", CASES)
def test_fp32_matches_reference(lens, hq, hkv, dim, chunk, topk):
    r = _both(lens, hq, hkv, dim, chunk, topk, torch.float32)
    (out, grads), (ref_out, ref_grads) = r["torch"], r["reference"]
    assert out.dtype == torch.float32
    assert max_err(out, ref_out) < 1e-5
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", [CASES[1], CASES[3], CASES[4]])
def test_low_precision_error_rule(dtype, lens, hq, hkv, dim, chunk, topk):
    """flash-attention's rule: error vs fp64 at most 2x (forward) / 3x (grads) the reference's own."""
    r = _both(lens, hq, hkv, dim, chunk, topk, dtype, seed=3)
    (out, grads), (ref_out, ref_grads), (true_out, true_grads) = r["torch"], r["reference"], r["truth"]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_error_ratio(out, grads, ref_out, ref_grads, true_out, true_grads)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("lens,hq,hkv,chunk,topk", [([11, 0, 6], 4, 2, 3, 2), ([9], 2, 1, 2, 3)])
def test_gradcheck_float64(backend, lens, hq, hkv, chunk, topk):
    q, k, v = rand_qkv(sum(lens), hq, hkv, 4, torch.float64, seed=9, requires_grad=True)
    cu = cu_from_lens(lens)
    fn = lambda q_, k_, v_: moba_attn_varlen(q_, k_, v_, cu, max(lens), chunk, topk, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


def test_packed_equals_one_by_one():
    """Documents in a packed batch never see each other."""
    lens = [19, 1, 0, 44]
    q, k, v = rand_qkv(sum(lens), 4, 2, 32, seed=4)
    packed = moba_attn_varlen(q, k, v, cu_from_lens(lens), 44, 8, 2, backend="torch")
    start = 0
    for n in lens:
        s = slice(start, start + n)
        alone = moba_attn(q[None, s], k[None, s], v[None, s], 8, 2, backend="torch")[0]
        assert alone.shape == (n, 4, 32)
        if n:
            assert max_err(packed[s], alone) < 1e-6
        start += n


def test_batched_matches_varlen_and_reference():
    b, s = 3, 37
    q, k, v = rand_qkv(b * s, 4, 2, 32, seed=8)
    out = moba_attn(q.view(b, s, 4, 32), k.view(b, s, 2, 32), v.view(b, s, 2, 32), 8, 3, backend="torch")
    ref = moba_attn_varlen(q, k, v, cu_from_lens([s] * b), s, 8, 3, backend="reference")
    assert out.shape == (b, s, 4, 32)
    assert max_err(out.flatten(0, 1), ref) < 1e-5


def test_default_backend_and_scale():
    q, k, v = rand_qkv(40, 2, 2, 16, seed=6)
    cu = cu_from_lens([40])
    auto = moba_attn_varlen(q, k, v, cu, 40, 8, 2)
    explicit = moba_attn_varlen(q, k, v, cu, 40, 8, 2, softmax_scale=16 ** -0.5, backend="reference")
    assert max_err(auto, explicit) < 1e-5
    other = moba_attn_varlen(q, k, v, cu, 40, 8, 2, softmax_scale=0.5, backend="reference")
    assert max_err(moba_attn_varlen(q, k, v, cu, 40, 8, 2, softmax_scale=0.5), other) < 1e-5
    assert max_err(other, explicit) > 1e-3


def test_empty_input():
    q, k, v = rand_qkv(0, 2, 1, 8, requires_grad=True)
    out = moba_attn_varlen(q, k, v, torch.zeros(3, dtype=torch.int32), 0, 4, 2)
    assert out.shape == (0, 2, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_torch_compile_sees_custom_ops():
    q, k, v = rand_qkv(48, 4, 2, 16, seed=12, requires_grad=True)
    cu = cu_from_lens([30, 18])
    fn = lambda q_, k_, v_: moba_attn_varlen(q_, k_, v_, cu, 30, 8, 2, backend="torch")
    eager = fn(q, k, v)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)
    assert max_err(eager, compiled) < 1e-6
    gq_c, = torch.autograd.grad(compiled.sum(), q)
    gq_e, = torch.autograd.grad(eager.sum(), q)
    assert max_err(gq_c, gq_e) < 1e-6


@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", [CASES[2], CASES[3]])
def test_portable_own_block_path_matches_reference(monkeypatch, lens, hq, hkv, dim, chunk, topk):
    """The own-block path used off CPU (no fused CPU flash kernel), run here on CPU."""
    from moba_kernels import torch_backend
    monkeypatch.setattr(torch_backend, "USE_CPU_FLASH", False)
    r = _both(lens, hq, hkv, dim, chunk, topk, torch.float32, seed=21)
    (out, grads), (ref_out, ref_grads) = r["torch"], r["reference"]
    assert max_err(out, ref_out) < 1e-5
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 1e-5, name


def test_portable_path_gradcheck(monkeypatch):
    from moba_kernels import torch_backend
    monkeypatch.setattr(torch_backend, "USE_CPU_FLASH", False)
    q, k, v = rand_qkv(14, 4, 2, 4, torch.float64, seed=13, requires_grad=True)
    cu = cu_from_lens([9, 5])
    fn = lambda q_, k_, v_: moba_attn_varlen(q_, k_, v_, cu, 9, 3, 2, backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_query_subset_matches_rows_of_full_attention(backend):
    """q_positions (context parallelism): a subset of queries at their global positions gives
    the same rows and the same gradients as the full computation."""
    lens = [30, 0, 41]
    q, k, v = rand_qkv(sum(lens), 4, 2, 16, seed=17)
    cu = cu_from_lens(lens)
    pos = torch.tensor([0, 3, 7, 8, 9, 20, 29, 30, 33, 45, 60, 70])
    grad = torch.randn(len(pos), 4, 16, generator=torch.Generator().manual_seed(2))
    full_grad = torch.zeros(sum(lens), 4, 16)
    full_grad[pos] = grad
    full, full_grads = run_with_grads(
        lambda q_, k_, v_: moba_attn_varlen(q_, k_, v_, cu, 41, 8, 2, backend="reference"), [q, k, v], full_grad)
    sub, sub_grads = run_with_grads(
        lambda q_, k_, v_: moba_attn_varlen(q_, k_, v_, cu, 41, 8, 2, backend=backend, q_positions=pos),
        [q[pos], k, v], grad)
    assert sub.shape == (len(pos), 4, 16)
    assert max_err(sub, full[pos]) < 1e-5
    assert max_err(sub_grads[0], full_grads[0][pos]) < 1e-5
    assert max_err(sub_grads[1], full_grads[1]) < 1e-5
    assert max_err(sub_grads[2], full_grads[2]) < 1e-5


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", [CASES[1], CASES[3], CASES[5]])
def test_smallest_tiles_match_reference(monkeypatch, flash, lens, hq, hkv, dim, chunk, topk):
    """Every tiling loop taken many times: one block per own-block step, a few rows per
    earlier-block step (a group of pairs split across steps), two score rows per portable step."""
    from moba_kernels import gate, torch_backend
    monkeypatch.setattr(torch_backend, "USE_CPU_FLASH", flash)
    monkeypatch.setattr(torch_backend, "_TILE", 3 * dim)
    monkeypatch.setattr(torch_backend, "_SCORE_BUDGET", 2 * hq * chunk)
    monkeypatch.setattr(gate, "_SCORE_BUDGET", 5 * hq * 2)
    r = _both(lens, hq, hkv, dim, chunk, topk, torch.float32, seed=31)
    (out, grads), (ref_out, ref_grads) = r["torch"], r["reference"]
    assert max_err(out, ref_out) < 1e-5
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 1e-5, name


@pytest.mark.parametrize("flash", [True, False])
def test_query_subset_in_small_tiles(monkeypatch, flash):
    """q_positions with the own-block pass packing one block per step (portable and CPU flash)."""
    from moba_kernels import torch_backend
    monkeypatch.setattr(torch_backend, "USE_CPU_FLASH", flash)
    monkeypatch.setattr(torch_backend, "_TILE", 2 * 16)
    lens = [30, 0, 41]
    q, k, v = rand_qkv(sum(lens), 4, 2, 16, seed=18)
    cu = cu_from_lens(lens)
    pos = torch.tensor([1, 2, 7, 8, 16, 29, 31, 40, 46, 70])
    grad = torch.randn(len(pos), 4, 16, generator=torch.Generator().manual_seed(3))
    args = dict(cu_seqlens=cu, max_seqlen=41, chunk_size=8, topk=2, q_positions=pos)
    sub, sub_grads = run_with_grads(lambda q_, k_, v_: moba_attn_varlen(q_, k_, v_, backend="torch", **args),
                                    [q[pos], k, v], grad)
    ref, ref_grads = run_with_grads(lambda q_, k_, v_: moba_attn_varlen(q_, k_, v_, backend="reference", **args),
                                    [q[pos], k, v], grad)
    assert max_err(sub, ref) < 1e-5
    for name, g, rg in zip("qkv", sub_grads, ref_grads):
        assert max_err(g, rg) < 1e-5, name
