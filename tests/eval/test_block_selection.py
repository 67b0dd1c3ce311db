"""Block-selection maps and kept attention mass (megatron_moba.eval.block_selection, tools/plot_block_selection.py)
against brute-force loops; captured q/k/v reproduce the layer's attention; the tool end to end; clear errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import megatron_cases as mc
from helpers import tool_exit_code
from megatron_moba.eval import block_selection as bs
from megatron_moba.training.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository


def _qk(seqlen, hq=4, hkv=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(seqlen, hq, dim, generator=g), torch.randn(seqlen, hkv, dim, generator=g)


def _brute_gate(q, k, chunk, topk):
    """{(t, h): sorted blocks}: own block plus the topk-1 best earlier blocks by q . mean(block keys), in float64."""
    q, k = q.double(), k.double()
    seqlen, hq, _ = q.shape
    group = hq // k.shape[1]
    chosen = {}
    for h in range(hq):
        means = [k[j * chunk:(j + 1) * chunk, h // group].mean(0) for j in range(-(-seqlen // chunk))]
        for t in range(seqlen):
            own = t // chunk
            earlier = sorted(range(own), key=lambda j: -float(q[t, h] @ means[j]))
            chosen[(t, h)] = sorted(earlier[:topk - 1] + [own])
    return chosen


def _brute_kept(q, k, chosen, chunk, scale):
    """[S, Hq] float64: per query, full causal softmax probability summed over keys of its chosen blocks."""
    q, k = q.double(), k.double()
    seqlen, hq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(seqlen, hq, dtype=torch.float64)
    for t in range(seqlen):
        for h in range(hq):
            w = torch.softmax(torch.stack([q[t, h] @ k[s, h // group] for s in range(t + 1)]) * scale, 0)
            out[t, h] = sum(w[s] for s in range(t + 1) if s // chunk in chosen[(t, h)])
    return out


def test_kept_mass_is_exactly_one_when_topk_covers_every_block():
    q, k = _qk(50)                                   # chunk 8: 7 blocks, the last one short
    for topk in (7, 9):
        kept = bs.kept_mass(q, k, bs.select(q, k, 8, topk), 8)
        assert torch.equal(kept, torch.ones(50, 4))
        summary = bs.summarize(kept, 8, topk)
        assert summary["overall"] == 1.0 and summary["queries_with_a_choice"]["queries"] == 0


@pytest.mark.parametrize("chunk,topk,scale", [(8, 2, None), (8, 3, 0.7), (5, 4, None)])
def test_kept_mass_matches_brute_force(chunk, topk, scale):
    q, k = _qk(45, seed=chunk + topk)
    sel = bs.select(q, k, chunk, topk)
    kept = bs.kept_mass(q, k, sel, chunk, scale)
    expected = _brute_kept(q, k, _brute_gate(q, k, chunk, topk), chunk, scale or 1 / math.sqrt(q.shape[-1]))
    assert (kept.double() - expected).abs().max() < 1e-5
    assert (expected < 0.999).any()                  # something is left out: not a trivial case
    summary = bs.summarize(kept, chunk, topk)
    choosing = torch.arange(45) // chunk >= topk
    assert abs(summary["overall"] - expected.mean().item()) < 1e-5
    assert all(abs(a - b) < 1e-5 for a, b in zip(summary["per_head"], expected.mean(0).tolist()))
    assert abs(summary["queries_with_a_choice"]["overall"] - expected[choosing].mean().item()) < 1e-5
    assert summary["queries_with_a_choice"]["queries"] == int(choosing.sum())


def test_selection_map_matches_brute_force_gate():
    chunk, topk, seqlen = 6, 3, 40                  # 7 blocks, the last one short
    q, k = _qk(seqlen, hq=6, hkv=2, seed=5)
    sel = bs.select(q, k, chunk, topk)
    chosen = _brute_gate(q, k, chunk, topk)
    for h in range(6):
        grid = bs.selection_map(sel[:, h], chunk)
        assert grid.shape == (seqlen, 7)
        for t in range(seqlen):
            own = t // chunk
            want = [bs.FUTURE if j > own else bs.OWN if j == own else bs.SELECTED if j in chosen[(t, h)]
                    else bs.SKIPPED for j in range(7)]
            assert grid[t].tolist() == want, (t, h)
        share = bs.block_map(grid, chunk)
        for qb in range(7):
            rows = range(qb * chunk, min(seqlen, (qb + 1) * chunk))
            for kb in range(7):
                if kb > qb:
                    assert math.isnan(share[qb, kb])
                else:
                    n = sum(kb in chosen[(t, h)] for t in rows)
                    assert abs(share[qb, kb].item() - n / len(rows)) < 1e-6


def test_input_tokens(tmp_path):
    from megatron_moba.training.preprocess import build_indexed_dataset
    tok = build_tokenizer("NullTokenizer", vocab_size=50)
    build_indexed_dataset(["1 2 3", "4 5 6 7 8 9", "10"], str(tmp_path / "d"), "NullTokenizer", vocab_size=50,
                          progress=False)
    tokens, what = bs.input_tokens(tok, 4, data_path=str(tmp_path / "d"), doc=1)
    assert tokens.tolist() == [4, 5, 6, 7] and what == f"document 1 of {tmp_path / 'd'}"
    (tmp_path / "t.txt").write_text("3 1 4 1 5")
    assert bs.input_tokens(tok, 64, text_file=str(tmp_path / "t.txt"))[0].tolist() == [3, 1, 4, 1, 5]
    noise = bs.input_tokens(tok, 64, seed=3)[0]
    assert noise.shape == (64,) and 0 <= int(noise.min()) and int(noise.max()) < 50    # never the EOD id (50)
    for kwargs, text in [(dict(data_path=str(tmp_path / "d"), doc=3), "--doc 3 is out of range: .* has 3 documents"),
                         (dict(data_path=str(tmp_path / "nope")), "--data-path .*nope.bin/.idx not found"),
                         (dict(text_file=str(tmp_path / "nope.txt")), "--text-file .* does not exist")]:
        with pytest.raises(ValueError, match=text):
            bs.input_tokens(tok, 64, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tiny GQA model (4 heads, 2 groups), MoBA chunk 16 top-2, layer 2 of 2 full attention."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    return path, mc.run_distributed(_train_and_capture, mc.TINY + ["--save", path, "--moba-full-attn-layers", "1"])[0]


def _train_and_capture(argv):
    """Train and save; then, for each layer, what the tool captures and the layer's attention recomputed
    from it with the reference backend (MoBA for layer 1, dense causal for the full layer 2)."""
    from megatron_moba.eval.checkpoint import load_for_eval
    from moba_kernels import moba_attn
    mc.run_pretrain(argv)
    model, args, tok = load_for_eval(argv[argv.index("--save") + 1])
    tokens = torch.randint(0, 200, (64,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(tokens[None], torch.arange(64)[None], attention_mask=None)
    out = {}
    for layer, (chunk, topk) in ((1, (16, 2)), (2, (64, 1))):
        cap = bs.capture_qkv(model, layer, tokens)
        ref = moba_attn(cap.q[None], cap.k[None], cap.v[None], chunk, topk, cap.softmax_scale, backend="reference")
        out[layer] = dict(q=cap.q, k=cap.k, out=cap.out, ref=ref[0].reshape(64, -1), scale=cap.softmax_scale)
    with torch.no_grad():
        out["unchanged"] = torch.equal(plain, model(tokens[None], torch.arange(64)[None], attention_mask=None))
    return out


def test_captured_qkv_is_what_the_layer_attends(checkpoint):
    _, got = checkpoint
    for layer in (1, 2):
        c = got[layer]
        assert c["q"].shape == (64, 4, 16) and c["k"].shape == (64, 2, 16) and c["out"].shape == (64, 64)
        assert (c["out"] - c["ref"]).abs().max() < 1e-5
        assert c["scale"] == pytest.approx(1 / 4)
    assert got["unchanged"]                           # the hook does not alter the forward
    # the trained layer-1 gate leaves something out, and kept mass follows the brute force on real q/k
    q, k = got[1]["q"], got[1]["k"]
    kept = bs.kept_mass(q, k, bs.select(q, k, 16, 2), 16, got[1]["scale"])
    expected = _brute_kept(q, k, _brute_gate(q, k, 16, 2), 16, got[1]["scale"])
    assert (kept.double() - expected).abs().max() < 1e-5 and expected.min() < 0.99


def test_tool_end_to_end(checkpoint, tmp_path):
    path, got = checkpoint
    tool = os.path.join(ROOT, "tools", "plot_block_selection.py")
    for layer, head, extra in ((1, 3, []), (2, 0, ["--topk", "4"])):
        run = subprocess.run([sys.executable, tool, "--load", path, "--layer", str(layer), "--head", str(head),
                              "--out", str(tmp_path), *extra], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        stem = tmp_path / f"block_selection_layer{layer}_head{head}"
        assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert stem.with_suffix(".png").stat().st_size > 20_000
        result = json.load(open(stem.with_suffix(".json")))
        assert result["kv_head"] == head // 2 and result["tokens"] == 64 and result["blocks"] == 4
        assert len(result["kept_mass"]["per_head"]) == 4
        if layer == 1:
            assert result["layer_attention"] == "moba" and (result["chunk_size"], result["topk"]) == (16, 2)
            assert 0 < result["kept_mass"]["overall"] < 1
            assert "queries past the first 2 blocks (32)" in run.stdout
        else:                                         # the full layer, top-4 of 4 blocks: nothing left out
            assert result["layer_attention"] == "full" and result["topk"] == 4
            assert result["kept_mass"]["overall"] == 1.0 and result["kept_mass"]["per_head"] == [1.0] * 4


def test_tool_errors_name_the_flag(checkpoint, tmp_path, capsys, monkeypatch):
    path, _ = checkpoint
    missing = str(tmp_path / "nothing")
    cases = [(["--load", missing, "--layer", "1"], f"--load {missing}: checkpoint directory"),
             (["--load", path, "--layer", "3"], "--layer 3 is out of range: the checkpoint has layers 1..2"),
             (["--load", path, "--layer", "0"], "--layer 0 is out of range"),
             (["--load", path, "--layer", "1", "--head", "4"],
              "--head 4 is out of range: the checkpoint has heads 0..3"),
             (["--load", path, "--layer", "1", "--topk", "0"], "--topk must be >= 1")]
    for argv, text in cases:
        assert tool_exit_code(monkeypatch, "plot_block_selection.py", *argv, "--out", str(tmp_path)) == 2, argv
        assert text in capsys.readouterr().err

