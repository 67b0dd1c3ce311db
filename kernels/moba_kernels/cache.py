"""Host bookkeeping reused across calls on the very same tensors.

Every layer of a model calls MoBA with the same ``cu_seqlens`` tensor (and, under context
parallelism, the same ``q_positions``), and the forward, backward and gate of one call each need
the block layout built from it.  Reading ``cu_seqlens`` to the host and building the layout and
query tiles cost a device sync and dozens of small ops per use; ``TensorKeyedCache`` keeps the
result for as long as the key tensors live unmodified:

* a hit needs the *same tensor objects* (held by weak reference, so reused ids never match a
  dead entry) at the *same version* (any in-place change invalidates), plus equal plain keys;
* an entry is dropped as soon as one of its tensors dies (values must not hold the key tensors);
  at most ``size`` are kept (least recently used dropped);
* tensors that track no version (inference mode) are never cached.

``clear_caches()`` (exported as ``moba_kernels.clear_caches``) empties every cache of the package and
every ``TensorKeyedCache`` built elsewhere (megatron_moba's context-parallel gathers), e.g. between
benchmarks or after freeing a model.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, List, Optional, Tuple

import torch


def _identity(tensors: Tuple[Optional[torch.Tensor], ...]):
    """(ids, versions) of the key tensors, or None when one of them tracks no version."""
    try:
        versions = tuple(None if t is None else t._version for t in tensors)
    except RuntimeError:          # inference tensors have no version counter
        return None
    return tuple(id(t) for t in tensors), versions


_ALL: "weakref.WeakSet[TensorKeyedCache]" = weakref.WeakSet()      # every live cache, for clear_caches()
_CLEARERS: List[Callable[[], None]] = []                            # other caches of the package


class TensorKeyedCache:
    """A small LRU cache keyed by live tensors (identity and version) plus plain values."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        _ALL.add(self)

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def get_or_build(self, tensors: Tuple[Optional[torch.Tensor], ...], extra: tuple, build: Callable[[], Any]):
        ident = _identity(tensors)
        if ident is None:
            return build()
        key = (ident[0], extra)
        entry = self.entries.get(key)
        if entry is not None:
            refs, versions, value = entry
            if versions == ident[1] and all(r is None if t is None else r() is t for r, t in zip(refs, tensors)):
                self.entries.move_to_end(key)
                return value
            del self.entries[key]
        value = build()
        drop = lambda _ref, key=key: self.entries.pop(key, None)
        refs = tuple(None if t is None else weakref.ref(t, drop) for t in tensors)
        self.entries[key] = (refs, ident[1], value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


def register_clearer(clear: Callable[[], None]) -> None:
    """Have ``clear_caches()`` also call ``clear`` (for caches that are not a TensorKeyedCache)."""
    _CLEARERS.append(clear)


def clear_caches() -> None:
    """Empty every TensorKeyedCache and every registered cache (host values, block layouts, Triton
    tilings, shared cu_seqlens tensors)."""
    for cache in list(_ALL):
        cache.clear()
    for clear in _CLEARERS:
        clear()
