"""The pretraining job on CPU: learning, exact resume, atomic saves, parallel layouts, CLI checks."""
import os

import pytest

import megatron_cases as mc


def _run(argv, **layout):
    return mc.run_distributed(mc.run_pretrain, argv, **layout)


def test_training_reduces_loss_and_dense_equivalence():
    moba = _run(mc.TINY + ["--moba-topk", "4"])[0]            # 64 tokens / chunk 16 = 4 blocks: dense
    full = _run(mc.TINY + ["--attention", "full"])[0]
    assert moba[-1] < moba[0] - 0.1
    for a, b in zip(moba, full):
        assert abs(a - b) / b < 1e-5


def test_resume_is_exact(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    straight = _run(mc.TINY)[0]
    first = _run(mc.TINY + ["--save", ckpt, "--exit-interval", "3"])[0]
    second = _run(mc.TINY + ["--load", ckpt, "--save", ckpt])[0]
    assert len(first) == 3 and len(second) == 3
    assert first + second == straight                      # bit-identical on CPU


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    from megatron_moba.training.checkpointing import read_latest
    ckpt = str(tmp_path / "ckpt")
    _run(mc.TINY + ["--save", ckpt, "--exit-interval", "3"])
    msg = mc.run_distributed(mc.crash_during_save, mc.TINY + ["--load", ckpt, "--save", ckpt])[0]
    assert "disk full" in msg
    assert read_latest(ckpt) == 3
    assert not os.path.exists(os.path.join(ckpt, "iter_0000006"))
    resumed = _run(mc.TINY + ["--load", ckpt])[0]        # the previous checkpoint still loads
    assert len(resumed) == 3


def test_missing_or_corrupted_checkpoint_names_the_path(tmp_path):
    from megatron_moba.training.checkpointing import read_latest
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_latest(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(ValueError, match="latest_checkpointed_iteration.txt is corrupted"):
        read_latest(str(tmp_path))


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory):
    """One single-process step saved; every layout resumes from it (weights, optimizer, schedule, data)."""
    ckpt = str(tmp_path_factory.mktemp("start") / "ckpt")
    _run(mc.TINY + ["--save", ckpt, "--exit-interval", "1"])
    return ckpt, _run(mc.TINY + ["--load", ckpt])[0]


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(cp=2), dict(dp=2)])
def test_resume_at_another_layout_reproduces_single_process(start_checkpoint, layout):
    ckpt, single = start_checkpoint
    argv = mc.TINY + ["--load", ckpt, "--tensor-model-parallel-size", str(layout.get("tp", 1)),
                      "--pipeline-model-parallel-size", str(layout.get("pp", 1)),
                      "--context-parallel-size", str(layout.get("cp", 1))]
    for losses in _run(argv, **layout):
        assert len(losses) == len(single) == 5
        for a, b in zip(losses, single):
            assert abs(a - b) / b < 1e-4, (losses, single)


@pytest.mark.parametrize("extra,text", [
    (["--global-batch-size", "3"], "--global-batch-size (3) must be divisible by --micro-batch-size"),
    (["--max-position-embeddings", "32"], "--seq-length (64) exceeds --max-position-embeddings (32)"),
    (["--data-path", "x"], "give exactly one of --data-path and --mock-data"),
    (["--finetune"], "--finetune needs --load"),
    (["--tensor-model-parallel-size", "2"], "world size (1) is not divisible"),
    (["--attention-dropout", "0.1"], "--attention-dropout must be 0 with --attention moba"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "needs --tokenizer-model"),
    (["--optimizer-impl", "torch", "--use-distributed-optimizer"],
     "--use-distributed-optimizer needs --optimizer-impl megatron"),
    (["--optimizer-impl", "torch", "--overlap-grad-reduce"], "--overlap-grad-reduce needs --optimizer-impl megatron"),
    (["--rope-scaling-factor", "8"], "--rope-scaling-factor needs --use-rope-scaling"),
    (["--use-rope-scaling", "--rope-scaling-factor", "0"], "--rope-scaling-factor must be > 0, got 0.0"),
    (["--use-rope-scaling", "--position-embedding-type", "learned_absolute"],
     "--use-rope-scaling needs --position-embedding-type rope"),
    (["--kv-channels", "0"], "--kv-channels must be >= 1, got 0"),
    (["--num-attention-heads", "6"], "must be divisible by --num-attention-heads (6), or give the head dimension "
                                     "with --kv-channels"),
    (["--num-query-groups", "3"], "--num-query-groups (3) must divide --num-attention-heads (4)"),
])
def test_cli_rejects_contradictions(extra, text, capsys):
    mc.assert_cli_rejects(extra, text, capsys)


