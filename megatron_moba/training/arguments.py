"""Command line of the pretraining job, with Megatron-LM's flag names.

    python -m megatron_moba.pretrain --help
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, List, NoReturn, Optional

# no torch/megatron imports at module level: `--help` answers before any heavy import
if TYPE_CHECKING:
    from megatron_moba.core.config import MoBATransformerConfig

PROG = "moba-pretrain"
# a rank other than 0 that fails on a user error waits this long before exiting: see exit_with_error
OTHER_RANKS_WAIT_S = 2.0


def process_rank() -> int:
    """This process's global rank: torch.distributed's once initialized, else torchrun's ``RANK``
    (0 without one).  Imports nothing."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def exit_with_error(message: str, prog: str = PROG) -> NoReturn:
    """End the job on an error in what the user asked for, as argparse does: ``<prog>: error: <message>``
    on stderr, exit status 2, no traceback.

    Under torchrun every rank runs the same checks and fails the same way, so only rank 0 prints.  The
    other ranks wait ``OTHER_RANKS_WAIT_S`` before exiting: torchrun stops the whole job (SIGTERM) once
    the first rank exits, and that must not happen before rank 0's message is out.  A SIGTERM in that
    wait exits with status 2 too."""
    sys.stdout.flush()
    if process_rank() == 0:
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()
    else:
        sys.stderr.flush()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(2))
        time.sleep(OTHER_RANKS_WAIT_S)
    raise SystemExit(2)


class JobArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors (usage and ``<prog>: error: <message>``, exit status 2) printed by
    rank 0 only (``exit_with_error``): under torchrun every rank parses the same flags."""

    def error(self, message: str) -> NoReturn:
        if process_rank() == 0:
            self.print_usage(sys.stderr)
        exit_with_error(message, self.prog)


def build_parser(require_model_flags: bool = True) -> argparse.ArgumentParser:
    """The job's flags (Megatron-LM's names); ``require_model_flags=False`` makes none required."""
    required = require_model_flags
    p = JobArgumentParser(prog=PROG, description="Pretrain a GPT with MoBA attention on megatron-core.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=required)
    g.add_argument("--hidden-size", type=int, required=required)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, required=required)
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (default: one per head)")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="attention head dimension (default: --hidden-size / --num-attention-heads)")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalize each head's queries and keys (--normalization, --norm-epsilon) before RoPE, "
                        "as Qwen3")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="biases in the query/key/value projection, also with --disable-bias-linear (as Qwen2)")
    g.add_argument("--seq-length", type=int, required=required)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x RoPE frequency scaling (megatron-core's: low/high frequency factors 1 and 4, "
                        "original context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="its factor (with --use-rope-scaling; default 8.0, Llama 3.1's)")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in linear layers")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.0, help="must be 0 for MoBA layers")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--hybrid-layer-pattern", default=None,
                   help="build megatron-core's HybridModel (megatron-core 0.19+) from this layer pattern instead of a "
                        "GPTModel: '*' attention (MoBA or full), '-' MLP, '|' a pipeline split; --num-layers counts "
                        "every layer of it (a GPT of L layers is '*-' x L, --num-layers 2L); --moba-full-attn-layers "
                        "and --moba-full-attn-layer-list count attention layers")

    g = p.add_argument_group("MoBA")
    g.add_argument("--attention", choices=["moba", "full"], default="moba",
                   help="full trains the dense baseline with the same code")
    g.add_argument("--moba-chunk-size", type=int, default=512)
    g.add_argument("--moba-topk", type=int, default=3)
    g.add_argument("--moba-full-attn-layers", type=int, default=0, help="the last N layers keep full attention")
    g.add_argument("--moba-full-attn-layer-list", type=int, nargs="+", default=None,
                   help="1-based layer numbers that keep full attention")
    g.add_argument("--moba-backend", default=None, help="moba_kernels backend (default: fastest available)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--train-iters", type=int, required=required)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true",
                   help="bf16 training: with --optimizer-impl megatron bf16 weights and fp32 main weights in the "
                        "optimizer (Megatron-LM's); with torch, autocast(bf16) over fp32 weights (no effect on CPU)")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 weights, fp32 main weights in the optimizer and loss scaling (dynamic unless "
                        "--loss-scale), as Megatron-LM; needs --optimizer-impl megatron")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="static loss scale for --fp16 (default: dynamic loss scaling)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32,
                   help="first loss scale of dynamic loss scaling (--fp16)")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="floor of dynamic loss scaling (--fp16)")
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="steps without overflow before dynamic loss scaling doubles the scale (--fp16)")
    g.add_argument("--hysteresis", type=int, default=2,
                   help="overflows tolerated before dynamic loss scaling halves the scale (--fp16)")
    g.add_argument("--optimizer-impl", choices=["megatron", "torch"], default=None,
                   help="megatron: megatron-core DDP + optimizer; torch: torch AdamW over fp32 weights "
                        "(default: megatron with CUDA, torch without)")
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="shard fp32 main weights and Adam states over data-parallel ranks "
                        "(--optimizer-impl megatron; default: on)")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap data-parallel gradient reduction with the backward "
                        "(--optimizer-impl megatron; default: on with CUDA)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (saving a checkpoint if --save) once the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (saving a checkpoint if --save) once the run has lasted this many minutes")
    g.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")

    g = p.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: recompute whole transformer layers in the backward; selective: recompute only "
                        "the core attention (MoBA or full)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with --recompute-granularity full: uniform divides the layers into groups of "
                        "--recompute-num-layers and checkpoints each group's input; block recomputes the first "
                        "--recompute-num-layers layers of each pipeline stage (default: uniform)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="layers per recomputed group (uniform) or recomputed per stage (block); default 1")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="prefixes of .bin/.idx files, optionally weighted: [w1] p1 [w2 p2 ...]")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--mock-data", action="store_true", help="random tokens (no files)")
    g.add_argument("--tokenizer-type", choices=["NullTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   default="NullTokenizer")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece model file or HF tokenizer directory")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for NullTokenizer")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--reset-position-ids", action="store_true", help="positions restart at every document")
    g.add_argument("--document-attention", action="store_true",
                   help="packed documents attend only within themselves (MoBA blocks restart per document)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="checkpoint directory to resume or start from")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--save-iterations", type=int, nargs="+", default=None, metavar="ITER",
                   help="also save at these iterations (e.g. the points of a learning curve)")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only: iteration, optimizer, scheduler and data position start afresh")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration of --load instead of the one named by latest_checkpointed_iteration.txt")
    sched = g.add_mutually_exclusive_group()
    sched.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                       dest="override_opt_param_scheduler", action="store_true",
                       help="on resume, take the LR/WD schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-iters, "
                            "--lr-decay-style, --weight-decay) from the command line instead of the checkpoint")
    sched.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                       dest="use_checkpoint_opt_param_scheduler", action="store_true",
                       help="on resume, take the LR/WD schedule from the checkpoint (the default; for Megatron-LM "
                            "command lines)")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state per parameter, loadable at any TP/PP/DP "
                        "(default: per data-parallel shard, loadable at another DP size only; faster)")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--logging-level", type=_logging_level, default=None,
                   help="Python logging level, a number or a name (DEBUG, INFO, WARNING, ...); "
                        "default: INFO on rank 0, WARNING on the other ranks")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None, help="JSON lines, one per logged iteration")
    return p


def _logging_level(text: str) -> int:
    import logging
    if text.lstrip("-").isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"{text!r} is not a logging level (a number, or DEBUG, INFO, WARNING, "
                                         "ERROR, CRITICAL)")
    return level


def flag_defaults() -> dict:
    """Every flag's default, by attribute name (what flags added after a checkpoint was saved take)."""
    return vars(build_parser(require_model_flags=False).parse_args([]))


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate; contradictions exit with a message naming the flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    try:
        validate_args(args, world_size)
    except ValueError as e:
        parser.error(str(e))
    return args


