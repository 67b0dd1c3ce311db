"""The attention benchmark's measurements (the command line is tools/bench_attention.py):

    python tools/bench_attention.py --seqlens 2048,4096,8192 --chunk-size 512 --topk 3 --out bench.json

``run(args)`` runs every (implementation, sequence length, mode) of the parsed flags, each in a fresh
subprocess (``measure``: ``python -m moba_kernels.bench --worker CONFIG_JSON``, which calls
``run_worker``), prints the table and rewrites the JSON after every measurement.  ``flex_moba`` is the
flex_attention baseline holding MoBA's selection; ``attended_pairs`` counts the (query, key) pairs MoBA
computes.  Depends on torch and moba_kernels only (triton optional: its version is reported).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}      # --dtype -> torch dtype name


def attended_pairs(q, k, chunk, topk):
    """(query, key) pairs MoBA really computes, summed over batch and heads."""
    import torch

    from moba_kernels import moba_select_blocks
    sel = moba_select_blocks(q, k, chunk, topk).long()                 # [B, S, H, topk]
    seqlen = q.shape[1]
    pos = torch.arange(seqlen, device=q.device)[None, :, None, None]
    own = (pos // chunk)
    full = torch.clamp(seqlen - sel * chunk, max=chunk)                 # keys in each selected block
    keys = torch.where(sel == own, pos % chunk + 1, full)
    return int(torch.where(sel >= 0, keys, 0).sum())


def _sdpa(q, k, v, backend=None):
    """Dense causal attention, [B, S, H, D] in and out; GQA through enable_gqa."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if backend is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa).transpose(1, 2)


def flex_moba(q, k, v, chunk, topk, block=128):
    """flex_attention (compiled) with a block mask holding the same MoBA selection as the op.

    The BlockMask is built from the selection directly (no dense [S, S] mask, so 128K fits):
    a (128-query, 128-key) tile is listed when any query of the tile selected the key's chunk,
    and mask_mod makes it exact per token."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    from moba_kernels import moba_select_blocks
    b, s, h = q.shape[:3]
    nb = -(-s // chunk)
    sel = moba_select_blocks(q.detach(), k.detach(), chunk, topk).long()             # [B, S, H, topk]
    chosen = torch.zeros(b, h, s, nb + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(3, torch.where(sel < 0, nb, sel).permute(0, 2, 1, 3), True)       # [B, H, S, NB+1]

    def mask_mod(bi, hi, qi, ki):
        return (ki <= qi) & chosen[bi, hi, qi, ki // chunk]
    if chunk % block or s % block:
        mask = create_block_mask(mask_mod, b, h, s, s, device=q.device)      # dense: short or unaligned only
    else:
        qb = s // block
        tiles = chosen[..., :nb].view(b, h, qb, block, nb).any(3)                     # [B, H, QB, NB] chunks used
        tiles = tiles.repeat_interleave(chunk // block, dim=3)                         # [B, H, QB, KVB]
        kv_num = tiles.sum(-1).to(torch.int32)
        kv_idx = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(s, s))
    flex = torch.compile(flex_attention)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def fn():
        return flex(qt, kt, vt, block_mask=mask, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    return fn


def cpu_peak_bytes(fn) -> int:
    """Peak of the bytes held by PyTorch's CPU allocator during fn() (above what was held
    before), from the profiler's allocation records: the CPU analogue of CUDA's
    max_memory_allocated."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    return peak


