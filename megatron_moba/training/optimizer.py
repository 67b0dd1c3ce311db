"""The training job's optimizer, in two implementations behind one small interface
(``--optimizer-impl``; the default follows CUDA availability).

* ``megatron`` (default on CUDA): megatron-core's ``DistributedDataParallel`` (contiguous grad
  buffers, bucketed reductions overlapped with the backward with ``--overlap-grad-reduce``) and
  ``get_megatron_optimizer`` (``--use-distributed-optimizer`` shards the fp32 main weights and the
  Adam states over data-parallel ranks).  With ``--bf16`` the model holds bf16 weights
  (``Float16Module``) and the optimizer fp32 masters, as in Megatron-LM; ``--fp16`` likewise with fp16
  weights, plus megatron's loss scaling (dynamic, or static with ``--loss-scale``).
* ``torch`` (default on CPU): ``torch.optim.AdamW`` over fp32 weights; gradients are reduced by
  ``parallel.finalize_grads`` and clipped by ``parallel.clip_grads``; ``--bf16`` is autocast.

Both exclude biases and 1-D weights (norms) from weight decay, like Megatron-LM, and present:
``model`` (what the schedules run), ``param_groups`` (for the LR scheduler), ``zero_grad()``,
``step() -> (stepped, grad_norm)`` (a non-finite norm skips the update), and
``sharded_state_dict(model_sd, is_loading)`` / ``load_state_dict(state)`` / ``reload_model_params()``
for dist_checkpointing.
"""
from __future__ import annotations

import contextlib
import math

import torch
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, optim_state_to_sharding_state

from megatron_moba.training.compat import load_optimizer_state, require_cpu_optimizer_shim
from megatron_moba.training.parallel import clip_grads, finalize_grads


def _decays(name: str, param: torch.Tensor) -> bool:
    return param.dim() > 1 and not name.endswith(".bias")


def _materialize_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of a torch Adam(W) the state of step 0, so that the structure of its
    state dict exists before a first step (a checkpoint load fills it in place)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class TorchOptimizer:
    """torch AdamW on the bare model; the gradient reductions are explicit (parallel.py)."""

    impl, sharding = "torch", "fully_reshardable"

    def __init__(self, args, model):
        self.model, self.clip = model, args.clip_grad
        named = list(model.named_parameters())
        groups = [dict(params=[p for n, p in named if _decays(n, p)], wd_mult=1.0),
                  dict(params=[p for n, p in named if not _decays(n, p)], wd_mult=0.0)]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, eps=args.adam_eps,
                                           betas=(args.adam_beta1, args.adam_beta2),
                                           weight_decay=args.weight_decay)

    @property
    def param_groups(self):     # a property: loading a state dict replaces the optimizer's groups
        return self.optimizer.param_groups

    def params_gathered(self):
        """The parameters are always whole here (see MegatronOptimizer.params_gathered)."""
        return contextlib.nullcontext()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=False)

    def step(self):
        finalize_grads(self.model)
        norm = clip_grads(self.model, self.clip)
        if not math.isfinite(norm):
            return False, norm
        self.optimizer.step()
        return True, norm

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def sharded_state_dict(self, model_sd, is_loading: bool = False, sharding: str = None) -> dict:
        """AdamW state as sharded tensors that follow the model's sharding (+ the step count)."""
        _materialize_adam_state(self.optimizer)
        state = self.optimizer.state_dict()
        step = float(next(iter(state["state"].values()))["step"]) if state["state"] else 0.0
        optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_sd, self._params()),
                                      exclude_keys=("step",))
        state["adam_step"] = step
        return state

    def load_state_dict(self, state: dict):
        state = dict(state)
        step = state.pop("adam_step")
        for st in state["state"].values():
            st["step"] = torch.tensor(step, dtype=torch.float32)
        self.optimizer.load_state_dict(state)

    def reload_model_params(self):
        """Nothing to do: AdamW updates the model's own fp32 weights."""