def validate_args(args, world_size: int) -> None:
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters", "micro_batch_size",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world_size % model_parallel:
        raise ValueError(f"world size ({world_size}) is not divisible by --tensor-model-parallel-size x "
                         f"--pipeline-model-parallel-size x --context-parallel-size ({model_parallel})")
    args.data_parallel_size = world_size // model_parallel
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size ({args.global_batch_size}) must be divisible by --micro-batch-size x "
                         f"data-parallel size ({args.micro_batch_size} x {args.data_parallel_size})")
    args.num_microbatches = args.global_batch_size // per_step
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings "
                         f"({args.max_position_embeddings})")
    _check_attention_flags(args)
    if getattr(args, "hybrid_layer_pattern", None) is not None:
        _check_hybrid_flags(args)
    elif args.num_layers % args.pipeline_model_parallel_size:
        raise ValueError(f"--num-layers ({args.num_layers}) must be divisible by --pipeline-model-parallel-size "
                         f"({args.pipeline_model_parallel_size})")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if bool(args.data_path) == bool(args.mock_data):
        raise ValueError("give exactly one of --data-path and --mock-data")
    _check_split_and_intervals(args)
    if args.tokenizer_type == "NullTokenizer" and not args.vocab_size:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
    if args.tokenizer_type != "NullTokenizer" and not args.tokenizer_model:
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    _check_job_flags(args)
    decay_iters = args.lr_decay_iters or args.train_iters       # megatron's scheduler: warmup < decay steps
    if args.lr_warmup_iters >= decay_iters:
        raise ValueError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than "
                         + (f"--lr-decay-iters ({args.lr_decay_iters})" if args.lr_decay_iters
                            else f"--train-iters ({args.train_iters})"))
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr ({args.min_lr}) exceeds --lr ({args.lr})")
    if args.finetune and not args.load:
        raise ValueError("--finetune needs --load")
    if args.save_interval is not None and not args.save:
        raise ValueError("--save-interval needs --save")
    if args.save_iterations is not None:
        if not args.save:
            raise ValueError("--save-iterations needs --save")
        if min(args.save_iterations) < 1:
            raise ValueError(f"--save-iterations must be iterations >= 1, got {args.save_iterations}")
    if args.attention == "moba" and args.attention_dropout:
        raise ValueError("--attention-dropout must be 0 with --attention moba (MoBA layers have no attention dropout)")
    _resolve_optimizer(args)
    if args.document_attention and args.context_parallel_size > 1:
        raise ValueError("--document-attention with --context-parallel-size > 1 is not supported yet")


