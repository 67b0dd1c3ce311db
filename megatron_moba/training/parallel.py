"""Parallelism for the training job: process groups, seeds, gradient reduction and clipping.

With ``--optimizer-impl torch`` gradients are reduced here, explicitly, after megatron's
forward/backward schedule (megatron's optimizer path uses its DDP and ``finalize_model_grads``):
* sequence-parallel norm weights: summed over the TP group (each rank saw part of the sequence), and
  so are the QK-norm weights of --qk-layernorm (each rank saw its own heads; megatron's rule);
* tied input/output embeddings split across pipeline stages: summed over the embedding group;
* every gradient: averaged over the data-parallel x context-parallel group.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_moba.training.compat import require_cpu_shim


def free_port() -> int:
    """A free TCP port on the loopback interface (for a local process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(args) -> None:
    """Process group from torchrun's environment (or a single local process), then megatron's
    model-parallel groups and seeds."""
    require_cpu_shim("initialize_distributed")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # --distributed-timeout-minutes (Megatron-LM's flag; the job's default 30)
        dist.init_process_group(backend, timeout=timedelta(minutes=getattr(args, "distributed_timeout_minutes", 30)))
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                     context_parallel_size=args.context_parallel_size)
    set_seed(args.seed)


def set_seed(seed: int) -> None:
    """Same seed on every rank of a TP group (megatron splits identical full weights), different
    per pipeline stage."""
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)


def finalize_grads(model) -> None:
    """Reduce gradients after the backward pass (see the module docstring)."""
    tp_group = ps.get_tensor_model_parallel_group()
    qk_norm = getattr(getattr(model, "config", None), "qk_layernorm", False)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if getattr(p, "sequence_parallel", False) or (qk_norm and ("q_layernorm" in name or "k_layernorm" in name)):
            dist.all_reduce(p.grad, group=tp_group)
    if ps.get_pipeline_model_parallel_world_size() > 1 and getattr(model, "share_embeddings_and_output_weights", False):
        if ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage():
            w = model.shared_embedding_or_output_weight()
            if w is not None and w.grad is not None:
                dist.all_reduce(w.grad, group=ps.get_embedding_group())
    group = ps.get_data_parallel_group(with_context_parallel=True)
    size = dist.get_world_size(group)
    if size > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad /= size


def grad_norm(model) -> torch.Tensor:
    """Global L2 norm of the gradients across TP and PP ranks (replicated TP params counted once)."""
    sq = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for p in model.parameters():
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.float().square().sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt()


def clip_grads(model, max_norm: float) -> float:
    """Clip to ``max_norm`` (0 = no clipping); returns the norm before clipping (inf/nan if
    the gradients are not finite, in which case nothing is scaled)."""
    norm = grad_norm(model)
    if max_norm > 0 and torch.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return float(norm)
