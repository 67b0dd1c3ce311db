"""The benchmark scripts run end to end on tiny shapes and report consistent figures."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository


def _run(script, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", script), *args], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_bench_attention_table_and_json(tmp_path):
    out = tmp_path / "b.json"
    text = _run("bench_attention.py", "--seqlens", "256", "--chunk-size", "64", "--topk", "2", "--heads", "2",
                "--head-dim", "16", "--impls", "sdpa,torch,flex", "--modes", "fwd,fwdbwd", "--reps", "1",
                "--out", str(out))
    result = json.loads(out.read_text())
    # compiled flex_attention has no CPU backward: a forward-only peer there
    assert sorted((r["impl"], r["mode"]) for r in result["rows"]) == sorted(
        [(i, "fwd") for i in ("sdpa", "torch", "flex")] + [("sdpa", "fwdbwd"), ("torch", "fwdbwd")])
    assert all(r["mem_vs_sdpa"] > 0 for r in result["rows"]) and "mem/sdpa" in text
    rows = {r["impl"]: r for r in result["rows"] if r["mode"] == "fwd"}
    assert set(rows) == {"sdpa", "torch", "flex"} and "seqlen" in text
    assert result["environment"]["torch"] == __import__("torch").__version__
    # dense causal counts every (query, key <= query) pair; MoBA counts fewer, the same for torch and flex
    assert rows["sdpa"]["attended_pairs"] == 2 * 256 * 257 // 2
    assert rows["torch"]["attended_pairs"] == rows["flex"]["attended_pairs"] < rows["sdpa"]["attended_pairs"]
    for r in rows.values():
        assert r["baseline"] == "sdpa"
        assert abs(r["speedup_vs_sdpa"] - rows["sdpa"]["ms"] / r["ms"]) < 1e-9


def test_bench_training_reports_both_variants(tmp_path):
    out = tmp_path / "t.json"
    text = _run("bench_training.py", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
                "--num-attention-heads", "2", "--num-query-groups", "1", "--seq-length", "128",
                "--moba-chunk-size", "32", "--iters", "3", "--warmup", "1", "--out", str(out))
    result = json.loads(out.read_text())
    by = {r["variant"]: r for r in result["results"]}
    assert set(by) == {"full", "moba"} and all("error" not in r for r in by.values()), by
    assert all(r["iterations"] == 2 and r["tokens_per_s"] > 0 for r in by.values())
    assert abs(result["moba_over_full_step_time"] - by["moba"]["step_time_s"] / by["full"]["step_time_s"]) < 1e-12
    assert "MoBA step time / full attention step time" in text


def test_flex_baseline_computes_the_same_moba_attention():
    """The flex_attention baseline attends exactly MoBA's selection (both block-mask builds)."""
    import torch

    from moba_kernels import moba_attn
    from moba_kernels.bench import flex_moba
    g = torch.Generator().manual_seed(0)
    for seqlen, chunk in ((512, 128), (256, 64)):          # BlockMask from the selection / create_block_mask
        # MHA, seqlen % 128 == 0: what CPU inductor compiles
        q, k, v = (torch.randn(1, seqlen, 2, 32, generator=g) for _ in range(3))
        out = flex_moba(q, k, v, chunk, 2)()
        assert (out - moba_attn(q, k, v, chunk, 2, backend="reference")).abs().max() < 1e-5
