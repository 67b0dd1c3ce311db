"""Megatron-LM's flags for long-context training at scale, and the continued-pretraining data slice.

Megatron-LM command lines (its Llama examples) run with the job after adding ``--attention moba`` and
the MoBA flags.  Each Megatron-LM flag the job takes falls in one of three kinds:

* implemented, doing what Megatron-LM does: ``--async-save``, ``--overlap-param-gather``, ``--transformer-impl``,
  ``--attention-backend``,
  ``--cp-comm-type`` (the full-attention layers; MoBA layers keep their own context parallelism),
  ``--distributed-timeout-minutes``, ``--manual-gc``/``--manual-gc-interval``/``--no-manual-gc-eval``,
  ``--ckpt-format torch_dist``, and megatron-core's kernel fusions, on by default on CUDA (where their
  kernels are installed) with Megatron-LM's ``--no-...-fusion`` flags to switch them off;
* accepted and logged, where they cannot change anything here (``--use-mcore-models``: the job only has
  megatron-core models; ``--group-query-attention``: implied by ``--num-query-groups``; ...);
* refused naming the flag, for features the job does not have (``--fp8-format``, ``--num-experts`` ...):
  never silently ignored.

``--train-data-slice BEGIN END`` (the job's own) trains on that fraction of the training split's
documents: the continued-pretraining recipe gives each stage its own slice, so no stage rereads the
documents of an earlier one.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import List

# Megatron-LM flags accepted as they are, with why they change nothing here (logged at start).
ACCEPTED = {
    "use_mcore_models": ("--use-mcore-models", "the job builds megatron-core models only"),
    "group_query_attention": ("--group-query-attention", "grouped-query attention follows --num-query-groups"),
    "log_throughput": ("--log-throughput", "the job logs tokens/s at every --log-interval"),
    "no_persist_layer_norm": ("--no-persist-layer-norm", "the job's norms never use apex's persistent layer norm"),
    "use_flash_attn": ("--use-flash-attn", "full-attention layers use Transformer Engine's attention "
                                           "(--attention-backend), MoBA layers moba_kernels"),
}
# Megatron-LM flags for features the job does not have: refused, naming the flag.
REFUSED = {
    "--fp8-format": "FP8 training is not implemented by this job",
    "--fp8-param-gather": "FP8 training is not implemented by this job",
    "--train-samples": "the job counts training in iterations: give --train-iters",
    "--lr-decay-samples": "the job counts training in iterations: give --lr-decay-iters",
    "--lr-warmup-samples": "the job counts training in iterations: give --lr-warmup-iters",
    "--num-experts": "mixture-of-experts layers are not implemented by this job",
    "--apply-layernorm-1p": "zero-centred (1p) layer norms are not implemented by this job",
    "--calculate-per-token-loss": "the job averages the loss per micro-batch; per-token loss is not implemented",
    "--tp-comm-overlap": "tensor-parallel communication overlap (userbuffers) is not implemented by this job",
    "--use-torch-fsdp2": "FSDP is not implemented by this job (it uses megatron-core's DDP)",
    "--decoupled-lr": "a separate learning rate for embeddings is not implemented by this job",
}
CKPT_FORMATS = ("torch_dist", "torch", "zarr", "torch_dcp", "fsdp_dtensor")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
# megatron-core's kernel fusions: (config field, Megatron-LM's flag that switches it off)
FUSIONS = (("masked_softmax_fusion", "--no-masked-softmax-fusion"),
           ("bias_activation_fusion", "--no-bias-swiglu-fusion"),
           ("bias_dropout_fusion", "--no-bias-dropout-fusion"),
           ("apply_rope_fusion", "--no-rope-fusion"),
           ("gradient_accumulation_fusion", "--no-gradient-accumulation-fusion"))


class _Refuse(argparse.Action):
    def __init__(self, option_strings, dest, nargs="?", **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {REFUSED[option_string]} (a Megatron-LM flag this job refuses rather than "
                     "ignores)")


def add_flags(p: argparse.ArgumentParser) -> None:
    """The flags of this module, in their own argument groups."""
    g = p.add_argument_group("Megatron-LM: implemented")
    g.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default=None,
                   help="layer implementation: Transformer Engine's or megatron-core's local one "
                        "(default: Transformer Engine when installed)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="Transformer Engine's attention backend for the full-attention layers (MoBA layers run "
                        "moba_kernels)")
    g.add_argument("--cp-comm-type", choices=CP_COMM_TYPES, default="p2p",
                   help="context-parallel communication of the full-attention layers (Transformer Engine); MoBA "
                        "layers keep their own (gathered keys and values)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30,
                   help="timeout of torch.distributed collectives")
    g.add_argument("--manual-gc", action="store_true",
                   help="disable Python's automatic garbage collection; collect every --manual-gc-interval "
                        "iterations and around evaluations and checkpoints, on every rank at the same step")
    g.add_argument("--manual-gc-interval", type=int, default=0, help="with --manual-gc: 0 collects only around "
                   "evaluations and checkpoints")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: no collection around evaluations")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather with the next forward (megatron-core "
                        "DDP's forward pre-hooks; parameters are gathered in full before saves and evaluations); "
                        "needs --use-distributed-optimizer and --overlap-grad-reduce, as in Megatron-LM")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process (megatron-core's asynchronous dist_checkpointing); "
                        "training goes on once the tensors are staged, the checkpoint is published when written")
    g.add_argument("--ckpt-format", choices=CKPT_FORMATS, default="torch_dist",
                   help="checkpoint format: torch_dist only (megatron-core dist_checkpointing)")
    for field, flag in FUSIONS:
        g.add_argument(flag, dest=f"no_{field}", action="store_true",
                       help=f"switch off megatron-core's {field} (on by default on CUDA where its kernel is "
                            "installed)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="megatron-core's fused vocab-parallel cross entropy (CUDA)")
    g = p.add_argument_group("Megatron-LM: accepted, no effect here (logged)")
    for dest, (flag, why) in ACCEPTED.items():
        g.add_argument(flag, dest=dest, action="store_true", help=why)
    g.add_argument("--rotary-percent", type=float, default=1.0, help="1.0 only (RoPE on the whole head)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="128 only (the job pads the vocabulary to a multiple of 128 at every TP size)")
    g = p.add_argument_group("Megatron-LM: refused (features the job does not have)")
    for flag, why in REFUSED.items():
        g.add_argument(flag, action=_Refuse, metavar="...", help=why)
    g = p.add_argument_group("continued pretraining")
    g.add_argument("--train-data-slice", type=float, nargs=2, default=None, metavar=("BEGIN", "END"),
                   help="train on this fraction [BEGIN, END) of the training split's documents (0 <= BEGIN < END "
                        "<= 1): stages of a continued pretraining take disjoint slices, so none rereads another's")


def check_flags(args, cuda: bool) -> None:
    """Checks and CUDA-dependent defaults of this module's flags (``args.fusions``: the fusion fields on)."""
    if args.rotary_percent != 1.0:
        raise ValueError(f"--rotary-percent {args.rotary_percent}: partial rotary embeddings are not implemented by "
                         "this job (1.0 only)")
    if args.make_vocab_size_divisible_by != 128:
        raise ValueError(f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by}: the job pads the "
                         "vocabulary to a multiple of 128 (checkpoints then move between TP sizes); 128 only")
    if args.ckpt_format != "torch_dist":
        raise ValueError(f"--ckpt-format {args.ckpt_format}: the job saves megatron-core dist_checkpointing "
                         "(torch_dist) only")
    if args.distributed_timeout_minutes < 1:
        raise ValueError(f"--distributed-timeout-minutes must be >= 1, got {args.distributed_timeout_minutes}")
    if args.manual_gc_interval < 0:
        raise ValueError(f"--manual-gc-interval must be >= 0, got {args.manual_gc_interval}")
    if args.manual_gc_interval and not args.manual_gc:
        raise ValueError("--manual-gc-interval needs --manual-gc")
    if args.transformer_impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        raise ValueError("--transformer-impl transformer_engine needs Transformer Engine (not installed here); "
                         "use --transformer-impl local")
    if args.train_data_slice is not None:
        begin, end = args.train_data_slice
        if not 0.0 <= begin < end <= 1.0:
            raise ValueError(f"--train-data-slice {begin} {end}: need 0 <= BEGIN < END <= 1")
    if args.async_save and not args.save:
        raise ValueError("--async-save needs --save")
    if args.overlap_param_gather and not (args.optimizer_impl == "megatron" and args.use_distributed_optimizer
                                          and args.overlap_grad_reduce):
        raise ValueError("--overlap-param-gather needs --optimizer-impl megatron with --use-distributed-optimizer and "
                         "--overlap-grad-reduce")
    args.fusions, args.fusions_off = resolve_fusions(args, cuda)
    if args.cross_entropy_loss_fusion and not cuda:
        raise ValueError("--cross-entropy-loss-fusion needs CUDA")


