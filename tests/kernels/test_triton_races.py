"""The Triton kernels race-free and writing every output, checked launch by launch in Triton's
interpreter (triton_launch_check.py: per program, the addresses each one loads, stores and
updates atomically).

The interpreter runs a launch's programs one after another, so races and unwritten elements do
not show in the results; the checker finds them from the addresses.  It is tested first on toy
kernels with planted bugs, then run over the gate, forward and backward (both dQ modes) on shapes
that stress the index logic, with every output starting as NaN / a sentinel and the results
compared to the reference backend.
"""
import math

import pytest
import torch

pytest.importorskip("triton")
triton_backend = pytest.importorskip("moba_kernels.triton_backend")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton_launch_check as tlc  # noqa: E402

from helpers import cu_from_lens, max_err, rand_qkv, run_with_grads  # noqa: E402
from moba_kernels import moba_attn_varlen  # noqa: E402
from moba_kernels.gate import select_blocks  # noqa: E402
from moba_kernels.layout import block_layout  # noqa: E402
from moba_kernels.naive import selection_mask  # noqa: E402
from moba_kernels.triton_backend import buffers  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_backend.available(torch.device("cpu")) or torch.cuda.is_available(),
                                reason="the checker runs in Triton's interpreter (TRITON_INTERPRET=1, no CUDA)")


# ---------------------------------------------------------------- the checker on toy kernels
@triton.jit
def _double(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < N) * 2, mask=i < N)


@triton.jit
def _racy(X, Y, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)                            # every program stores the first block
    tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)


