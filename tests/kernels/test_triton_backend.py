"""The Triton backend against the `reference` backend and the shared torch gate.

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): tiny
shapes, fp32 and fp16 only (the interpreter's bf16 is wrong).  The GPU tests (bf16/fp16 with
flash-attention's error rule, long sequences) skip without CUDA.
"""
from functools import partial

import pytest
import torch

from helpers import assert_error_ratio, cu_from_lens, max_err, rand_qkv, run_with_grads
from moba_kernels import api, moba_attn, moba_attn_varlen
from moba_kernels.gate import select_blocks
from moba_kernels.layout import block_layout

triton_backend = pytest.importorskip("moba_kernels.triton_backend")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not triton_backend.available(torch.device(DEVICE)),
                                reason="needs CUDA or TRITON_INTERPRET=1")

CASES = [  # (lens, hq, hkv, dim, chunk, topk)
    ([63], 2, 2, 16, 16, 2),                # odd length, partial last block, MHA
    ([100, 0, 37, 80], 4, 2, 32, 16, 3),    # ragged varlen with an empty sequence, GQA 2
    ([70], 4, 1, 16, 32, 2),                # MQA (GQA 4), chunk 32
    ([64, 9], 2, 2, 16, 16, 1),             # topk = 1: own block only
    ([90], 2, 1, 16, 16, 20),               # topk >= blocks: dense causal
    ([11, 40], 2, 2, 16, 64, 3),            # chunk longer than the sequences
]


def _run(backend, lens, hq, hkv, dim, chunk, topk, dtype, seed=0):
    q, k, v = (t.to(DEVICE) for t in rand_qkv(sum(lens), hq, hkv, dim, dtype, seed=seed))
    cu = cu_from_lens(lens).to(DEVICE)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(DEVICE)
    fn = lambda a, b, c: moba_attn_varlen(a, b, c, cu, max(lens), chunk, topk, backend=backend)
    return run_with_grads(fn, [q, k, v], grad)


@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", CASES)
def test_fp32_forward_and_gradients_match_reference(lens, hq, hkv, dim, chunk, topk):
    out, grads = _run("triton", lens, hq, hkv, dim, chunk, topk, torch.float32)
    ref_out, ref_grads = _run("reference", lens, hq, hkv, dim, chunk, topk, torch.float32)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    assert max_err(out, ref_out) < 2e-5
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape and max_err(g, rg) < 2e-5, name


@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", [CASES[1], CASES[2], ([300], 2, 1, 16, 16, 6)])
def test_fused_gate_selects_what_the_torch_gate_selects(lens, hq, hkv, dim, chunk, topk):
    q, k, _ = (t.to(DEVICE) for t in rand_qkv(sum(lens), hq, hkv, dim, torch.float32, seed=5))
    cu = cu_from_lens(lens)
    expected = select_blocks(q, k, block_layout(cu.tolist(), chunk, q.device), topk)
    got = triton_backend.triton_select_op(q, k, cu.to(DEVICE), chunk, topk)
    assert got.dtype == torch.int32 and torch.equal(got, expected)


def test_block_means_match_the_torch_gate():
    from moba_kernels.gate import block_mean_keys
    from moba_kernels.triton_backend.gate import block_mean_keys_triton
    _, k, _ = (t.to(DEVICE) for t in rand_qkv(150, 2, 2, 16, torch.float16, seed=8))
    layout = block_layout([0, 100, 100, 150], 32, k.device)          # partial last blocks, an empty sequence
    got = block_mean_keys_triton(k, layout)
    assert got.dtype == torch.float32 and max_err(got, block_mean_keys(k, layout)) < 1e-6


