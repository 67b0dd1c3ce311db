"""megatron-core's DDP + optimizer (``--optimizer-impl megatron``, the default on CUDA), run on
CPU through ``training.compat.apply_cpu_optimizer_shim``: it trains exactly like torch AdamW at every
layout, its (distributed) optimizer state resumes exactly and reshards, and --bf16 keeps fp32
main weights."""
import pytest

import megatron_cases as mc

MEGATRON = mc.TINY + ["--optimizer-impl", "megatron"]


def _run(argv, **layout):
    return mc.run_distributed(mc.run_pretrain, argv, **layout)


def _layout_flags(layout):
    flags = ["--tensor-model-parallel-size", str(layout.get("tp", 1)),
             "--pipeline-model-parallel-size", str(layout.get("pp", 1))]
    return flags + (["--sequence-parallel"] if layout.get("tp", 1) > 1 else [])


@pytest.fixture(scope="module")
def torch_adamw_losses():
    return _run(mc.TINY)[0]


@pytest.mark.parametrize("layout,extra", [
    (dict(), []),
    (dict(dp=2), ["--overlap-grad-reduce"]),                     # reduce-scatter overlapped, sharded Adam
    (dict(dp=2), ["--no-use-distributed-optimizer"]),            # plain megatron optimizer over DDP
    (dict(tp=2), []),                                            # + sequence parallel norm grads
    (dict(pp=2), []),                                            # (stages seed their weights apart)
])
def test_megatron_optimizer_trains_like_torch_adamw(torch_adamw_losses, layout, extra):
    reference = _run(mc.TINY + _layout_flags(layout), **layout)[0] if "pp" in layout else torch_adamw_losses
    for losses in _run(MEGATRON + _layout_flags(layout) + extra, **layout):
        assert len(losses) == len(reference) == 6
        for a, b in zip(losses, reference):
            assert abs(a - b) / b < 1e-5, (losses, reference)


def test_distributed_optimizer_resume_is_exact_and_reshards(tmp_path):
    per_shard, per_param = str(tmp_path / "per_shard"), str(tmp_path / "per_param")
    straight = _run(MEGATRON, dp=2)[0]
    first = _run(MEGATRON + ["--save", per_shard, "--exit-interval", "3"], dp=2)[0]
    second = _run(MEGATRON + ["--load", per_shard], dp=2)[0]
    assert first + second == straight                          # sharded Adam states saved and restored

    def close_to_straight(losses):
        assert len(losses) == 3 and all(abs(a - b) / b < 1e-5 for a, b in zip(losses, straight[3:])), losses
    close_to_straight(_run(MEGATRON + ["--load", per_shard])[0])                 # DP=2 -> DP=1
    tp2 = MEGATRON + _layout_flags(dict(tp=2))
    msg = mc.run_distributed(mc.run_pretrain_error, tp2 + ["--load", per_shard], "ValueError", tp=2)[0]
    assert "saved at --tensor-model-parallel-size 1" in msg and "--dist-ckpt-optim-fully-reshardable" in msg
    _run(MEGATRON + ["--save", per_param, "--exit-interval", "3", "--dist-ckpt-optim-fully-reshardable"], dp=2)
    for losses in _run(tp2 + ["--load", per_param], tp=2):                    # DP=2 -> TP=2
        close_to_straight(losses)


def test_bf16_weights_with_fp32_main_weights_resume_exactly(tmp_path):
    """megatron's Float16 optimizer (not distributed): bf16 model weights, fp32 main weights."""
    ckpt, bf16 = str(tmp_path / "ckpt"), MEGATRON + ["--bf16", "--no-use-distributed-optimizer"]
    model_dtypes, main_dtypes, straight = mc.run_distributed(mc.trainer_dtypes, bf16)[0]
    assert model_dtypes == ["torch.bfloat16"] and main_dtypes == ["torch.float32"]
    assert straight[-1] < straight[0] - 0.1
    first = _run(bf16 + ["--save", ckpt, "--exit-interval", "3"])[0]
    second = _run(bf16 + ["--load", ckpt])[0]
    assert first + second == straight           # fp32 masters come back from the checkpoint, not the bf16 weights


def test_torch_path_keeps_fp32_weights_under_bf16():
    model_dtypes, main_dtypes, _ = mc.run_distributed(mc.trainer_dtypes, mc.TINY + ["--bf16"])[0]
    assert model_dtypes == main_dtypes == ["torch.float32"]


def test_optimizer_state_of_the_other_impl_is_a_clear_error(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _run(mc.TINY + ["--save", ckpt, "--exit-interval", "2"])
    msg = mc.run_distributed(mc.run_pretrain_error, MEGATRON + ["--load", ckpt], "ValueError")[0]
    assert "holds the optimizer state of --optimizer-impl torch" in msg and ckpt in msg
    assert len(_run(MEGATRON + ["--load", ckpt, "--no-load-optim"])[0]) == 4     # weights, schedule, data carry over


def test_optimizer_defaults_follow_cuda(monkeypatch):
    import torch

    from megatron_moba.training.arguments import parse_args
    cpu = parse_args(mc.TINY, world_size=1)
    assert (cpu.optimizer_impl, cpu.use_distributed_optimizer, cpu.overlap_grad_reduce) == ("torch", False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = parse_args(mc.TINY, world_size=1)
    assert (gpu.optimizer_impl, gpu.use_distributed_optimizer, gpu.overlap_grad_reduce) == ("megatron", True, True)
    plain = parse_args(mc.TINY + ["--no-use-distributed-optimizer", "--no-overlap-grad-reduce"], world_size=1)
    assert (plain.use_distributed_optimizer, plain.overlap_grad_reduce) == (False, False)
