"""Megatron-LM command lines: a Llama 3 8B long-context one parses with the job (plus --attention moba and the
MoBA flags); each Megatron-LM flag is implemented, accepted and logged, or refused naming it."""
import gc
import shlex

import pytest

import megatron_cases as mc
from megatron_moba.training import megatron_lm_flags
from megatron_moba.training.arguments import config_from_args, parse_args

# Megatron-LM's Llama 3 8B flags (its examples/llama scripts), at 128K tokens with TP 8 x CP 8 on 64 GPUs,
# then --attention moba and the MoBA flags.
LLAMA3_8B = """
--use-mcore-models --transformer-impl local
--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
--group-query-attention --num-query-groups 8 --kv-channels 128
--seq-length 131072 --max-position-embeddings 131072
--position-embedding-type rope --rotary-base 500000 --rotary-percent 1.0 --use-rope-scaling
--normalization RMSNorm --norm-epsilon 1e-5 --swiglu --untie-embeddings-and-output-weights --disable-bias-linear
--attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.0134 --make-vocab-size-divisible-by 128
--attention-backend fused --no-masked-softmax-fusion
--tensor-model-parallel-size 8 --context-parallel-size 8 --cp-comm-type a2a --sequence-parallel
--micro-batch-size 1 --global-batch-size 64 --train-iters 1000
--lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.1 --clip-grad 1.0
--adam-beta1 0.9 --adam-beta2 0.95 --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--manual-gc --manual-gc-interval 100
--data-path 0.7 data/web_text_document 0.3 data/books_text_document --split 99,1,0
--tokenizer-type HuggingFaceTokenizer --tokenizer-model meta-llama/Llama-3.1-8B --vocab-size 128256
--log-interval 1 --log-throughput --eval-interval 100 --eval-iters 10
--save ckpt --load ckpt --save-interval 500 --ckpt-format torch_dist --async-save --distributed-timeout-minutes 60
--tensorboard-dir tb
--attention moba --moba-chunk-size 4096 --moba-topk 12 --moba-full-attn-layers 3
"""


def test_llama3_8b_megatron_lm_command_line_parses():
    args = parse_args(shlex.split(LLAMA3_8B), world_size=64, cuda=True)
    assert (args.tensor_model_parallel_size, args.context_parallel_size, args.data_parallel_size) == (8, 8, 1)
    assert (args.num_query_groups, args.kv_channels, args.rotary_base, args.use_rope_scaling) == (8, 128, 500000, True)
    assert (args.optimizer_impl, args.use_distributed_optimizer, args.overlap_grad_reduce) == ("megatron", True, True)
    assert (args.manual_gc, args.manual_gc_interval, args.distributed_timeout_minutes) == (True, 100, 60)
    assert args.async_save and args.overlap_param_gather and args.ckpt_format == "torch_dist"
    assert (args.attention, args.moba_chunk_size, args.moba_topk, args.moba_full_attn_layers) == ("moba", 4096, 12, 3)
    assert (args.transformer_impl, args.attention_backend, args.cp_comm_type) == ("local", "fused", "a2a")
    # on CUDA Megatron-LM's fusions are on unless switched off; those whose kernels are absent are off, said why
    assert "masked_softmax_fusion" not in args.fusions and args.fusions_off["masked_softmax_fusion"] == \
        "--no-masked-softmax-fusion"
    assert {"bias_activation_fusion", "bias_dropout_fusion"} <= set(args.fusions)
    assert args.fusions_off["apply_rope_fusion"] == "needs Transformer Engine"      # --transformer-impl local
    lines = megatron_lm_flags.summary(args)
    for flag in ("--use-mcore-models", "--group-query-attention", "--log-throughput"):
        assert any(line.startswith(f"{flag}: accepted, no effect (") for line in lines), lines
    assert any(line.startswith("kernel fusions: on bias_activation_fusion, bias_dropout_fusion; off") for line in lines)


def test_megatron_lm_flags_reach_the_model_config():
    """--cp-comm-type (full-attention layers under CP) and --attention-backend go to megatron-core's config;
    without CUDA the fusions stay off, whatever the flags were resolved for."""
    from megatron.core.transformer.enums import AttnBackend
    args = parse_args(mc.TINY + ["--context-parallel-size", "2", "--cp-comm-type", "a2a+p2p", "--attention-backend",
                                 "flash", "--swiglu"], world_size=2, cuda=True)
    assert "bias_activation_fusion" in args.fusions
    config = config_from_args(args)
    assert (config.cp_comm_type, config.attention_backend) == ("a2a+p2p", AttnBackend.flash)
    assert not (config.bias_activation_fusion or config.bias_dropout_fusion or config.masked_softmax_fusion)
    cpu = parse_args(mc.TINY + ["--swiglu"], world_size=1, cuda=False)
    assert cpu.fusions == [] and set(cpu.fusions_off.values()) == {"no CUDA"}