def test_lse_matches_torch_backend():
    from moba_kernels import ops
    lens, chunk, topk = [50, 29], 16, 2
    q, k, v = (t.to(DEVICE) for t in rand_qkv(sum(lens), 4, 2, 32, torch.float32, seed=2))
    cu = cu_from_lens(lens).to(DEVICE)
    sel = triton_backend.triton_select_op(q, k, cu, chunk, topk)
    out, lse = triton_backend.triton_fwd_op(q, k, v, cu, sel, chunk, 32 ** -0.5)
    ref_out, ref_lse = ops.torch_fwd_op(q, k, v, cu, sel, chunk, 32 ** -0.5)
    assert lse.shape == (sum(lens), 4) and lse.dtype == torch.float32
    assert max_err(lse, ref_lse) < 1e-5 and max_err(out, ref_out) < 1e-5


def test_fp16_error_rule_in_interpreter_or_gpu():
    """flash-attention's rule: fp16 error vs fp64 at most 2x (forward) / 3x (grads) the reference's."""
    case = ([63, 40], 4, 2, 32, 16, 2)
    out, grads = _run("triton", *case, torch.float16, seed=3)
    ref_out, ref_grads = _run("reference", *case, torch.float16, seed=3)
    true_out, true_grads = _run("reference", *case, torch.float64, seed=3)
    assert out.dtype == torch.float16
    assert_error_ratio(out, grads, ref_out, ref_grads, true_out, true_grads)


def test_forward_and_backward_reuse_the_plan(monkeypatch):
    from moba_kernels.triton_backend import tiles
    calls = {"past_index": [], "query_tiles": []}
    for name in calls:
        real = getattr(tiles, name)
        monkeypatch.setattr(tiles, name, lambda *a, _r=real, _n=name, **k: calls[_n].append(1) or _r(*a, **k))
    out, grads = _run("triton", *CASES[1], torch.float32)
    # tiles built once by the gate, the reverse index once by the forward; the backward reuses both
    assert len(calls["query_tiles"]) == 1 and len(calls["past_index"]) == 1
    ref_out, ref_grads = _run("reference", *CASES[1], torch.float32)
    assert max_err(out, ref_out) < 2e-5 and all(max_err(g, r) < 2e-5 for g, r in zip(grads, ref_grads))


def test_batched_entry_and_deterministic_gradients():
    q, k, v = (t.to(DEVICE).view(2, 40, *t.shape[1:]) for t in rand_qkv(80, 2, 2, 16, torch.float32, seed=4))
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fn = lambda a, b, c: moba_attn(a, b, c, 16, 2, backend="triton")
    (o1, g1), (o2, g2) = run_with_grads(fn, [q, k, v], g), run_with_grads(fn, [q, k, v], g)
    ref, _ = run_with_grads(lambda a, b, c: moba_attn(a, b, c, 16, 2, backend="reference"), [q, k, v], g)
    assert max_err(o1, ref) < 2e-5
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))   # no atomics: bitwise


@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", [CASES[1], CASES[2]])
def test_atomic_dq_mode_matches_reference(lens, hq, hkv, dim, chunk, topk, monkeypatch):
    monkeypatch.setenv("MOBA_TRITON_DQ", "atomic")
    assert triton_backend.dq_mode() == "atomic"
    _, grads = _run("triton", lens, hq, hkv, dim, chunk, topk, torch.float32)
    _, ref_grads = _run("reference", lens, hq, hkv, dim, chunk, topk, torch.float32)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 2e-5, name
    torch.use_deterministic_algorithms(True)
    try:
        assert triton_backend.dq_mode() == "separate"     # deterministic mode never uses atomics
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("MOBA_TRITON_DQ", "fast")
    with pytest.raises(ValueError, match="MOBA_TRITON_DQ must be"):
        triton_backend.dq_mode()


