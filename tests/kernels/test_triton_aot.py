"""Ahead-of-time compiles of the ``triton`` backend's kernels for sm_80 and sm_90 (no GPU needed).

One child process (without TRITON_INTERPRET, which conftest sets on CPU) runs
tools/triton_aot_report.py on a representative subset: every kernel at its fixed launch config,
bf16, head dims 64, 128 and 256, both targets, plus for each tuned kernel the kept autotune config
nearest the shared-memory limit.  The full grid (fp16 too, every autotune config) is
benchmarks/results/triton_aot_report.json, checked here against the shared-memory estimate.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")
from moba_kernels.triton_backend import aot, tuning

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
TOOL = os.path.join(ROOT, "tools", "triton_aot_report.py")
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "triton_aot_report.json")
KERNELS = {"_block_mean_kernel", "_gate_topk_kernel", "_own_fwd_kernel", "_past_fwd_kernel", "_dkdv_kernel",
           "_own_dq_kernel", "_past_dq_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    cmd = [sys.executable, TOOL, "--dtypes", "bf16", "--dims", "64,128,256", "--topk", "3,17", "--tuned", "largest",
           "--jobs", "2", "--json", str(out)]
    proc = subprocess.run(cmd, env=aot.child_env(), capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f), proc


def _estimate(r):
    kind = "dkdv" if r["kernel"] == "_dkdv_kernel" else "dq" if r["kernel"].endswith("_dq_kernel") else "fwd"
    m = r["meta"]
    return tuning.smem_bytes(kind, m["D"], m["BLOCK_M"], m["BLOCK_N"], r["num_stages"], 2, bool(m.get("ATOMIC_DQ")))


def test_every_kernel_compiles_for_sm80_and_sm90(report):
    doc, proc = report
    results = doc["results"]
    failed = [(r["kernel"], r["arch"], r["D"], r["config"], r["error"]) for r in results if not r["ok"]]
    assert not failed, failed
    assert {r["kernel"] for r in results} == KERNELS == set(aot.kernels())
    assert {(r["arch"], r["D"]) for r in results} == {(a, d) for a in (80, 90) for d in (64, 128, 256)}
    assert all(r["registers"] > 0 and r["shared"] > 0 for r in results if r["kernel"] != "_block_mean_kernel")
    assert doc["targets"]["sm_80"]["smem_limit"] == 166_912 and doc["targets"]["sm_90"]["smem_limit"] == 232_448
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_default_configs_spill_nothing(report):
    over = [(r["kernel"], r["arch"], r["D"], r["config"], r["spill"]) for r in report[0]["results"]
            if r["config"].startswith("default") and r["spill"] > aot.SPILL_BUDGET[r["kernel"]]]
    assert not over, over


def test_kept_tuning_configs_fit_the_targets_shared_memory(report):
    tuned = [r for r in report[0]["results"] if r["config"].startswith("tune")]
    assert len(tuned) == 2 * 3 * 6 and all(r["kept"] for r in tuned)     # archs x dims x (4 + dkdv twice)
    for r in tuned:
        assert r["shared"] <= r["smem_limit"], r
        assert r["shared"] <= _estimate(r), r                              # the estimate is an upper bound


def test_committed_report_agrees_with_the_pruning():
    """The full grid (every autotune config, fp16 and bf16, head dims 64-256): each config the
    pruning keeps fits, each measured size is within the estimate that decides the pruning."""
    with open(COMMITTED) as f:
        doc = json.load(f)
    results = doc["results"]
    assert {r["kernel"] for r in results} == KERNELS and all(r["ok"] for r in results)
    tuned = [r for r in results if r["config"].startswith("tune")]
    assert len(tuned) > 100
    for r in tuned:
        assert r["shared"] <= _estimate(r), r
        assert r["kept"] == (_estimate(r) <= doc["targets"][f"sm_{r['arch']}"]["smem_limit"]), r
        assert not r["kept"] or r["shared"] <= r["smem_limit"], r
    assert any(not r["kept"] for r in tuned)                               # the space does need pruning


def test_pruning_drops_configs_over_the_limit_and_keeps_one():
    space = {(n, D): aot.tuning_space(n, D) for n in aot.TUNED for D in (64, 128, 256)}
    # own dQ at head dim 128, 128 keys per step, 8 warps / 3 stages: 180,224 B compiled for sm_80
    big = [kept for meta, w, s, kept in space["_own_dq_kernel", 128] if meta["BLOCK_N"] == 128 and s == 3]
    assert big == [{80: False, 90: True}]
    assert all(any(c[3][a] for c in cs) for cs in space.values() for a in aot.ARCHS)
    configs = tuning.configs(True)
    kept = tuning.prune(configs, "dq", 166_912, D=128, BLOCK_M=64)
    assert len(kept) == 5 and all(tuning.smem_bytes("dq", 128, 64, c.kwargs["BLOCK_N"], c.num_stages) <= 166_912
                                  for c in kept)
    assert len(tuning.prune(configs, "dq", 1000, D=128, BLOCK_M=64)) == 1       # never empty


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size\n"
           "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized\n")
    got = aot.parse_ptxas_log(log)
    assert got["registers"] == 255 and got["spill_stores"] == 12 and got["spill_loads"] == 20
    assert len(got["warnings"]) == 1 and got["warnings"][0].startswith("(C7515)")


def test_autotuner_hook_prunes_by_the_devices_shared_memory(monkeypatch):
    """The hook triton.autotune calls with the launch's arguments (a 163 KiB GPU: sm_80)."""
    import torch
    monkeypatch.setattr(tuning, "_device_smem", lambda: 166_912)
    early = tuning._early_prune("dq")
    q = torch.empty(1, 1, 128, dtype=torch.bfloat16)
    kept = early(tuning.configs(True), {"Q": q}, D=128, BLOCK_M=64, IEEE=False)
    assert {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == {
        (32, 4, 2), (32, 8, 3), (64, 4, 2), (64, 8, 3), (128, 4, 2)}
    dkdv = tuning._early_prune("dkdv")
    space = tuning.configs(False, "dkdv")
    kept = dkdv(space, {"Q": q.float()}, D=128, BLOCK_M=32, BLOCK_N=64, ATOMIC_DQ=True)
    assert [c.num_stages for c in kept] == [1, 2]              # fp32, 3 stages: 196,608 B > 166,912 B
    kept = dkdv(space, {"Q": q.float()}, D=256, BLOCK_M=32, BLOCK_N=32, ATOMIC_DQ=True)
    assert [c.num_stages for c in kept] == [1]                 # none fits: the smallest one