def _check_attention_flags(args) -> None:
    """Head dimension, query groups and RoPE scaling."""
    if args.kv_channels is not None and args.kv_channels < 1:
        raise ValueError(f"--kv-channels must be >= 1, got {args.kv_channels}")
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
                         f"({args.num_attention_heads}), or give the head dimension with --kv-channels")
    groups = args.num_query_groups
    if groups is not None and (groups < 1 or args.num_attention_heads % groups):
        raise ValueError(f"--num-query-groups ({groups}) must divide --num-attention-heads "
                         f"({args.num_attention_heads})")
    if args.use_rope_scaling:
        if args.position_embedding_type != "rope":
            raise ValueError("--use-rope-scaling needs --position-embedding-type rope")
        if args.rope_scaling_factor is None:
            args.rope_scaling_factor = 8.0
        if not args.rope_scaling_factor > 0:
            raise ValueError(f"--rope-scaling-factor must be > 0, got {args.rope_scaling_factor}")
    elif args.rope_scaling_factor is not None:
        raise ValueError("--rope-scaling-factor needs --use-rope-scaling")


def _check_hybrid_flags(args) -> None:
    """--hybrid-layer-pattern: symbols MoBA serves, --num-layers, pipeline stages, a megatron-core with
    HybridModel; the MoBA layer flags counted over its attention layers."""
    from megatron_moba.core import hybrid_pattern
    from megatron_moba.core.versions import require_hybrid_model
    pattern = hybrid_pattern.check_pattern(args.hybrid_layer_pattern, args.num_layers,
                                           args.pipeline_model_parallel_size)
    attention = hybrid_pattern.layer_counts(args.num_layers, pattern)[0]
    if args.moba_full_attn_layers > attention:
        raise ValueError(f"--moba-full-attn-layers ({args.moba_full_attn_layers}) exceeds the attention layers ('*') "
                         f"of --hybrid-layer-pattern ({attention})")
    bad = [n for n in args.moba_full_attn_layer_list or [] if not 1 <= n <= attention]
    if bad:
        raise ValueError(f"--moba-full-attn-layer-list: layer {bad[0]} is out of range 1..{attention} (counted over "
                         f"the attention layers ('*') of --hybrid-layer-pattern)")
    require_hybrid_model()


def _check_job_flags(args) -> None:
    """Warmup fraction, exit duration, fp16 and activation recomputation flags."""
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ValueError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive: give one of them")
        if not 0.0 <= args.lr_warmup_fraction < 1.0:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * (args.lr_decay_iters or args.train_iters))
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ValueError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if args.fp16 and args.bf16:
        raise ValueError("--fp16 and --bf16 are mutually exclusive: give one of them")
    if args.loss_scale is not None and not args.fp16:
        raise ValueError("--loss-scale needs --fp16")
    if args.loss_scale is not None and args.loss_scale <= 0:
        raise ValueError(f"--loss-scale must be > 0, got {args.loss_scale}")
    method, n = args.recompute_method, args.recompute_num_layers
    extra = "--recompute-method" if method is not None else "--recompute-num-layers"
    if args.recompute_granularity is None and (method is not None or n is not None):
        raise ValueError(f"{extra} needs --recompute-granularity full")
    if args.recompute_granularity == "selective" and (method is not None or n is not None):
        raise ValueError(f"{extra} applies to --recompute-granularity full only (selective recomputes the core "
                         "attention of every layer)")
    if args.recompute_granularity == "full":
        args.recompute_method = method or "uniform"
        args.recompute_num_layers = n = 1 if n is None else n
        per_stage = args.num_layers // max(1, args.pipeline_model_parallel_size)
        if not 1 <= n <= per_stage:
            raise ValueError(f"--recompute-num-layers ({n}) must be between 1 and the layers per pipeline stage "
                             f"({per_stage})")