@pytest.mark.parametrize("flag", sorted(megatron_lm_flags.REFUSED))
def test_features_the_job_lacks_are_refused_naming_the_flag(flag, capsys):
    mc.assert_cli_rejects([flag], f"error: {flag}: {megatron_lm_flags.REFUSED[flag]} (a Megatron-LM flag this job "
                                  "refuses rather than ignores)", capsys)


@pytest.mark.parametrize("extra,text", [
    (["--async-save"], "--async-save needs --save"),
    (["--overlap-param-gather"], "--overlap-param-gather needs --optimizer-impl megatron with"),
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5: partial rotary embeddings are not implemented"),
    (["--ckpt-format", "torch"], "--ckpt-format torch: the job saves megatron-core dist_checkpointing"),
    (["--make-vocab-size-divisible-by", "64"], "--make-vocab-size-divisible-by 64: the job pads the vocabulary"),
    (["--manual-gc-interval", "10"], "--manual-gc-interval needs --manual-gc"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be >= 1"),
    (["--no-such-megatron-flag"], "unrecognized arguments: --no-such-megatron-flag"),
])
def test_megatron_lm_flags_checked(extra, text, capsys):
    mc.assert_cli_rejects(extra, text, capsys)


def test_distributed_timeout_reaches_the_process_group(monkeypatch):
    import torch.distributed as dist

    from megatron_moba.training import parallel
    seen = {}

    class Stop(Exception):
        pass

    def init(backend, timeout):
        seen["timeout"] = timeout
        raise Stop
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(parallel, "require_cpu_shim", lambda *a: None)
    monkeypatch.setenv("RANK", "0")
    args = parse_args(mc.TINY + ["--distributed-timeout-minutes", "7"], world_size=1)
    with pytest.raises(Stop):
        parallel.initialize_distributed(args)
    assert seen["timeout"].total_seconds() == 7 * 60


def test_manual_gc_collects_only_when_asked():
    """--manual-gc: automatic collection off inside the run and restored after; collections at the interval,
    before evaluations (unless --no-manual-gc-eval) and saves."""
    args = parse_args(mc.TINY + ["--manual-gc", "--manual-gc-interval", "3", "--no-manual-gc-eval"], world_size=1)
    assert gc.isenabled()
    with megatron_lm_flags.ManualGC(args) as m:
        assert not gc.isenabled() and m.collections == 1
        for it in range(1, 10):
            m.step(it)
        assert m.collections == 1 + 3
        m.before_eval()
        assert m.collections == 4
        m.before_save()
        assert m.collections == 5
    assert gc.isenabled()
    with megatron_lm_flags.ManualGC(parse_args(mc.TINY, world_size=1)) as off:
        assert gc.isenabled()
        off.step(3)
        off.before_save()
        assert off.collections == 0


def test_async_save_publishes_checkpoints_that_resume_exactly(tmp_path):
    """--async-save: megatron-core's background writer; the checkpoints (iterations 2 and 3, the last published
    before the job exits) are published, and the last resumes to the losses of an uninterrupted run, bit for
    bit."""
    import os

    from megatron_moba.training.checkpointing import checkpoint_dir, read_latest
    ckpt = str(tmp_path / "ckpt")
    straight = mc.run_distributed(mc.run_pretrain, mc.TINY)[0]
    first = mc.run_distributed(mc.run_pretrain, mc.TINY + ["--async-save", "--save", ckpt, "--save-interval", "2",
                                                           "--exit-interval", "3"])[0]
    assert read_latest(ckpt) == 3 and os.path.isdir(checkpoint_dir(ckpt, 2))
    assert not [d for d in os.listdir(ckpt) if d.endswith(".tmp")]
    second = mc.run_distributed(mc.run_pretrain, mc.TINY + ["--load", ckpt])[0]
    assert first + second == straight


def test_overlap_param_gather_trains_and_resumes_like_the_synchronous_gather(tmp_path):
    """--overlap-param-gather (megatron-core DDP's forward pre-hooks gather the parameters the next forward
    uses): the same losses as the synchronous all-gather after each step, bit for bit, and a checkpoint saved
    mid-run (parameters gathered first) resumes exactly."""
    ckpt = str(tmp_path / "ckpt")
    flags = mc.TINY + ["--optimizer-impl", "megatron", "--overlap-grad-reduce"]
    straight = mc.run_distributed(mc.run_pretrain, flags, dp=2)[0]
    overlap = flags + ["--overlap-param-gather"]
    first = mc.run_distributed(mc.run_pretrain, overlap + ["--save", ckpt, "--exit-interval", "3"], dp=2)[0]
    second = mc.run_distributed(mc.run_pretrain, overlap + ["--load", ckpt], dp=2)[0]
    assert first + second == straight