def resolve_fusions(args, cuda: bool):
    """(fusion fields on, {field: why off}) as Megatron-LM decides: on with CUDA unless switched off; a
    fusion whose kernel is not installed is switched off and said so."""
    te = (importlib.util.find_spec("transformer_engine") is not None
          and getattr(args, "transformer_impl", None) != "local")
    unavailable = {
        "apply_rope_fusion": None if te else "needs Transformer Engine",
        "gradient_accumulation_fusion": (
            None if (te or importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None)
            and getattr(args, "optimizer_impl", None) == "megatron"
            else "needs Transformer Engine or apex, and --optimizer-impl megatron"),
        "bias_activation_fusion": None if getattr(args, "swiglu", False) else "the job fuses SwiGLU only",
    }
    on, off = [], {}
    for field, flag in FUSIONS:
        if getattr(args, f"no_{field}", False):
            off[field] = flag
        elif not cuda:
            off[field] = "no CUDA"
        elif unavailable.get(field):
            off[field] = unavailable[field]
        else:
            on.append(field)
    return on, off


def config_fields(args) -> dict:
    """TransformerConfig fields of these flags (for config_from_args).  The fusions are decided again for
    this machine: a checkpoint's flags, saved on a GPU, may be evaluated on a CPU."""
    import torch
    from megatron.core.transformer.enums import AttnBackend
    on, _ = resolve_fusions(args, torch.cuda.is_available())
    fields = {field: field in on for field, _ in FUSIONS}
    fields["cross_entropy_loss_fusion"] = bool(getattr(args, "cross_entropy_loss_fusion", False))
    fields["attention_backend"] = AttnBackend[getattr(args, "attention_backend", "auto")]
    if getattr(args, "context_parallel_size", 1) > 1:
        fields["cp_comm_type"] = getattr(args, "cp_comm_type", "p2p")
    if getattr(args, "skip_weight_init", False):      # set by the HF conversions: every weight is overwritten
        fields["perform_initialization"] = False
    return fields