def _check_split_and_intervals(args) -> None:
    """--split, --log-interval, --eval-interval and --eval-iters, which otherwise fail only once
    training runs (a division by zero, or no validation data at the first evaluation).
    Evaluation is on exactly when --eval-interval is given; it then needs --eval-iters >= 1 and
    validation weight in --split."""
    import re
    if not re.fullmatch(r"\s*[0-9.]+(\s*[,/]\s*[0-9.]+){0,2}\s*", args.split):
        raise ValueError(f"--split {args.split!r} must be up to three non-negative train,valid,test weights, "
                         f"e.g. 969,30,1")
    try:
        weights = [float(w) for w in re.split(r"\s*[,/]\s*", args.split.strip())] + [0.0, 0.0]
    except ValueError:
        raise ValueError(f"--split {args.split!r} must be up to three non-negative train,valid,test weights, "
                         f"e.g. 969,30,1") from None
    if weights[0] <= 0:
        raise ValueError(f"--split {args.split} gives the training split no weight")
    if args.log_interval < 1:
        raise ValueError(f"--log-interval must be >= 1, got {args.log_interval}")
    if args.eval_iters < 0:
        raise ValueError(f"--eval-iters must be >= 0, got {args.eval_iters}")
    if args.eval_interval is not None:
        if args.eval_interval < 1:
            raise ValueError(f"--eval-interval must be >= 1, got {args.eval_interval} (leave --eval-interval out "
                             f"to train without evaluation)")
        if args.eval_iters == 0:
            raise ValueError(f"--eval-interval {args.eval_interval} evaluates on --eval-iters 0 batches: give "
                             f"--eval-iters >= 1, or leave --eval-interval out to train without evaluation")
        if weights[1] <= 0:
            raise ValueError(f"--eval-interval {args.eval_interval} evaluates on the validation split, but --split "
                             f"{args.split} gives it no weight: give it weight (e.g. --split 98,2,0) or leave "
                             f"--eval-interval out to train without evaluation")


def _resolve_optimizer(args) -> None:
    """Defaults of the optimizer flags from CUDA availability; megatron-only flags checked."""
    import torch
    cuda = torch.cuda.is_available()
    if args.optimizer_impl is None:
        args.optimizer_impl = "megatron" if cuda or getattr(args, "fp16", False) else "torch"
    if getattr(args, "fp16", False) and args.optimizer_impl == "torch":
        raise ValueError("--fp16 needs --optimizer-impl megatron (fp16 weights, fp32 main weights and loss "
                         "scaling); with --optimizer-impl torch use --bf16")
    for flag in ("use_distributed_optimizer", "overlap_grad_reduce"):
        if args.optimizer_impl == "torch" and getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} needs --optimizer-impl megatron")
    if args.optimizer_impl == "megatron":
        if args.use_distributed_optimizer is None:
            args.use_distributed_optimizer = True
        if args.overlap_grad_reduce is None:
            args.overlap_grad_reduce = cuda
    args.use_distributed_optimizer = bool(args.use_distributed_optimizer)
    args.overlap_grad_reduce = bool(args.overlap_grad_reduce)


def config_from_args(args) -> "MoBATransformerConfig":
    """The ``MoBATransformerConfig`` these flags describe (MoBA flags checked there)."""
    import torch
    import torch.nn.functional as F

    from megatron_moba.core.config import MoBATransformerConfig
    # --bf16 with megatron's optimizer: bf16 weights (Float16Module), fp32 main weights in the optimizer.
    # With torch AdamW (no master copy of bf16 weights) weights stay fp32 and megatron's schedules run
    # each micro-batch under torch.autocast(bf16).
    bf16_weights = args.bf16 and getattr(args, "optimizer_impl", "torch") == "megatron"
    fp16 = bool(getattr(args, "fp16", False))        # megatron's optimizer only (checked in _resolve_optimizer)
    dtype = torch.bfloat16 if bf16_weights else torch.float16 if fp16 else torch.float32
    return MoBATransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=getattr(args, "kv_channels", None), qk_layernorm=getattr(args, "qk_layernorm", False),
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon, gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu, add_bias_linear=not args.disable_bias_linear,
        init_method_std=args.init_method_std, attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16_weights, fp16=fp16,
        recompute_granularity=getattr(args, "recompute_granularity", None),
        recompute_method=getattr(args, "recompute_method", None),
        recompute_num_layers=getattr(args, "recompute_num_layers", None),
        enable_autocast=args.bf16 and not bf16_weights, autocast_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        attention=args.attention, moba_chunk_size=args.moba_chunk_size, moba_topk=args.moba_topk,
        moba_backend=args.moba_backend, moba_full_attn_layers=args.moba_full_attn_layers,
        moba_full_attn_layer_list=args.moba_full_attn_layer_list,
        hybrid_layer_pattern=getattr(args, "hybrid_layer_pattern", None),
    )