def test_autotune_keys_and_restored_buffers_name_real_kernel_arguments(monkeypatch):
    """Autotuning runs on CUDA only; check here that its keys and restored buffers are arguments
    of the kernels and that the tuner is built as intended."""
    from triton.runtime.autotuner import Autotuner

    from moba_kernels.triton_backend import bwd, fwd, tuning
    kernels = [fwd._own_fwd_kernel, fwd._past_fwd_kernel, bwd._dkdv_kernel, bwd._own_dq_kernel, bwd._past_dq_kernel]
    for kernel in kernels:
        base = kernel.fn if isinstance(kernel, Autotuner) else kernel     # the jitted kernel under a tuner
        spec = base.tuning
        assert set(spec["key"]) | set(spec["restore"]) <= set(base.arg_names), base.arg_names
    assert set(bwd._dkdv_kernel.tuning["restore"]) == {"DQ"}          # atomics accumulate into DQ
    assert set(fwd._past_fwd_kernel.tuning["restore"]) == {"ACC", "LSE"}
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    plain = fwd._past_fwd_kernel
    tuned = tuning.tune(key=("D",), restore=("ACC",))(plain.fn if isinstance(plain, Autotuner) else plain)
    assert isinstance(tuned, Autotuner) and len(tuned.configs) == 6
    assert {c.kwargs["BLOCK_N"] for c in tuned.configs} == {32, 64, 128}
    cfg = triton_backend.kernel_config(128, 512)
    assert tuning.launch_kwargs(cfg) == {} and tuning.launch_kwargs(cfg, block_n=False) == {"BLOCK_N": cfg.block_n}


@pytest.mark.parametrize("kwargs,text", [
    (dict(chunk=24), "chunk_size 24; the triton backend needs a multiple of 16"),
    (dict(dim=24), "head_dim 24; the triton backend takes a power of two"),
    (dict(dtype=torch.float64), "dtype torch.float64; the triton backend takes"),
])
def test_unsupported_inputs_name_the_argument_and_auto_falls_back(kwargs, text, monkeypatch):
    chunk, dim, dtype = kwargs.get("chunk", 16), kwargs.get("dim", 16), kwargs.get("dtype", torch.float32)
    q, k, v = (t.to(DEVICE) for t in rand_qkv(40, 2, 2, dim, dtype))
    cu = cu_from_lens([40]).to(DEVICE)
    with pytest.raises(ValueError, match="backend 'triton' does not support") as info:
        moba_attn_varlen(q, k, v, cu, 40, chunk, 2, backend="triton")
    assert text in str(info.value) and "backend='torch'" in str(info.value)
    # backend=None picks triton where it may (CUDA) and falls back to torch for unsupported inputs
    monkeypatch.setattr(api.BACKENDS["triton"], "auto", lambda device: True)
    assert api._pick_backend(None, q, chunk).name == "torch"


def test_backend_none_never_picks_the_interpreter_on_cpu():
    q = torch.zeros(4, 2, 16)
    assert api._pick_backend(None, q, 16).name == "torch"
    if CUDA:
        assert api._pick_backend(None, q.cuda(), 16).name == "triton"


def _at_positions(q, k, v, cu, max_seqlen, backend, pos):
    return moba_attn_varlen(q, k, v, cu, max_seqlen, 16, 2, backend=backend, q_positions=pos)