def test_training_on_indexed_stdlib_data_reduces_loss(tmp_path):
    """The demo's data path: stdlib sources -> SentencePiece -> .bin/.idx -> GPTDataset -> training."""
    import json

    from megatron_moba.training.preprocess import build_indexed_dataset, stdlib_corpus, train_sentencepiece
    corpus = str(tmp_path / "corpus.jsonl")
    assert stdlib_corpus(corpus, 400_000) > 5
    texts = lambda: (json.loads(line)["text"] for line in open(corpus))
    tok = train_sentencepiece(texts(), str(tmp_path / "spm"), 512)
    stats = build_indexed_dataset(texts(), str(tmp_path / "data"), "SentencePieceTokenizer", tok, progress=False)
    assert stats["tokens"] > 50_000
    argv = [a for a in mc.TINY if a not in ("--mock-data",)]
    argv[argv.index("--vocab-size"):argv.index("--vocab-size") + 2] = []
    argv[argv.index("--train-iters") + 1] = "12"
    losses = _run(argv + ["--data-path", str(tmp_path / "data"), "--split", "90,10,0",
                          "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
                          "--data-cache-path", str(tmp_path / "cache")])[0]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


def test_attended_key_count_matches_the_gate():
    """The FLOP count's MoBA key count against the keys the gate really selects."""
    import torch

    from megatron_moba.training.flops import mean_attended_keys
    from moba_kernels import moba_select_blocks
    s, c = 100, 16
    q, k = torch.randn(1, s, 2, 8), torch.randn(1, s, 2, 8)
    for topk in (1, 3, 7, 20):
        sel = moba_select_blocks(q, k, c, topk)[0, :, 0].long()                  # [s, topk]
        pos = torch.arange(s)[:, None]
        size = torch.clamp(s - sel * c, max=c)
        keys = torch.where(sel == pos // c, pos % c + 1, size)
        counted = torch.where(sel >= 0, keys, 0).sum(1).double().mean().item()
        assert abs(mean_attended_keys(s, c, topk) - counted) < 1e-9
    assert mean_attended_keys(s, c, 20) == mean_attended_keys(s) == (s + 1) / 2


def test_continued_pretraining_from_full_attention_to_longer_moba(tmp_path):
    """The paper's recipe: a full-attention checkpoint, then MoBA at a longer context with a larger
    RoPE base and the last layer kept full (weights only: --finetune)."""
    ckpt = str(tmp_path / "full")
    _run(mc.TINY + ["--attention", "full", "--save", ckpt, "--exit-interval", "4"])
    longer = [a for a in mc.TINY]
    longer[longer.index("--seq-length") + 1] = "128"
    moba = longer + ["--rotary-base", "40000", "--moba-full-attn-layers", "1"]
    losses = _run(moba + ["--load", ckpt, "--finetune", "--save", str(tmp_path / "moba")])[0]
    scratch = _run(moba)[0]
    assert len(losses) == 6                                  # iteration count restarted by --finetune
    assert losses[0] < scratch[0] - 0.2, (losses, scratch)   # starts from the trained weights


@pytest.mark.parametrize("impl", ["torch", "megatron"])
def test_nonfinite_steps_are_skipped_then_stop_the_run(impl):
    msg = mc.run_distributed(mc.run_pretrain_error, mc.TINY + ["--lr", "1e30", "--clip-grad", "0", "--optimizer-impl",
                                                               impl, "--max-nonfinite-steps", "2"])[0]
    assert "2 consecutive non-finite steps (--max-nonfinite-steps 2): stopping" in msg


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    import signal
    import subprocess
    import sys

    from megatron_moba.training.checkpointing import read_latest
    argv = [a for a in mc.TINY]
    argv[argv.index("--train-iters") + 1] = "1000"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_moba.pretrain", *argv, "--save", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    for line in proc.stdout:
        if line.startswith("iteration      3/1000"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert "SIGTERM: stopping at iteration" in rest and "(checkpoint saved)" in rest
    assert 3 <= read_latest(str(tmp_path)) < 1000


def test_document_attention_cu_seqlens_and_training():
    import torch

    from megatron_moba.training.trainer import document_cu_seqlens
    tokens = torch.tensor([[5, 9, 0, 7, 7, 0, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert document_cu_seqlens(tokens, eod=0).tolist() == [0, 3, 6, 8, 9, 16]
    losses = _run(mc.TINY + ["--document-attention"])[0]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_load_equal_to_save_starts_fresh_when_empty(tmp_path):
    """A (re)queued job's first start: --load and --save name the same, still empty, directory."""
    from megatron_moba.training.checkpointing import read_latest
    ckpt = str(tmp_path / "ckpt")
    losses = _run(mc.TINY + ["--load", ckpt, "--save", ckpt, "--exit-interval", "2"])[0]
    assert len(losses) == 2 and read_latest(ckpt) == 2
    assert len(_run(mc.TINY + ["--load", ckpt, "--save", ckpt])[0]) == 4     # and resumes afterwards
