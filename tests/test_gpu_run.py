"""benchmarks/gpu_run.sh's stage runner (with a stand-in python: no GPU needed) and
tools/bench_attention.py's JSON after every measurement (moba_kernels.bench), which a stage cut by its
timeout keeps."""
import json
import os
import runpy
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")

# Stands in for python: answers the GPU query, logs every other call, writes the --out JSON of a
# benchmark and sleeps where the test asks (SLOW: a pattern of the command line).
FAKE_PYTHON = r"""#!/usr/bin/env bash
if [ "$1" = -c ]; then
    case "$2" in *get_device_name*) echo fakegpu ;; esac
    exit 0
fi
echo "$*" >> "$FAKE_LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
[ -n "$out" ] && echo '{"rows": []}' > "$out"
case "$*" in *"$SLOW"*) sleep 30 ;; esac
exit 0
"""


def _run(tmp_path, stages, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    e = dict(os.environ, PYTHON=str(fake), OUT=str(out), FAKE_LOG=str(tmp_path / "log"), SLOW="no-such-call",
             MIN_STAGE_S="1")
    e.update(env)
    t0 = time.monotonic()
    r = subprocess.run(["bash", SCRIPT, *stages], capture_output=True, text=True, env=e, cwd=str(tmp_path),
                       timeout=120)
    summary = out / "gpu_run_fakegpu.json"
    result = json.loads(summary.read_text()) if summary.exists() else None
    log = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
    return r, result, log, time.monotonic() - t0


@pytest.mark.skipif(subprocess.run(["which", "timeout"], capture_output=True).returncode, reason="no timeout(1)")
def test_stages_run_in_order_under_their_timeout_and_report_after_each(tmp_path):
    r, result, log, wall = _run(tmp_path, ["test", "32k", "128k", "64k"], STAGE_TIMEOUT_S="3", SLOW="131072")
    assert r.returncode == 1, r.stderr                        # a stage timed out
    assert [(s["stage"], s["status"]) for s in result["stages"]] == [
        ("test", "ok"), ("32k", "ok"), ("128k", "timeout"), ("64k", "ok")]
    assert result["stages"][2]["exit_code"] == 124 and result["stages"][2]["seconds"] <= 5
    assert wall < 25                                          # the 30 s sleep was cut, the run went on
    assert "pytest" in log[0] and "tests/kernels/test_triton_backend.py" in log[0]
    assert all("--seqlens 32768" in x and "--measure-timeout" in x for x in log[1:3])
    assert "--seqlens 65536" in log[-1]
    outs = sorted(os.listdir(tmp_path / "out"))
    assert "bench_attention_fakegpu_bf16_c512k3_32k_kv4.json" in outs
    assert "bench_attention_fakegpu_bf16_c512k3_128k.json" in outs   # written before the stage was cut


def test_budget_skips_what_no_longer_fits(tmp_path):
    r, result, log, _ = _run(tmp_path, ["128k", "64k", "1m"], STAGE_TIMEOUT_S="60", BUDGET_S="3", SLOW="131072")
    assert [s["status"] for s in result["stages"]] == ["timeout", "skipped", "skipped"]
    assert result["stages"][0]["seconds"] <= 5 and len(log) == 1


def test_default_order_puts_kernel_tests_and_32k_first(tmp_path):
    r, result, log, _ = _run(tmp_path, [], BUDGET_S="200")
    assert r.returncode == 0, r.stderr
    stages = [s["stage"] for s in result["stages"]]
    assert stages[:2] == ["test", "32k"] and stages[-1] == "aot"
    assert all(s["status"] == "ok" for s in result["stages"])
    train = [x for x in log if "bench_training.py" in x]
    assert [x.split("--variants ")[1].split()[0] for x in train] == ["moba", "full"]


def test_unknown_stage_runs_nothing(tmp_path):
    r, result, log, _ = _run(tmp_path, ["test", "warp"])
    assert r.returncode == 2 and "unknown stage warp" in r.stderr and log == [] and result is None


def test_bench_attention_writes_json_after_every_measurement(tmp_path, monkeypatch):
    """The tool's command line, run in-process with moba_kernels.bench.measure stood in for."""
    from moba_kernels import bench
    out = tmp_path / "b.json"
    seen = []

    def measure(cfg, timeout=None):
        if seen:   # the file already holds every earlier row, ratios included
            rows = json.loads(out.read_text())["rows"]
            assert [x["impl"] for x in rows] == [x["impl"] for x in seen]
            assert json.loads(out.read_text())["complete"] is False
            assert all("speedup_vs_sdpa" in x for x in rows)
        if cfg["impl"] == "reference":
            raise KeyboardInterrupt       # the run is cut here, as a stage's timeout would
        row = dict(ms=10.0 if cfg["impl"] == "sdpa" else 4.0, peak_mem_mib=1.0, tflops=1.0)
        seen.append(dict(cfg))
        return row

    monkeypatch.setattr(bench, "measure", measure)
    tool = os.path.join(ROOT, "tools", "bench_attention.py")
    monkeypatch.setattr(sys, "argv", [tool, "--seqlens", "256", "--impls", "sdpa,torch,reference", "--modes", "fwd",
                                      "--device", "cpu", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        runpy.run_path(tool, run_name="__main__")
    result = json.loads(out.read_text())
    assert result["complete"] is False and [r["impl"] for r in result["rows"]] == ["sdpa", "torch"]
    assert result["rows"][1]["speedup_vs_sdpa"] == pytest.approx(2.5)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_bench_attention_measure_timeout_is_an_error_row():
    from moba_kernels import bench
    cfg = dict(impl="sdpa", mode="fwd", seqlen=64, batch=1, heads=1, kv_heads=1, head_dim=16, dtype="fp32",
               chunk_size=16, topk=2, device="cpu", reps=1, threads=1)
    t0 = time.monotonic()
    row = bench.measure(cfg, timeout=0.5)      # the worker cannot even import torch that fast
    assert row == {"error": "timeout: more than 0.5 s"} and time.monotonic() - t0 < 10