def _loss_scaling(args) -> dict:
    """--fp16: megatron's loss scaling (static with --loss-scale, else dynamic), as in Megatron-LM."""
    if not getattr(args, "fp16", False):
        return {}
    return dict(fp16=True, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
                min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window,
                hysteresis=args.hysteresis)


class MegatronOptimizer:
    """megatron-core's DDP wrapper and optimizer (``get_megatron_optimizer``)."""

    impl = "megatron"

    def __init__(self, args, model):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module
        require_cpu_optimizer_shim("--optimizer-impl megatron")
        config = model.config
        self.fp16 = bool(getattr(args, "fp16", False))
        if args.bf16 or self.fp16:
            model = Float16Module(config, model)        # bf16/fp16 weights; fp32 logits out of the last stage
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer, check_for_nan_in_grad=False,
            overlap_param_gather=bool(getattr(args, "overlap_param_gather", False)))
        self.model = DistributedDataParallel(config, ddp_config, module=model)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=config.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer, **_loss_scaling(args)), [self.model])
        self.sharding = "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"
        # the schedules reduce gradients through DDP: deferred over micro-batches, then finalized
        config.no_sync_func = self.model.no_sync
        if args.overlap_grad_reduce:
            config.grad_sync_func = self.model.start_grad_sync
        config.finalize_model_grads_func = finalize_model_grads
        if self.fp16:               # the schedules scale each micro-batch's loss before its backward
            config.grad_scale_func = self.optimizer.scale_loss

    @contextlib.contextmanager
    def params_gathered(self):
        """--overlap-param-gather: the model's parameters all-gathered in full (the forward pre-hooks off)
        for what reads them outside a training forward (checkpoint saves, evaluation), as Megatron-LM."""
        if not self.model.ddp_config.overlap_param_gather:
            yield
            return
        self.model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            self.model.enable_forward_pre_hook()

    @property
    def loss_scale(self):
        """The current fp16 loss scale (None without --fp16)."""
        return float(self.optimizer.get_loss_scale()) if self.fp16 else None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self):
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self):
        """megatron's ``ChainedOptimizer.step()`` with a finiteness check between the norm and the update."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
        opt = self.optimizer
        if opt.prepare_grads():               # inf/nan found by a loss scaler (fp16 only)
            return False, float("nan")
        norm = float(opt.get_grad_norm())
        if not math.isfinite(norm):
            return False, norm
        for part in getattr(opt, "chained_optimizers", [opt]):
            params = part.get_parameters()
            if part.config.clip_grad > 0 and params and not getattr(part, "is_stub_optimizer", False):
                clip_grad_by_total_norm_fp32(params, part.config.clip_grad, norm,
                                             part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        return bool(opt.step_with_ready_grads()), norm

    def sharded_state_dict(self, model_sd, is_loading: bool = False, sharding: str = None) -> dict:
        """``sharding`` (distributed optimizer): 'dp_reshardable' (each rank writes its own shard; loads
        at another DP size) or 'fully_reshardable' (gathered per parameter; loads at any TP/PP/DP)."""
        sharding = sharding or self.sharding
        for part in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if isinstance(part.optimizer, (torch.optim.Adam, torch.optim.AdamW)):    # no TE/apex FusedAdam:
                _materialize_adam_state(part.optimizer)     # megatron reads the per-parameter "step" of torch's Adam
        metadata = {"distrib_optim_sharding_type": sharding,
                    # fully_reshardable gathers over NCCL from CUDA tensors, or over gloo to DP rank 0
                    "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}
        return self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)

    def load_state_dict(self, state: dict):
        load_optimizer_state(self.optimizer, state)     # compat.py, patch 3 (torch Adam under megatron's)

    def reload_model_params(self):
        """Copy freshly loaded model weights into the fp32 main weights."""
        self.optimizer.reload_model_params()


def build_optimizer(args, model):
    """The optimizer ``args.optimizer_impl`` names, over ``model`` (the bare GPT)."""
    return (MegatronOptimizer if args.optimizer_impl == "megatron" else TorchOptimizer)(args, model)
