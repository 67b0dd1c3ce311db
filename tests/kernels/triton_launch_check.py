"""A race and coverage checker for Triton launches run in Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs the programs of a launch one after another (``GridExecutor`` loops over the
grid), so a kernel whose programs race on a GPU still gives the right answer there.  Inside
``LaunchChecker()`` every masked load, masked store and atomic (``InterpreterBuilder.
create_masked_load`` / ``create_masked_store`` / ``create_atomic_rmw`` / ``create_atomic_cas``)
is recorded with the program that issued it (the builder's ``grid_idx``, set by ``set_grid_idx``;
lanes whose mask is false are not accesses), and at the end of each launch
(``GridExecutor.__call__``) the launch is checked:

1. ``RaceError``: no address is written by two programs of the launch unless every write to it is
   atomic (a plain store next to another program's store or atomic is a race);
2. ``CrossProgramRead``: no program loads an address that another program of the launch writes
   (plain or atomic); a read-modify-write inside one program is fine;
3. ``OutOfBounds``: every access lies inside one of the launch's tensor arguments;
4. ``UnwrittenRead``: no program loads an element of a fresh output buffer (one allocated through
   ``moba_kernels.triton_backend.buffers``) that neither an earlier launch nor the program itself,
   before the load, has written.

Buffers allocated through ``buffers.empty`` start filled with NaN (floats) or ``INT_SENTINEL``
(integers) while the checker is active, and are kept alive until it is closed (so their
addresses are not reused).  On leaving the ``with`` block (``check_coverage``) every element of
every such buffer must have been written by some launch (``UnwrittenOutput``);
``assert_defined`` checks a final output for NaN / sentinel values.

Addresses are handled as numpy arrays (one per load / store call and program), in units of the
smallest element size the launch touches, so a launch is checked with a few sorts.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

INT_SENTINEL = -1234567       # fills fresh integer buffers (no kernel here writes it)
_KINDS = ("load", "store", "atomic")


class LaunchViolation(AssertionError):
    """A launch breaks one of the checked rules."""


class RaceError(LaunchViolation):
    pass


class CrossProgramRead(LaunchViolation):
    pass


class OutOfBounds(LaunchViolation):
    pass


class UnwrittenRead(LaunchViolation):
    pass


class UnwrittenOutput(LaunchViolation):
    pass


@dataclass
class _Arg:
    name: str
    ptr: int
    end: int           # one past the last byte of the tensor's extent
    itemsize: int
    shape: tuple
    stride: tuple


@dataclass
class _Buffer:
    """A buffer allocated through triton_backend.buffers while the checker is active."""
    tensor: torch.Tensor
    site: str
    zero: bool
    ptr: int
    itemsize: int
    written: np.ndarray            # [numel] bool: written by some launch so far
    elem_of_offset: np.ndarray     # [span in elements] -> element index (-1: not an element)

    def describe(self) -> str:
        return f"{str(self.tensor.dtype).replace('torch.', '')}{list(self.tensor.shape)} allocated at {self.site}"


@dataclass
class _Launch:
    kernel: str
    index: int
    args: List[_Arg]
    grid: tuple = (1, 1, 1)
    calls: int = 0     # memory operations recorded so far (their order within a program)
    records: Dict[str, list] = field(default_factory=lambda: {k: [] for k in _KINDS})


def _extent(t: torch.Tensor):
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _tensor_of(value):
    inner = getattr(value, "base", value)          # triton's TensorWrapper keeps the tensor in .base
    return inner if isinstance(inner, torch.Tensor) else None


def _unique_pairs(units: np.ndarray, pids: np.ndarray):
    """(unit, pid) pairs without repeats, sorted by unit then pid."""
    if units.size == 0:
        return units, pids
    order = np.lexsort((pids, units))
    u, p = units[order], pids[order]
    keep = np.ones(u.size, bool)
    keep[1:] = (u[1:] != u[:-1]) | (p[1:] != p[:-1])
    return u[keep], p[keep]


class LaunchChecker:
    """Context manager: check every Triton launch (interpreter) inside it; see the module doc.

    ``kernels`` counts the launches per kernel; ``stats`` the launches, programs and element
    accesses checked; ``atomic_args`` the (kernel, argument) pairs updated atomically."""

    def __init__(self, coverage: bool = True):
        self.coverage = coverage
        self.launches: List[str] = []
        self.kernels: Dict[str, int] = {}
        self.stats = dict(launches=0, programs=0, loads=0, stores=0, atomics=0, shared_atomic_elements=0)
        self.atomic_args = set()       # (kernel, argument) pairs that atomics update
        self.buffers: List[_Buffer] = []
        self._current: Optional[_Launch] = None
        self._undo = []

    # ------------------------------------------------------------------ patching
    def __enter__(self):
        from triton.runtime import interpreter as ip

        from moba_kernels.triton_backend import buffers
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("LaunchChecker needs Triton's interpreter (TRITON_INTERPRET=1)")
        if buffers.WATCH is not None:
            raise RuntimeError("LaunchChecker contexts do not nest")
        builder = ip.interpreter_builder
        checker = self

        def recorder(name, kind, ptr_at, mask_at):
            original = getattr(builder, name)

            def wrapped(*args):
                launch = checker._current
                if launch is not None:
                    ptrs = args[ptr_at]
                    mask = args[mask_at].data if mask_at is not None else None
                    checker._record(launch, kind, ptrs, mask)
                return original(*args)
            return wrapped

        patches = {
            "create_masked_load": recorder("create_masked_load", "load", 0, 1),
            "create_masked_store": recorder("create_masked_store", "store", 0, 2),
            "create_atomic_rmw": recorder("create_atomic_rmw", "atomic", 1, 3),
            "create_atomic_cas": recorder("create_atomic_cas", "atomic", 0, None),
        }
        for name, fn in patches.items():
            had = name in builder.__dict__
            previous = builder.__dict__.get(name)
            setattr(builder, name, fn)
            self._undo.append(lambda n=name, h=had, p=previous: setattr(builder, n, p) if h else delattr(builder, n))

        original_call = ip.GridExecutor.__call__

        def call(executor, *args, **kwargs):
            launch = checker._begin(executor, args, kwargs)
            checker._current = launch
            try:
                original_call(executor, *args, **kwargs)
                launch.grid = tuple(builder.grid_dim)
            finally:
                checker._current = None
            checker._check(launch)

        ip.GridExecutor.__call__ = call
        self._undo.append(lambda: setattr(ip.GridExecutor, "__call__", original_call))
        buffers.WATCH = self
        self._undo.append(lambda: setattr(buffers, "WATCH", None))
        return self

    def __exit__(self, exc_type, exc, tb):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if exc_type is None and self.coverage:
            self.check_coverage()
        return False

    # ------------------------------------------------------------------ recording
    def allocated(self, tensor: torch.Tensor, zero: bool):
        """Called by triton_backend.buffers for each buffer it allocates."""
        if not zero:
            if tensor.dtype.is_floating_point:
                tensor.fill_(math.nan)
            else:
                tensor.fill_(INT_SENTINEL)
        frame = sys._getframe(3)           # allocated <- _seen <- empty/zeros <- the allocating function
        site = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} ({frame.f_code.co_name})"
        ptr, end = _extent(tensor)
        itemsize = tensor.element_size()
        span = (end - ptr) // itemsize
        elem = np.full(span, -1, np.int64)
        if tensor.numel():
            offsets = np.zeros(1, np.int64)
            for size, stride in zip(tensor.shape, tensor.stride()):
                offsets = (offsets[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).reshape(-1)
            elem[offsets] = np.arange(tensor.numel())
        self.buffers.append(_Buffer(tensor, site, zero, ptr, itemsize, np.zeros(tensor.numel(), bool), elem))

    def _begin(self, executor, args, kwargs) -> _Launch:
        named = list(zip(executor.arg_names, args)) + list(kwargs.items())
        tensors = []
        for name, value in named:
            t = _tensor_of(value)
            if t is not None and t.numel():
                ptr, end = _extent(t)
                tensors.append(_Arg(name, ptr, end, t.element_size(), tuple(t.shape), tuple(t.stride())))
        return _Launch(executor.fn.__name__, len(self.launches), tensors)

    @staticmethod
    def _record(launch: _Launch, kind: str, ptrs, mask):
        from triton.runtime import interpreter as ip
        addrs = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            addrs = addrs[np.broadcast_to(np.asarray(mask, bool), ptrs.data.shape).reshape(-1)]
        if addrs.size == 0:
            return
        x, y, z = ip.interpreter_builder.grid_idx
        ny, nz = ip.interpreter_builder.grid_dim[1:]
        itemsize = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
        launch.calls += 1
        launch.records[kind].append(((x * ny + y) * nz + z, addrs.astype(np.int64), itemsize, launch.calls))

    # ------------------------------------------------------------------ checking
    def _where(self, launch: _Launch, addr: int) -> str:
        for a in launch.args:
            if a.ptr <= addr < a.end:
                off = (addr - a.ptr) // a.itemsize
                return f"{a.name}[{self._index(off, a.shape, a.stride)}]"
        return f"address {addr:#x}"

    @staticmethod
    def _index(off: int, shape, stride) -> str:
        idx = []
        for st in sorted(stride, reverse=True):
            if st:
                idx.append(off // st)
                off %= st
        return ", ".join(map(str, idx)) if len(idx) > 1 else str(idx[0] if idx else off)

    @staticmethod
    def _program(launch: _Launch, pid: int) -> str:
        _, ny, nz = launch.grid
        return f"({pid // (ny * nz)}, {pid // nz % ny}, {pid % nz})"

    def _check(self, launch: _Launch):
        recs = launch.records
        sizes = {r[2] for kind in _KINDS for r in recs[kind]}
        unit = math.gcd(*sizes) if sizes else 1
        aligned = all(not (r[1] % unit).any() for kind in _KINDS for r in recs[kind]) if unit > 1 else True
        unit = unit if aligned else 1

        def units(kind, order=False):
            """(units, pids[, call numbers]) of all accesses of a kind, each element split into units."""
            if not recs[kind]:
                return (np.zeros(0, np.int64),) * (3 if order else 2)
            us, ps, cs = [], [], []
            for pid, addrs, size, call in recs[kind]:
                u = addrs // unit
                if size > unit:
                    u = (u[:, None] + np.arange(size // unit)[None, :]).reshape(-1)
                us.append(u)
                ps.append(np.full(u.size, pid, np.int64))
                if order:
                    cs.append(np.full(u.size, call, np.int64))
            return (np.concatenate(us), np.concatenate(ps)) + ((np.concatenate(cs),) if order else ())

        name = f"{launch.kernel} (launch {launch.index}, grid {launch.grid})"
        counts = {kind: sum(r[1].size for r in recs[kind]) for kind in _KINDS}
        lu, lp = _unique_pairs(*units("load"))
        su, sp = _unique_pairs(*units("store"))
        au, ap = _unique_pairs(*units("atomic"))

        # 3. every access inside a tensor argument
        bounds = sorted((a.ptr // unit, -(-a.end // unit), a.name) for a in launch.args)
        starts = np.array([b[0] for b in bounds] or [0], np.int64)
        ends = np.array([b[1] for b in bounds] or [0], np.int64)
        for kind, u, p in (("loads", lu, lp), ("stores", su, sp), ("atomics", au, ap)):
            if u.size == 0:
                continue
            i = np.searchsorted(starts, u, side="right") - 1
            bad = (i < 0) | (u >= ends[np.maximum(i, 0)])
            if kind == "atomics":
                self.atomic_args |= {(launch.kernel, bounds[j][2]) for j in np.unique(i[~bad])}
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise OutOfBounds(f"{name}: {int(bad.sum())} element {kind} outside every tensor argument, e.g. "
                                  f"address {int(u[j]) * unit:#x} by program {self._program(launch, int(p[j]))}")

        # 1. a plain store's address is written by no other program
        wu = np.concatenate([su, au])
        wp = np.concatenate([sp, ap])
        wu, wp = _unique_pairs(wu, wp)                    # (unit, writer) pairs, sorted by unit
        first = np.ones(wu.size, bool)
        first[1:] = wu[1:] != wu[:-1]
        uniq = wu[first]                                   # written units
        start = np.flatnonzero(first)
        nwriters = np.diff(np.append(start, wu.size))
        writer = wp[start]                                 # the lowest writer of each unit
        shared = uniq[nwriters > 1]
        if shared.size:
            plain_shared = np.intersect1d(shared, su, assume_unique=False)
            if plain_shared.size:
                addr = int(plain_shared[0])
                who = np.unique(wp[wu == addr])
                raise RaceError(
                    f"{name}: {plain_shared.size} addresses stored by two or more programs (not all atomic), e.g. "
                    f"{self._where(launch, addr * unit)} by programs "
                    f"{', '.join(self._program(launch, int(w)) for w in who[:4])}")
            self.stats["shared_atomic_elements"] += int(shared.size)

        # 2. no program loads what another program of this launch writes
        if lu.size and uniq.size:
            k = np.searchsorted(uniq, lu)
            kc = np.minimum(k, uniq.size - 1)
            hit = uniq[kc] == lu
            clash = hit & ((nwriters[kc] > 1) | (writer[kc] != lp))
            if clash.any():
                j = int(np.flatnonzero(clash)[0])
                others = np.unique(wp[wu == lu[j]])
                others = [int(w) for w in others if w != lp[j]]
                raise CrossProgramRead(
                    f"{name}: {int(clash.sum())} loads of addresses another program of the launch writes, e.g. "
                    f"program {self._program(launch, int(lp[j]))} loads {self._where(launch, int(lu[j]) * unit)} "
                    f"written by program {self._program(launch, others[0])}")

        # 4. loads of fresh buffers: written by an earlier launch, or by the loading program before the load
        for buf in self.buffers:
            lo, hi = buf.ptr // unit, (buf.ptr + buf.elem_of_offset.size * buf.itemsize) // unit
            if buf.zero or lo == hi:
                continue
            inside = (lu >= lo) & (lu < hi)
            if not inside.any():
                continue
            elem = buf.elem_of_offset[(lu[inside] * unit - buf.ptr) // buf.itemsize]
            fresh = (elem < 0) | ~buf.written[np.maximum(elem, 0)]
            if fresh.any():
                self._check_fresh_loads(launch, name, buf, np.unique(lu[inside][fresh]), unit, units)

        # the buffers' written elements
        if uniq.size:
            for buf in self.buffers:
                span = buf.elem_of_offset.size * buf.itemsize
                inside = (uniq * unit >= buf.ptr) & (uniq * unit < buf.ptr + span)
                if inside.any():
                    elem = buf.elem_of_offset[(uniq[inside] * unit - buf.ptr) // buf.itemsize]
                    buf.written[elem[elem >= 0]] = True

        self.launches.append(launch.kernel)
        self.kernels[launch.kernel] = self.kernels.get(launch.kernel, 0) + 1
        s = self.stats
        s["launches"] += 1
        s["programs"] += int(np.prod(launch.grid))
        s["loads"] += counts["load"]
        s["stores"] += counts["store"]
        s["atomics"] += counts["atomic"]
        launch.records = {k: [] for k in _KINDS}          # free the addresses

    def _check_fresh_loads(self, launch, name, buf, cand, unit, units):
        """Loads of units ``cand`` of ``buf`` (not written by an earlier launch) must each follow a
        write of the same unit by the same program."""
        lu, lp, lc = units("load", order=True)
        wu, wp, wc = (np.concatenate(a) for a in zip(units("store", order=True), units("atomic", order=True)))
        keep_l, keep_w = np.isin(lu, cand), np.isin(wu, cand)
        u = np.concatenate([wu[keep_w], lu[keep_l]])
        p = np.concatenate([wp[keep_w], lp[keep_l]])
        c = np.concatenate([wc[keep_w], lc[keep_l]])
        is_load = np.concatenate([np.zeros(int(keep_w.sum()), bool), np.ones(int(keep_l.sum()), bool)])
        order = np.lexsort((is_load, c, p, u))            # per (unit, program) in program order, writes first
        u, p, is_load = u[order], p[order], is_load[order]
        idx = np.arange(u.size)
        new = np.ones(u.size, bool)
        new[1:] = (u[1:] != u[:-1]) | (p[1:] != p[:-1])
        group_start = np.maximum.accumulate(np.where(new, idx, 0))
        last_write = np.maximum.accumulate(np.where(~is_load, idx, -1))
        bad = is_load & (last_write < group_start)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            e = int(buf.elem_of_offset[(int(u[j]) * unit - buf.ptr) // buf.itemsize])
            raise UnwrittenRead(
                f"{name}: {int(bad.sum())} loads of a {buf.describe()} before any program wrote them, e.g. "
                f"element {e} by program {self._program(launch, int(p[j]))}")

    def check_coverage(self):
        """Every element of every buffer allocated through triton_backend.buffers was written."""
        for buf in self.buffers:
            missing = ~buf.written
            if missing.any():
                first = int(np.flatnonzero(missing)[0])
                index = np.unravel_index(first, tuple(buf.tensor.shape)) if buf.tensor.dim() else ()
                raise UnwrittenOutput(f"{int(missing.sum())} of {buf.written.size} elements of a {buf.describe()} "
                                      f"were never written by any launch, e.g. element {tuple(map(int, index))}")


def assert_defined(name: str, t: torch.Tensor):
    """A final output holds no NaN (floats) / INT_SENTINEL (integers): every element was written."""
    bad = torch.isnan(t) if t.dtype.is_floating_point else (t == INT_SENTINEL)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise UnwrittenOutput(f"{name}: {int(bad.sum())} of {t.numel()} elements were never written "
                              f"(NaN / sentinel), e.g. at {first}")


TOTALS = dict(launches=0, programs=0, loads=0, stores=0, atomics=0, shared_atomic_elements=0)
KERNELS: Dict[str, int] = {}


def add_to_totals(checker: LaunchChecker):
    """Sum a checker's figures into the session totals (reported by the tests)."""
    for k, v in checker.stats.items():
        TOTALS[k] += v
    for k, v in checker.kernels.items():
        KERNELS[k] = KERNELS.get(k, 0) + v


@contextlib.contextmanager
def checked():
    """``with checked() as chk:``: a LaunchChecker whose figures join the session totals."""
    with LaunchChecker() as chk:
        yield chk
    add_to_totals(chk)