def summary(args) -> List[str]:
    """Log lines: which Megatron-LM flags were accepted without effect, and the fusions' state."""
    lines = [f"{flag}: accepted, no effect ({why})" for dest, (flag, why) in ACCEPTED.items()
             if getattr(args, dest, False)]
    on = getattr(args, "fusions", [])
    off = getattr(args, "fusions_off", {})
    lines.append("kernel fusions: on " + (", ".join(on) or "none")
                 + ("; off " + ", ".join(f"{k} ({v})" for k, v in off.items()) if off else ""))
    if getattr(args, "manual_gc", False):
        every = f"every {args.manual_gc_interval} iterations and " if args.manual_gc_interval else ""
        lines.append(f"--manual-gc: automatic garbage collection off, collecting {every}before checkpoint saves"
                     + (" and evaluations" if args.manual_gc_eval else ""))
    return lines


class ManualGC:
    """--manual-gc: Python's automatic garbage collection off for the run (its pauses, at different
    steps on different ranks, stall the collectives); a collection every --manual-gc-interval
    iterations and before evaluations (unless --no-manual-gc-eval) and checkpoint saves, the same
    step on every rank.  Without --manual-gc every method does nothing."""

    def __init__(self, args):
        self.on = bool(getattr(args, "manual_gc", False))
        self.interval = getattr(args, "manual_gc_interval", 0)
        self.eval = getattr(args, "manual_gc_eval", True)
        self.was_enabled = None
        self.collections = 0

    def collect(self) -> None:
        import gc
        gc.collect()
        self.collections += 1

    def __enter__(self):
        if self.on:
            import gc
            self.was_enabled = gc.isenabled()
            gc.disable()
            self.collect()
        return self

    def __exit__(self, *exc):
        if self.on and self.was_enabled:
            import gc
            gc.enable()
        return False

    def step(self, iteration: int) -> None:
        if self.on and self.interval and iteration % self.interval == 0:
            self.collect()

    def before_eval(self) -> None:
        if self.on and self.eval:
            self.collect()

    def before_save(self) -> None:
        if self.on:
            self.collect()