@pytest.mark.parametrize("lens,rows", [
    ([64], [*range(0, 16), *range(48, 64)]),          # context parallelism: this rank's chunks 0 and 3 of 4
    ([50, 31], [3, 4, 5, 17, 30, 31, 32, 49, 52, 80]),  # scattered rows over two documents
    ([45], [44]),                                      # one decoding step at the end
])
def test_q_positions_match_reference(lens, rows):
    q, k, v = (t.to(DEVICE) for t in rand_qkv(sum(lens), 4, 2, 16, torch.float32, seed=6))
    cu = cu_from_lens(lens).to(DEVICE)
    pos = torch.tensor(rows, device=DEVICE)
    grad = torch.randn(len(rows), 4, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    res = {b: run_with_grads(partial(_at_positions, cu=cu, max_seqlen=max(lens), backend=b, pos=pos),
                             [q[pos], k, v], grad)
           for b in ("triton", "reference")}
    (out, grads), (ref_out, ref_grads) = res["triton"], res["reference"]
    assert out.shape == (len(rows), 4, 16) and max_err(out, ref_out) < 2e-5
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert max_err(g, rg) < 2e-5, name


# ---------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter's bf16 is wrong and it is too slow)")


def _same_precision_reference(q, k, v, cu, chunk, topk, rows=4096):
    """flash-attention's low-precision yardstick: PyTorch attention (SDPA) computed in q's dtype
    under the MoBA mask, in query chunks of ``rows`` so 64K tokens fit."""
    import torch.nn.functional as F

    from moba_kernels.naive import selection_mask
    layout = block_layout(cu.tolist(), chunk, q.device)
    sel = select_blocks(q.detach(), k.detach(), layout, topk)
    group = q.shape[1] // k.shape[1]
    outs = []
    for s, length in enumerate(layout.seqlens):
        a = int(layout.seq_start[s])
        if length == 0:
            continue
        ks, vs = (x[a:a + length].repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))   # [Hq, L, D]
        blocks = layout.token_local_block[a:a + length]
        for r0 in range(0, length, rows):
            r1 = min(length, r0 + rows)
            mask = selection_mask(sel[a + r0:a + r1], torch.arange(r0, r1, device=q.device), blocks,
                                  int(blocks[-1]) + 1)                                           # [Hq, n, L]
            qs = q[a + r0:a + r1].transpose(0, 1)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
    return torch.cat(outs)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens,hq,hkv,dim,chunk,topk", [
    ([4096], 16, 4, 128, 512, 3), ([3000, 1, 5000, 777], 8, 8, 64, 128, 8), ([2048], 4, 4, 256, 256, 2),
    ([65536], 4, 1, 128, 4096, 12),
])
def test_gpu_low_precision_error_rule(dtype, lens, hq, hkv, dim, chunk, topk):
    """Error vs an fp32 truth (the torch backend, exact fp32 math) at most 2x (forward) / 3x (grads)
    the error of same-precision PyTorch attention."""
    lowp = [t.cuda().to(dtype) for t in rand_qkv(sum(lens), hq, hkv, dim, torch.float32, seed=7)]
    cu = cu_from_lens(lens).cuda()
    grad = torch.randn(lowp[0].shape, generator=torch.Generator().manual_seed(8)).cuda()
    moba = lambda backend: lambda a, b, c: moba_attn_varlen(
        a, b, c, cu, max(lens), chunk, topk, backend=backend)
    out, grads = run_with_grads(moba("triton"), lowp, grad)
    ref_out, ref_grads = run_with_grads(lambda a, b, c: _same_precision_reference(a, b, c, cu, chunk, topk),
                                        lowp, grad)
    # truth from the same (rounded) inputs, so every path selects the same blocks
    true_out, true_grads = run_with_grads(moba("torch"), [t.float() for t in lowp], grad)
    assert out.dtype == dtype
    assert_error_ratio(out, grads, ref_out, ref_grads, true_out, true_grads)


@pytest.mark.skipif(CUDA, reason="the gloo CPU harness of tests/megatron_cases.py; GPU runs: benchmarks/gpu_run.sh")
def test_megatron_gpt_with_triton_under_context_parallel_matches_torch_single_process():
    """The triton backend inside megatron's attention (sbhd -> varlen, CP=2 through q_positions):
    losses and gradients of 3 training steps match the torch backend in one process."""
    pytest.importorskip("megatron.core")
    import megatron_cases as mc
    ref = mc.run_distributed(mc.reference_run, dict(moba_chunk_size=16, moba_backend="torch"))[0]
    for run in mc.run_distributed(mc.train, dict(moba_chunk_size=16, moba_backend="triton"), ref["weights"], cp=2):
        assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) < 1e-4
        for name, g in run["grads"].items():
            assert (g - ref["grads"][name]).norm() <= 1e-4 * ref["grads"][name].norm() + 1e-8, name
