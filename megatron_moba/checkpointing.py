"""Checkpoints with megatron-core's dist_checkpointing (torch_dist format, sharded across ranks).

Layout under ``--save``::

    iter_0000100/                       one checkpoint (model, optimizer, scheduler, RNG, data position)
    latest_checkpointed_iteration.txt   the iteration of the newest complete checkpoint

A save writes ``iter_XXXXXXX.tmp`` first, renames it when every rank has finished, and only
then replaces the ``latest`` file (atomically): a crash in the middle of a save leaves the
previous checkpoint and ``latest`` as they were.  The same directory loads at any TP/PP.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

LATEST = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest(root: str) -> int:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint to load: {path} does not exist (--load {root})")
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} is corrupted: expected an iteration number, found {text[:40]!r}")
    return int(text)


def _rng_object(rank: int, world: int, state=None) -> ShardedObject:
    if state is None:
        state = {"torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, consumed_samples: int, args=None,
                    extra: Optional[dict] = None):
    """Save, atomically (see the module docstring).  With ``optimizer``/``scheduler`` None only the
    weights are saved (a checkpoint for ``--finetune``, e.g. an imported one)."""
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "rng": _rng_object(rank, world), "iteration": iteration,
             "consumed_samples": consumed_samples, "world_size": world,
             "args": vars(args) if args is not None else None, **(extra or {})}
    if optimizer is not None:          # megatron_moba.optimizer's interface
        state["optimizer"] = optimizer.sharded_state_dict(model_sd)
        state["optimizer_impl"], state["optimizer_sharding"] = optimizer.impl, optimizer.sharding
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, tmp)
    dist.barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = os.path.join(root, LATEST + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(root, LATEST))
    dist.barrier()
    return final


def _check_optimizer_layout(path: str, common: dict) -> None:
    """A distributed-optimizer state saved per DP shard only loads at the TP/PP it was saved with."""
    from megatron.core import parallel_state as ps
    if common.get("optimizer_sharding") != "dp_reshardable":
        return
    saved = common.get("args") or {}
    now = {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
           "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size()}
    for key, size in now.items():
        if saved.get(key, size) != size:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{path} holds the distributed optimizer's state per data-parallel shard, saved at "
                             f"{flag} {saved[key]}: resume at {flag} {saved[key]}, or load the weights only with "
                             "--no-load-optim; save with --dist-ckpt-optim-fully-reshardable to change TP/PP")


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, finetune: bool = False,
                    iteration: Optional[int] = None):
    """Load into ``model`` (and optimizer, scheduler, RNG unless ``finetune``/None).
    Returns (iteration, consumed_samples); (0, 0) for ``finetune``."""
    iteration = read_latest(root) if iteration is None else iteration
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is missing (named by {os.path.join(root, LATEST)})")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_sd = model.sharded_state_dict()
    request = {"model": model_sd}
    common = dist_checkpointing.load_common_state_dict(path)
    if not finetune:
        if "scheduler" not in common:
            raise ValueError(f"{path} holds weights only (no optimizer or scheduler): load it with --finetune")
        request["rng"] = _rng_object(rank, world)
        if optimizer is not None:
            saved_impl = common.get("optimizer_impl", "torch")
            if saved_impl != optimizer.impl:
                raise ValueError(f"{path} holds the optimizer state of --optimizer-impl {saved_impl}; resume with "
                                 f"it, or load the weights only with --no-load-optim (or --finetune)")
            _check_optimizer_layout(path, common)
            request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                sharding=common.get("optimizer_sharding"))
    if "rng" in request and common.get("world_size") != world:
        request.pop("rng")     # per-rank RNG states only carry over to the same number of ranks
        if rank == 0:
            print(f"note: {path} was saved by {common.get('world_size')} ranks, loading on {world}: "
                  "RNG states start afresh", flush=True)
    try:
        loaded = dist_checkpointing.load(request, path)
    except Exception as e:
        raise RuntimeError(f"could not load checkpoint {path}: {e}") from e
    model.load_state_dict(loaded["model"])
    if finetune:
        return 0, 0
    if optimizer is not None and "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
    rng = loaded.get("rng")
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    return common["iteration"], common["consumed_samples"]
