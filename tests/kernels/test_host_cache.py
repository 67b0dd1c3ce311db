"""The host bookkeeping cache (moba_kernels/cache.py): the layout and query tiles are built
once for all layers sharing a cu_seqlens tensor, and never served stale."""
import gc

import pytest
import torch

from helpers import cu_from_lens, rand_qkv
from moba_kernels import TensorKeyedCache, batch_cu_seqlens, clear_caches, moba_attn_varlen


def _counting_cache():
    cache, builds = TensorKeyedCache(size=2), []

    def get(t, extra=()):
        return cache.get_or_build((t,), extra, lambda: builds.append(t.tolist()) or len(builds))
    return cache, builds, get


def test_hit_needs_the_same_unmodified_tensor():
    cache, builds, get = _counting_cache()
    a = torch.tensor([0, 4, 9])
    assert get(a) == get(a) == 1                        # same tensor: built once
    assert get(a.clone()) == 2                          # equal values, another tensor: rebuilt
    assert get(a, extra=("chunk", 8)) == 3              # other plain key
    a[1] = 5                                            # in-place change bumps the version
    assert get(a) == 4 and builds[-1] == [0, 5, 9]


def test_entries_die_with_their_tensors_and_lru_bounds_them():
    cache, builds, get = _counting_cache()
    a, b, c = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    get(a), get(b)
    assert len(cache.entries) == 2
    del a
    gc.collect()
    assert len(cache.entries) == 1                      # dropped with its tensor
    d = torch.zeros(3)
    get(c), get(b), get(d)
    assert len(cache.entries) == 2 and get(b) == 2 and get(c) == 5      # size 2: c went first, rebuilt


def test_inference_tensors_are_never_cached():
    cache, builds, get = _counting_cache()
    with torch.inference_mode():
        t = torch.tensor([0, 3])
        get(t), get(t)
    assert len(builds) == 2 and not cache.entries


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layers_sharing_cu_seqlens_build_the_layout_once(backend, monkeypatch):
    import moba_kernels.layout as layout_mod
    from moba_kernels.triton_backend import tiles
    layouts, tilings = [], []
    real_layout, real_tiles = layout_mod.block_layout, tiles.query_tiles
    monkeypatch.setattr(layout_mod, "block_layout", lambda *a: layouts.append(1) or real_layout(*a))
    monkeypatch.setattr(tiles, "query_tiles", lambda *a: tilings.append(1) or real_tiles(*a))
    lens = [37, 0, 26]
    cu = cu_from_lens(lens)
    outs = []
    for layer in range(3):                               # three "layers", forward and backward each
        q, k, v = rand_qkv(sum(lens), 4, 2, 16, seed=layer, requires_grad=True)
        out = moba_attn_varlen(q, k, v, cu, max(lens), 16, 2, backend=backend)
        out.sum().backward()
        outs.append(out.detach())
    assert len(layouts) == 1
    assert len(tilings) == (1 if backend == "triton" else 0)
    cu[1:] = torch.tensor([30, 30, 63], dtype=torch.int32)        # changed in place: rebuilt, not stale
    q, k, v = rand_qkv(63, 4, 2, 16, seed=0)
    fresh = moba_attn_varlen(q, k, v, cu.clone(), 33, 16, 2, backend="reference")
    torch.testing.assert_close(moba_attn_varlen(q, k, v, cu, 33, 16, 2, backend=backend), fresh,
                               rtol=1e-5, atol=1e-5)
    assert len(layouts) == 2                             # rebuilt once for the changed tensor


def test_sbhd_layers_share_one_cu_seqlens_tensor():
    from megatron_moba.core.layouts import to_varlen
    x = torch.zeros(8, 2, 4, 16)
    assert to_varlen(x, x, x).cu_seqlens is to_varlen(x.clone(), x, x).cu_seqlens
    assert to_varlen(x, x, x).cu_seqlens.tolist() == [0, 8, 16]


def test_steady_state_triton_call_reads_nothing_back_to_the_host(monkeypatch):
    """After the first call of a step, a layer's forward + backward never waits on device values."""
    import sys
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def trap(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "moba_kernels" in caller:
                reads.append((_name, caller.rsplit("moba_kernels", 1)[-1], sys._getframe(1).f_lineno))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, trap)
    lens = [200, 0, 56]
    cu = cu_from_lens(lens)
    syncing = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::repeat_interleave",
               "aten::unique", "aten::_unique2"}          # ops that wait for the device on CUDA
    for layer in range(2):
        reads.clear()
        q, k, v = rand_qkv(sum(lens), 4, 2, 16, seed=layer, requires_grad=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            moba_attn_varlen(q, k, v, cu, max(lens), 32, 3, backend="triton").sum().backward()
        ops = {e.name for e in prof.events()}
        if layer == 0:                                   # the first call builds the layout: the checks see it
            assert reads and ops & syncing
    assert reads == [] and not ops & syncing, (reads, ops & syncing)


def test_clear_caches_empties_every_cache():
    from moba_kernels import _checks, layout
    from moba_kernels.triton_backend import TILINGS
    mine, builds, get = _counting_cache()
    a = torch.tensor([0, 4])
    get(a)
    q, k, v = rand_qkv(20, 2, 2, 8)
    cu = batch_cu_seqlens(2, 10, q.device)
    moba_attn_varlen(q, k, v, cu, 10, 4, 2, backend="torch")
    assert len(mine) == 1 and len(layout.LAYOUTS) >= 1 and len(_checks.HOST_VALUES) >= 1
    assert batch_cu_seqlens(2, 10, q.device) is cu                  # one shared tensor per shape
    clear_caches()
    assert len(mine) == len(layout.LAYOUTS) == len(_checks.HOST_VALUES) == len(TILINGS) == 0
    assert batch_cu_seqlens(2, 10, q.device) is not cu              # the shared tensors too
    assert get(a) == 2                                              # rebuilt after clearing