@triton.jit
def _reads_neighbour(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    nxt = i + BLOCK                                    # the next program's rows of Y
    tl.store(Y + i, tl.load(X + i, mask=i < N) + tl.load(Y + nxt, mask=nxt < N, other=0.0), mask=i < N)


@triton.jit
def _skips_last_row(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N - 1)


@triton.jit
def _atomic_sum(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(Y + i % 4, tl.load(X + i, mask=i < N), mask=i < N)    # programs share Y[0:4]


@triton.jit
def _store_over_atomics(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if tl.program_id(0) == 0:
        tl.store(Y + i % 4, tl.load(X + i, mask=i < N), mask=i < N)
    else:
        tl.atomic_add(Y + i % 4, tl.load(X + i, mask=i < N), mask=i < N)


@triton.jit
def _store_then_reload(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)
    tl.store(Y + i, tl.load(Y + i, mask=i < N) * 2, mask=i < N)       # its own rows, after writing them


@triton.jit
def _reload_then_store(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(Y + i, mask=i < N)                                      # its own rows, before writing them
    tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)
    tl.store(Y + i, y, mask=i < N)


@triton.jit
def _unmasked(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i), mask=i < N)       # loads past the end of X


N, BLOCK = 37, 16
GRID = (triton.cdiv(N, BLOCK),)


def _toy(kernel, x=None, zero=False):
    x = torch.arange(N, dtype=torch.float32) if x is None else x
    y = (buffers.zeros if zero else buffers.empty)(N, dtype=torch.float32, device="cpu")
    kernel[GRID](x, y, N, BLOCK=BLOCK)
    return y


def test_a_correct_kernel_passes_and_is_counted():
    with tlc.LaunchChecker() as chk:
        y = _toy(_double)
    tlc.assert_defined("y", y)
    assert torch.equal(y, torch.arange(N, dtype=torch.float32) * 2)
    assert chk.kernels == {"_double": 1}
    assert chk.stats["launches"] == 1 and chk.stats["programs"] == 3
    assert chk.stats["stores"] == N and chk.stats["loads"] == N and chk.stats["atomics"] == 0


def test_two_programs_storing_one_address_are_caught():
    with pytest.raises(tlc.RaceError, match=r"_racy .*: 16 addresses stored by two or more programs .* e\.g\. "
                                            r"Y\[0\] by programs \(0, 0, 0\), \(1, 0, 0\), \(2, 0, 0\)"):
        with tlc.LaunchChecker():
            _toy(_racy)


def test_reading_a_neighbours_output_is_caught():
    with pytest.raises(tlc.CrossProgramRead, match=r"_reads_neighbour .*: 21 loads of addresses another program "
                                                   r"of the launch writes, e\.g\. program \(0, 0, 0\) loads Y\[16\] "
                                                   r"written by program \(1, 0, 0\)"):
        with tlc.LaunchChecker():
            _toy(_reads_neighbour)


def test_a_skipped_row_is_caught_in_the_buffer_and_the_output():
    with pytest.raises(tlc.UnwrittenOutput, match=r"1 of 37 elements of a float32\[37\] allocated at "
                                                  r"test_triton_races.py:\d+ \(_toy\) were never written by any "
                                                  r"launch, e\.g\. element \(36,\)"):
        with tlc.LaunchChecker():
            y = _toy(_skips_last_row)
    with pytest.raises(tlc.UnwrittenOutput, match=r"y: 1 of 37 elements were never written \(NaN / sentinel\), "
                                                  r"e\.g\. at \(36,\)"):
        tlc.assert_defined("y", y)


def test_reading_an_element_no_launch_wrote_is_caught():
    with pytest.raises(tlc.UnwrittenRead, match=r"_double \(launch 1.*: 1 loads of a float32\[37\] allocated at "
                                                r".* before any program wrote them, e\.g\. element 36 by program "
                                                r"\(2, 0, 0\)"):
        with tlc.LaunchChecker(coverage=False):
            y = _toy(_skips_last_row)
            _toy(_double, x=y)


def test_a_program_may_reload_what_it_wrote_but_not_read_a_fresh_buffer_first():
    with tlc.LaunchChecker():
        y = _toy(_store_then_reload)
    assert torch.equal(y, torch.arange(N, dtype=torch.float32) * 2)
    with pytest.raises(tlc.UnwrittenRead, match=r"_reload_then_store .*: 37 loads of a float32\[37\] allocated at "
                                                r".* before any program wrote them, e\.g\. element 0 by program "
                                                r"\(0, 0, 0\)"):
        with tlc.LaunchChecker():
            _toy(_reload_then_store)


def test_atomics_may_share_addresses_but_not_with_plain_stores():
    with tlc.LaunchChecker(coverage=False) as chk:      # only y[0:4] is written
        y = _toy(_atomic_sum, zero=True)
    assert chk.stats["atomics"] == N and chk.stats["shared_atomic_elements"] == 4
    assert chk.atomic_args == {("_atomic_sum", "Y")}
    assert float(y.sum()) == sum(range(N))
    with pytest.raises(tlc.RaceError, match=r"_store_over_atomics .*: 4 addresses stored by two or more programs"):
        with tlc.LaunchChecker(coverage=False):
            _toy(_store_over_atomics, zero=True)


def test_an_access_outside_the_arguments_is_caught():
    storage = torch.arange(64, dtype=torch.float32)
    with pytest.raises(tlc.OutOfBounds, match=r"_unmasked .*: 11 element loads outside every tensor argument, "
                                              r"e\.g\. .* by program \(2, 0, 0\)"):
        with tlc.LaunchChecker(coverage=False):
            _toy(_unmasked, x=storage[:N])                    # the bytes past X belong to its storage


def test_the_patches_are_undone():
    from triton.runtime import interpreter as ip
    call, builder = ip.GridExecutor.__call__, ip.interpreter_builder
    with tlc.LaunchChecker():
        assert ip.GridExecutor.__call__ is not call and "create_masked_store" in vars(builder)
        assert buffers.WATCH is not None
    assert ip.GridExecutor.__call__ is call and "create_masked_store" not in vars(builder)
    assert buffers.WATCH is None
    with pytest.raises(tlc.RaceError):
        with tlc.LaunchChecker():
            _toy(_racy)
    assert ip.GridExecutor.__call__ is call and buffers.WATCH is None


# ---------------------------------------------------------------- the MoBA kernels
CASES = {  # name: (lens, hq, hkv, dim, chunk, topk, query rows or None)
    "T63-mha": ([63], 2, 2, 16, 16, 2, None),
    "ragged-one-token-gqa2": ([1, 40, 0, 22, 1], 4, 2, 16, 16, 3, None),
    "chunk48-gqa4": ([63, 30], 4, 1, 16, 48, 2, None),           # chunk not a multiple of 64-key tiles
    "chunk96-tile32": ([63, 100], 2, 2, 16, 96, 2, None),         # 32-row tiles, a 64 + 32 key tiling
    "topk1-chunk80": ([100, 1, 20], 2, 1, 16, 80, 1, None),       # own block only
    "topk-over-blocks": ([70, 1, 25], 4, 2, 16, 16, 8, None),     # topk >= blocks: dense causal
    "cp-rows": ([64], 4, 2, 16, 16, 2, [*range(0, 16), *range(48, 64)]),          # CP rank: chunks 0 and 3
    "scattered-rows-gqa4": ([50, 1, 31], 4, 1, 16, 16, 3, [3, 4, 5, 17, 30, 49, 50, 52, 80, 81]),
    "decode-step": ([45], 2, 1, 16, 16, 2, [44]),
    "fp16-ragged": ([1, 63, 34], 4, 2, 32, 16, 3, None),        # 2-byte elements next to int32 indices
    "many-pair-tiles": ([160], 4, 1, 16, 16, 2, None),           # a block chosen by > 64 pairs: several tiles
    "dim256-tiles32": ([70, 33], 2, 1, 256, 32, 3, None),        # head dim > 128: 32-row/32-key tiles
}
DTYPES = {"fp16-ragged": torch.float16}
ATOMIC = ["ragged-one-token-gqa2", "chunk48-gqa4", "scattered-rows-gqa4"]
KERNELS = {"_block_mean_kernel", "_gate_topk_kernel", "_own_fwd_kernel", "_past_fwd_kernel", "_dkdv_kernel",
           "_own_dq_kernel", "_past_dq_kernel"}


def _reference_lse(q, k, sel, layout, scale, q_tok):
    """Log-sum-exp [Tq, Hq] of the scaled scores over each query's visible keys (fp64)."""
    group = q.shape[1] // k.shape[1]
    out = torch.full(q.shape[:2], math.nan, dtype=torch.float64)
    for s, length in enumerate(layout.seqlens):
        a = int(layout.seq_start[s])
        r0, r1 = torch.searchsorted(q_tok, torch.tensor([a, a + length])).tolist()
        if r1 == r0:
            continue
        blocks = layout.token_local_block[a:a + length]
        mask = selection_mask(sel[r0:r1], q_tok[r0:r1] - a, blocks, int(blocks[-1]) + 1)       # [Hq, Lq, L]
        ks = k[a:a + length].double().repeat_interleave(group, 1).transpose(0, 1)
        scores = q[r0:r1].double().transpose(0, 1) @ ks.transpose(1, 2) * scale
        out[r0:r1] = torch.logsumexp(scores.masked_fill(~mask, -math.inf), -1).transpose(0, 1)
    return out


def _checked_case(name, dq_mode, monkeypatch):
    lens, hq, hkv, dim, chunk, topk, rows = CASES[name]
    monkeypatch.setenv("MOBA_TRITON_DQ", dq_mode)
    dtype = DTYPES.get(name, torch.float32)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    q, k, v = rand_qkv(sum(lens), hq, hkv, dim, dtype, seed=len(name))
    pos = None if rows is None else torch.tensor(rows)
    q = q if pos is None else q[pos]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    cu, scale = cu_from_lens(lens), dim ** -0.5
    with tlc.checked() as chk:
        sel = triton_backend.triton_select_op(q, k, cu, chunk, topk, pos)
        out, lse = triton_backend.triton_fwd_op(q, k, v, cu, sel, chunk, scale, pos)
        dq, dk, dv = triton_backend.triton_bwd_op(dout, q, k, v, out, lse, cu, sel, chunk, scale, pos)
    for label, t in [("selection", sel), ("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)]:
        tlc.assert_defined(label, t)

    layout = block_layout(cu.tolist(), chunk, q.device)
    assert torch.equal(sel, select_blocks(q, k, layout, topk, pos))
    q_tok = torch.arange(q.shape[0]) if pos is None else pos
    assert max_err(lse, _reference_lse(q, k, sel, layout, scale, q_tok)) < tol
    fn = lambda a, b, c: moba_attn_varlen(a, b, c, cu, max(lens), chunk, topk, backend="reference", q_positions=pos)
    ref_out, ref_grads = run_with_grads(fn, [q, k, v], dout)
    assert out.dtype == dtype and max_err(out, ref_out) < tol
    for label, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert g.dtype == dtype and max_err(g, rg) < tol, label
    return chk


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_are_race_free_and_write_every_output(name, monkeypatch):
    chk = _checked_case(name, "separate", monkeypatch)
    topk = CASES[name][5]
    expected = KERNELS - {"_past_dq_kernel", "_past_fwd_kernel"} if topk == 1 else KERNELS
    if topk == 1:
        expected = expected - {"_block_mean_kernel", "_gate_topk_kernel"}
    assert set(chk.kernels) == expected
    assert chk.atomic_args == set()                    # the deterministic mode uses no atomics
    assert len(chk.buffers) >= 4 and chk.stats["stores"] > 0


@pytest.mark.parametrize("name", ATOMIC)
def test_atomic_dq_mode_shares_only_dq_rows_and_only_atomically(name, monkeypatch):
    chk = _checked_case(name, "atomic", monkeypatch)
    assert "_own_dq_kernel" not in chk.kernels and "_past_dq_kernel" not in chk.kernels
    assert chk.atomic_args == {("_dkdv_kernel", "DQ")}
    assert chk.stats["shared_atomic_elements"] > 0     # rows really are shared by several key tiles


# ---------------------------------------------------------------- the checker on the real kernels' index bugs
def test_an_overlapping_pair_tile_in_the_past_kernels_is_caught(monkeypatch):
    """Break the reverse index so that two tiles of slot 0 cover the same selection pairs: two
    programs of one _past_fwd_kernel launch then read-modify-write the same accumulator rows."""
    from moba_kernels.triton_backend import tiles
    real = tiles.past_index

    def overlapping(*args, **kwargs):
        past = real(*args, **kwargs)
        s0, e0 = past.slot_range[0].tolist()
        assert e0 - s0 >= 2
        past.tile_pair[s0 + 1], past.tile_len[s0 + 1] = past.tile_pair[s0], past.tile_len[s0]
        return past
    monkeypatch.setattr(tiles, "past_index", overlapping)
    with pytest.raises(tlc.RaceError, match=r"_past_fwd_kernel .*addresses stored by two or more programs .* "
                                            r"e\.g\. (ACC|LSE)\[\d+"):
        _checked_case("ragged-one-token-gqa2", "separate", monkeypatch)


def test_a_dropped_query_tile_is_caught(monkeypatch):
    """Drop the last query tile: its rows' selections, outputs and LSE are never written, and the
    backward reads that LSE."""
    from moba_kernels.triton_backend import tiles
    real = tiles.query_tiles

    def dropped(*args, **kwargs):
        t = real(*args, **kwargs)
        return tiles.QueryTiles(*(x[:-1] for x in (t.row, t.token, t.length, t.block_start, t.own, t.first_block)),
                                t.count - 1)
    monkeypatch.setattr(tiles, "query_tiles", dropped)
    with pytest.raises(tlc.UnwrittenRead, match=r"_dkdv_kernel .*: 16 loads of a float32\[392\] allocated at "
                                                r"fwd.py:\d+ \(moba_fwd_triton\) before any program wrote them"):
        _checked_case("fp16-ragged", "separate", monkeypatch)
    # the forward alone: the selection rows of that tile are never written
    with pytest.raises(tlc.UnwrittenOutput, match=r"16 of 784 elements of a int32\[98, 4, 2\] allocated at "
                                                  r"gate.py:\d+ \(select_blocks_triton\) were never written"):
        with tlc.LaunchChecker():
            q, k, v = rand_qkv(98, 4, 2, 32, torch.float16)
            cu = cu_from_lens([1, 63, 34])
            sel = triton_backend.triton_select_op(q, k, cu, 16, 3)
            triton_backend.triton_fwd_op(q, k, v, cu, sel, 16, 32 ** -0.5)


def test_report_the_launches_and_accesses_checked(capsys):
    """Runs last in this file: the figures of all the checked MoBA runs above (the runs with planted
    bugs are not counted)."""
    totals, kernels = tlc.TOTALS, tlc.KERNELS
    if not set(kernels) >= KERNELS:
        pytest.skip("run with the kernel tests above")
    line = (f"triton race/coverage checker: {totals['launches']} launches of {len(kernels)} kernels, "
            f"{totals['programs']} programs, {totals['stores']} element stores, {totals['atomics']} atomic updates "
            f"({totals['shared_atomic_elements']} elements shared), {totals['loads']} loads checked")
    with capsys.disabled():                            # shown in make test's output
        print(f"\n{line}")
    assert totals["launches"] >= len(CASES) * 5