def run_worker(cfg: dict) -> dict:
    """One measurement in this process: the figures of one row (run by measure's subprocess)."""
    import torch
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    b, s, h, hkv, d = cfg["batch"], cfg["seqlen"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    backward = cfg["mode"] == "fwdbwd"

    def make(seqlen):
        g = torch.Generator(device=dev).manual_seed(0)
        shapes = [(b, seqlen, h, d), (b, seqlen, hkv, d), (b, seqlen, hkv, d), (b, seqlen, h, d)]
        q, k, v, do = (torch.randn(sh, device=dev, dtype=dtype, generator=g) for sh in shapes)
        for t in (q, k, v):
            t.requires_grad_(backward)
        return q, k, v, do

    def build(q, k, v, do):
        impl = cfg["impl"]
        if impl.startswith("sdpa"):
            backend = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}[impl]

            def fn():
                return _sdpa(q, k, v, backend)
        elif impl == "flex":
            fn = flex_moba(q, k, v, cfg["chunk_size"], cfg["topk"])
        else:
            from moba_kernels import moba_attn
            backend = impl
            if impl == "triton_atomic":          # the Triton backend with dQ by fp32 atomics
                os.environ["MOBA_TRITON_DQ"], backend = "atomic", "triton"

            def fn():
                return moba_attn(q, k, v, cfg["chunk_size"], cfg["topk"], backend=backend)

        def step():
            out = fn()
            if backward:
                torch.autograd.grad(out, (q, k, v), do)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return step

    # Warm up on a short sequence first: library loading and thread pools must not count as peak memory.
    build(*make(min(s, 2 * cfg["chunk_size"])))()
    q, k, v, do = make(s)
    step = build(q, k, v, do)
    t0 = time.perf_counter()
    step()                       # first call at this shape: compilation / autotuning
    first_call = time.perf_counter() - t0
    if cfg["impl"].startswith("sdpa"):
        pairs = b * h * s * (s + 1) // 2
    else:
        pairs = attended_pairs(q.detach(), k.detach(), cfg["chunk_size"], cfg["topk"])

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_bytes(step)
    times = []
    for _ in range(cfg["reps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    flops = 4 * d * pairs * (3.5 if backward else 1.0)   # fwd: QK^T and PV; bwd counted as 2.5x fwd
    return dict(ms=ms, peak_mem_mib=peak / 2**20, attended_pairs=pairs, tflops=flops / (ms * 1e-3) / 1e12,
                first_call_s=first_call)


def measure(cfg: dict, timeout: float = None) -> dict:
    """One measurement in a fresh subprocess (its peak memory is its own); an error row on failure or timeout."""
    try:
        proc = subprocess.run([sys.executable, "-m", "moba_kernels.bench", "--worker", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout: more than {timeout:g} s")
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(device: str) -> dict:
    import torch
    env = dict(torch=torch.__version__, python=platform.python_version(), device=device,
               host=platform.node(), cpu=platform.processor() or platform.machine(),
               threads=torch.get_num_threads())
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    env["commit"], env["dirty"] = _git_state()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _git_state():
    """(commit, whether the tracked files differ from it) of the checkout this file is in; (None, None)
    outside a git checkout (an installed wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, dirty


def add_ratios(rows: list) -> list:
    """Speedups and memory ratios against the SDPA baseline and the reference rows of the same run
    (in place; idempotent, so partial writes can call it after every measurement)."""
    for r in rows:   # ratios against the SDPA baseline of the same run, shape and mode
        same = [x for x in rows if x["seqlen"] == r["seqlen"] and x["mode"] == r["mode"] and "ms" in x]
        base = next((x for name in ("sdpa_flash", "sdpa") for x in same if x["impl"] == name), None)
        if base and "ms" in r:
            r["baseline"] = base["impl"]
            r["speedup_vs_sdpa"] = base["ms"] / r["ms"]
            r["mem_vs_sdpa"] = r["peak_mem_mib"] / base["peak_mem_mib"] if base["peak_mem_mib"] > 0 else None
            r["tflops_vs_sdpa"] = r["tflops"] / base["tflops"]
    for r in rows:   # memory against the reference backend, as the foundation issue asks
        ref = next((x for x in rows if x["impl"] == "reference" and x["seqlen"] == r["seqlen"]
                    and x["mode"] == r["mode"] and "ms" in x), None)
        if ref and "ms" in r and ref["peak_mem_mib"] > 0:
            r["mem_vs_reference"] = r["peak_mem_mib"] / ref["peak_mem_mib"]
    return rows


def write_json(path: str, result: dict) -> None:
    """Write through a temporary file and a rename: a kill mid-write never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def _fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if row.get(key) is not None else "-"


def run(args) -> list:
    """The benchmark of tools/bench_attention.py's parsed flags: measure, print the table, write --out;
    returns the rows."""
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seqlens = [int(x) for x in args.seqlens.split(",")]
    impls = args.impls.split(",")
    rows = []
    env, run_args = environment(device), dict(vars(args))
    started = time.time()
    for s in seqlens:
        for mode in args.modes.split(","):
            for impl in impls:
                if impl == "reference" and s > args.reference_max_seqlen:
                    continue
                if impl == "flex" and mode == "fwdbwd" and device == "cpu":
                    continue     # compiled flex_attention has no CPU backward: a forward-only peer there
                cfg = dict(impl=impl, mode=mode, seqlen=s, batch=args.batch, heads=args.heads,
                           kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                           chunk_size=args.chunk_size, topk=args.topk, device=device, reps=args.reps,
                           threads=args.threads)
                rows.append({**cfg, **measure(cfg, args.measure_timeout)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                if args.out:     # a run cut short (a stage's timeout) keeps what it measured so far
                    write_json(args.out, dict(environment=env, args=run_args, rows=add_ratios(rows), complete=False,
                                              wall_s=time.time() - started))
    add_ratios(rows)

    header = (f"{'seqlen':>7} {'mode':>7} {'impl':>10} {'ms':>10} {'TFLOP/s':>8} {'vs sdpa':>8} {'peak MiB':>9} "
              f"{'mem/sdpa':>8} {'mem/ref':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['seqlen']:>7} {r['mode']:>7} {r['impl']:>10}  error: {r['error']}")
            continue
        print(f"{r['seqlen']:>7} {r['mode']:>7} {r['impl']:>10} {r['ms']:>10.1f} {r['tflops']:>8.3f} "
              f"{_fmt(r, 'speedup_vs_sdpa', '>7.2f'):>8} {r['peak_mem_mib']:>9.1f} "
              f"{_fmt(r, 'mem_vs_sdpa', '>7.2f'):>8} {_fmt(r, 'mem_vs_reference', '>7.3f'):>8}")
    if args.out:
        write_json(args.out, dict(environment=env, args=run_args, rows=rows, complete=True,
                                  wall_s=time.time() - started))
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":      # measure()'s worker: python -m moba_kernels.bench --worker CONFIG_JSON
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m moba_kernels.bench --worker CONFIG_JSON (the worker of measure(); "
                 "the benchmark is tools/bench_attention.py)")
    print(json.dumps(run_worker(json.loads(sys.argv[2]))))
