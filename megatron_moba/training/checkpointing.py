"""Checkpoints with megatron-core's dist_checkpointing (torch_dist format, sharded across ranks).

Layout under ``--save``::

    iter_0000100/                       one checkpoint (model, optimizer, scheduler, RNG, data position)
    latest_checkpointed_iteration.txt   the iteration of the newest complete checkpoint

A save writes ``iter_XXXXXXX.tmp`` first, renames it when every rank has finished, and only
then replaces the ``latest`` file (atomically): a crash in the middle of a save leaves the
previous checkpoint and ``latest`` as they were.  The same directory loads at any TP/PP.

A run never writes over checkpoints it did not resume (``check_save_dir``): ``--save`` must be
empty, or resumed with ``--load`` (``latest`` present, or ``--ckpt-step``).  A checkpoint that
fails to load names its damaged files.  Entries in ``CARRIED`` (the HF config of an import)
pass from a loaded checkpoint into every checkpoint saved after it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_moba.core.errors import ConfigurationError

LATEST = "latest_checkpointed_iteration.txt"
# carried from the loaded checkpoint into every checkpoint a run saves (--load, --finetune included)
CARRIED = ("hf_config",)
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointDirectoryError(ConfigurationError, FileExistsError):
    """``--save`` holds checkpoints that this run would overwrite without resuming them."""


class CheckpointNotFoundError(ConfigurationError, FileNotFoundError):
    """``--load`` (or ``--ckpt-step``) names no checkpoint."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def saved_iterations(root: str) -> List[int]:
    """The iterations of the complete checkpoints (``iter_XXXXXXX``, not ``.tmp``) in ``root``."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(root)
                  if (m := _ITER_DIR.match(name)) and os.path.isdir(os.path.join(root, name)))


def _resume_hint(root: str, iteration: int) -> str:
    return (f"to resume from {checkpoint_dir(root, iteration)}, write the tracker "
            f"(echo {iteration} > {os.path.join(root, LATEST)}) or add --ckpt-step {iteration}")


def read_latest(root: str) -> int:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        found = saved_iterations(root)
        if found:
            raise CheckpointNotFoundError(
                f"no checkpoint to load: {path} does not exist (--load {root}), but {root} holds checkpoints "
                f"(newest {checkpoint_dir(root, found[-1])}): " + _resume_hint(root, found[-1]))
        raise CheckpointNotFoundError(f"no checkpoint to load: {path} does not exist (--load {root})")
    text = open(path).read().strip()
    if not text.isdigit():
        raise ConfigurationError(f"{path} is corrupted: expected an iteration number, found {text[:40]!r}")
    return int(text)


def check_save_dir(save: Optional[str], load: Optional[str] = None, finetune: bool = False,
                   ckpt_step: Optional[int] = None) -> bool:
    """Refuse a run that would overwrite the checkpoints in ``save`` (``--save``) without resuming
    them.  Returns True for a (re)queued job's first start: ``--load`` = ``--save``, nothing saved
    yet (train from scratch)."""
    if not save:
        return False
    same = bool(load) and os.path.abspath(load) == os.path.abspath(save)
    found = saved_iterations(save)
    has_latest = os.path.isfile(os.path.join(save, LATEST))
    if not found:
        return same and not has_latest
    newest = checkpoint_dir(save, found[-1])
    if same and not finetune:
        if not has_latest and ckpt_step is None:
            raise CheckpointNotFoundError(
                f"--load/--save {save}: {os.path.join(save, LATEST)} is missing, but {save} holds checkpoints "
                f"(newest {newest}); refusing to start from scratch over them: {_resume_hint(save, found[-1])}; "
                "or --save to an empty directory to start a new run")
        return False                               # a resume: it continues these checkpoints
    if same and finetune:
        if found[-1] == 0:                         # e.g. an HF import: the run saves iterations >= 1 next to it
            return False
        raise CheckpointDirectoryError(
            f"--load {load} --finetune restarts at iteration 0 and would overwrite the checkpoints in --save {save} "
            f"(newest {newest}): to resume that run drop --finetune; to fine-tune from it, --save to an empty "
            "directory")
    if load:
        raise CheckpointDirectoryError(
            f"--save {save} already holds checkpoints (newest {newest}) of another run than --load {load}: "
            f"saving there would overwrite them; --save to an empty directory (or resume {save} with "
            f"--load {save}" + (" without --finetune)" if finetune else ")"))
    raise CheckpointDirectoryError(
        f"--save {save} already holds checkpoints (newest {newest}) and no --load was given: this run would start "
        f"from scratch and overwrite them; resume them with --load {save}, or --save to an empty directory")


def drop_metrics_after(path: Optional[str], iteration: int) -> int:
    """Rewrite the JSON-lines metrics file ``path`` (atomically) without the records of iterations
    after ``iteration`` (written by a run that crashed after its last checkpoint) or a torn last line.
    Returns how many lines were dropped."""
    if not path or not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                it = json.loads(line).get("iteration")
            except (ValueError, AttributeError):
                dropped += 1                       # a line torn by the crash
                continue
            if isinstance(it, (int, float)) and it > iteration:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


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
    if optimizer is not None:          # megatron_moba.training.optimizer's interface
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
            raise ConfigurationError(
                f"{path} holds the distributed optimizer's state per data-parallel shard, saved at {flag} "
                f"{saved[key]}: resume at {flag} {saved[key]}, or load the weights only with --no-load-optim; save "
                "with --dist-ckpt-optim-fully-reshardable to change TP/PP")


def _damaged_files(path: str) -> List[str]:
    """The files of checkpoint ``path`` that are missing, or shorter than its ``.metadata`` records."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        meta = FileSystemReader(path).read_metadata()
    except BaseException as e:          # noqa: B036 (torch's CheckpointException is a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return [f"{os.path.join(path, '.metadata')} (unreadable: {type(e).__name__}: {e})"]
    need = {}
    for info in (getattr(meta, "storage_data", None) or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    bad = []
    for rel, size in sorted(need.items()):
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            bad.append(f"{f} (missing)")
        elif os.path.getsize(f) < size:
            bad.append(f"{f} (truncated: {os.path.getsize(f)} bytes, the metadata records at least {size})")
    return bad


def _failure_summary(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if not failures:
        return f"{type(e).__name__}: {e}"
    parts = []
    for rank, failure in sorted(failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    return "; ".join(parts)


def _load_error(root: str, path: str, e: BaseException) -> RuntimeError:
    damaged = _damaged_files(path)
    iteration = int(os.path.basename(path)[len("iter_"):])
    earlier = [i for i in saved_iterations(root) if i < iteration]
    msg = f"could not load checkpoint {path} (--load {root}): "
    msg += ("damaged files: " + ", ".join(damaged) + f" ({_failure_summary(e)})") if damaged else _failure_summary(e)
    if earlier:
        msg += f"; an earlier checkpoint loads with --ckpt-step {earlier[-1]} (saved: {earlier})"
    return RuntimeError(msg)


def _model_flags_of_args(saved: dict) -> dict:
    """flag -> value of the model-shape flags a checkpoint was saved with (flags added since take
    their defaults: the tensors they add cannot be in an older checkpoint)."""
    hidden, heads = saved.get("hidden_size"), saved.get("num_attention_heads")
    return {"--num-layers": saved.get("num_layers"), "--hidden-size": hidden,
            "--ffn-hidden-size": saved.get("ffn_hidden_size") or (4 * hidden if hidden else None),
            "--num-attention-heads": heads, "--num-query-groups": saved.get("num_query_groups") or heads,
            "--kv-channels": saved.get("kv_channels") or (hidden // heads if hidden and heads else None),
            "--add-qkv-bias": bool(saved.get("add_qkv_bias")), "--qk-layernorm": bool(saved.get("qk_layernorm")),
            "--disable-bias-linear": bool(saved.get("disable_bias_linear")), "--swiglu": bool(saved.get("swiglu")),
            "--normalization": saved.get("normalization", "LayerNorm"),
            "--untie-embeddings-and-output-weights": bool(saved.get("untie_embeddings_and_output_weights")),
            "--position-embedding-type": saved.get("position_embedding_type", "rope"),
            "--hybrid-layer-pattern": _model_class(saved.get("hybrid_layer_pattern"))}


def _model_class(pattern) -> str:
    """GPTModel, or the HybridModel's layers (pipeline splits left out: a checkpoint loads at any PP)."""
    from megatron_moba.core.hybrid_pattern import layer_symbols
    return f"{layer_symbols(pattern)!r} (HybridModel)" if pattern else "none (GPTModel)"


def _model_flags_of_model(model) -> dict:
    c = model.config
    return {"--num-layers": c.num_layers, "--hidden-size": c.hidden_size, "--ffn-hidden-size": c.ffn_hidden_size,
            "--num-attention-heads": c.num_attention_heads,
            "--num-query-groups": c.num_query_groups or c.num_attention_heads, "--kv-channels": c.kv_channels,
            "--add-qkv-bias": bool(c.add_qkv_bias), "--qk-layernorm": bool(c.qk_layernorm),
            "--disable-bias-linear": not c.add_bias_linear, "--swiglu": bool(c.gated_linear_unit),
            "--normalization": c.normalization,
            "--untie-embeddings-and-output-weights": not getattr(model, "share_embeddings_and_output_weights", True),
            "--position-embedding-type": getattr(model, "position_embedding_type", "rope"),
            "--hybrid-layer-pattern": _model_class(getattr(c, "hybrid_layer_pattern", None))}


def check_model_flags(path: str, common: dict, model) -> None:
    """Refuse to load ``path`` into a model of another shape than it was saved with.  dist_checkpointing
    loads the tensors the model asks for and ignores the others: without this check a checkpoint with
    q/k/v biases or QK norms (--add-qkv-bias, --qk-layernorm) or an untied output layer would load into
    a model without them, silently dropping those weights."""
    saved = common.get("args")
    if not saved or getattr(model, "config", None) is None:
        return
    was, now = _model_flags_of_args(saved), _model_flags_of_model(model)
    wrong = [f"{flag}: checkpoint {was[flag]!r}, this run {now[flag]!r}" if flag != "--hybrid-layer-pattern"
             else f"{flag}: checkpoint {was[flag]}, this run {now[flag]}" for flag in was
             if was[flag] is not None and was[flag] != now[flag]]
    rows = saved.get("padded_vocab_size")
    if rows and getattr(model, "vocab_size", rows) != rows:
        wrong.append(f"vocabulary (--vocab-size, or the tokenizer's size): checkpoint {rows} rows (padded), this run "
                     f"{model.vocab_size}" + (f"; it was saved with --vocab-size {saved['vocab_size']}"
                                               if saved.get("vocab_size") else ""))
    if wrong:
        raise ConfigurationError(f"{path} was saved with another model than this run builds; pass the checkpoint's "
                                 "model flags: " + "; ".join(wrong))


def _report_rope_changes(path: str, common: dict, args) -> None:
    """Print (rank 0) how this run's RoPE differs from the checkpoint's (a continued-pretraining
    change, or a forgotten flag)."""
    saved = common.get("args") or {}
    if not saved or args is None or dist.get_rank() != 0:
        return
    def rope(a: dict):
        scaled = bool(a.get("use_rope_scaling"))
        return {"--rotary-base": a.get("rotary_base"), "--use-rope-scaling": scaled,
                "--rope-scaling-factor": a.get("rope_scaling_factor") if scaled else None}
    was, now = rope(saved), rope(vars(args))
    lines = [f"  {flag}: checkpoint {was[flag]}, this run {now[flag]}" for flag in was if was[flag] != now[flag]]
    if lines and getattr(args, "position_embedding_type", "rope") == "rope":
        print(f"note: RoPE differs from {path}'s:\n" + "\n".join(lines), flush=True)


def attention_settings(a: dict) -> str:
    """The attention a run trains with, as its flags ("--attention full", or MoBA's block settings)."""
    if a.get("attention", "moba") != "moba":
        return f"--attention {a.get('attention')}"
    text = f"--attention moba --moba-chunk-size {a.get('moba_chunk_size')} --moba-topk {a.get('moba_topk')}"
    if a.get("moba_full_attn_layer_list"):
        return text + " --moba-full-attn-layer-list " + " ".join(map(str, a["moba_full_attn_layer_list"]))
    return text + (f" --moba-full-attn-layers {a['moba_full_attn_layers']}" if a.get("moba_full_attn_layers") else "")


def _report_attention_change(path: str, common: dict, args, finetune: bool) -> None:
    """Print (rank 0) that this run continues ``path`` with other attention than it was trained with
    (MoBA and full attention have the same weights: e.g. the MoBA/full hybrid's switch to full
    attention for the last part of pretraining, or MoBA continued pretraining of a full-attention model)."""
    saved = common.get("args") or {}
    if not saved or args is None or dist.get_rank() != 0:
        return
    was, now = attention_settings(saved), attention_settings(vars(args))
    if was != now:
        keeps = ("its weights only (--finetune)" if finetune else
                 "its weights, optimizer state, LR schedule, data position and random state")
        print(f"note: attention changes: {path} was trained with {was}; this run continues it with {now}, "
              f"keeping {keeps}", flush=True)


# scheduler state -> (flag, value from the command line's args)
_SCHEDULE_FLAGS = {
    "max_lr": ("--lr", lambda a: a.lr),
    "min_lr": ("--min-lr", lambda a: a.min_lr),
    "lr_warmup_steps": ("--lr-warmup-iters", lambda a: a.lr_warmup_iters),
    "lr_decay_steps": ("--lr-decay-iters", lambda a: a.lr_decay_iters or a.train_iters),
    "lr_decay_style": ("--lr-decay-style", lambda a: a.lr_decay_style),
    "start_wd": ("--weight-decay", lambda a: a.weight_decay),
}


def _schedule_differences(saved: dict, args) -> List[tuple]:
    out = []
    for key, (flag, now) in _SCHEDULE_FLAGS.items():
        if key in saved and saved[key] != now(args):
            if key == "lr_decay_steps" and not args.lr_decay_iters:
                flag = "--lr-decay-iters (default: --train-iters)"
            out.append((flag, saved[key], now(args)))
    return out


def _report_overrides(path: str, common: dict, args, optimizer, rng_restored: bool) -> None:
    """Print which command-line flags this resume does not follow (rank 0)."""
    if dist.get_rank() != 0:
        return
    override = getattr(args, "override_opt_param_scheduler", False)
    lines = [f"  {flag}: checkpoint {old}, command line {new}"
             for flag, old, new in _schedule_differences(common.get("scheduler") or {}, args)]
    if lines:
        if override:
            print(f"note: --override-opt_param-scheduler: the LR/WD schedule follows the command line, not {path}:\n"
                  + "\n".join(lines), flush=True)
        else:
            print(f"note: resuming from {path}: the checkpoint's LR/WD schedule is used, not the command line's "
                  "(pass --override-opt_param-scheduler to use the command line's):\n" + "\n".join(
                      line + " (ignored)" for line in lines), flush=True)
    saved_args = common.get("args") or {}
    ignored = []
    if optimizer is not None:      # torch/megatron optimizers restore betas and eps with their state
        group = optimizer.param_groups[0] if optimizer.param_groups else {}
        betas = group.get("betas")
        for i, flag in ((0, "--adam-beta1"), (1, "--adam-beta2")):
            now = getattr(args, flag[2:].replace("-", "_"), None)
            if betas is not None and now is not None and betas[i] != now:
                ignored.append(f"  {flag}: checkpoint {betas[i]}, command line {now} (ignored)")
        if group.get("eps") is not None and getattr(args, "adam_eps", None) not in (None, group["eps"]):
            ignored.append(f"  --adam-eps: checkpoint {group['eps']}, command line {args.adam_eps} (ignored)")
    if rng_restored and saved_args.get("seed") is not None and getattr(args, "seed", None) not in (
            None, saved_args["seed"]):
        ignored.append(f"  --seed: checkpoint {saved_args['seed']}, command line {args.seed} (the random state "
                       "continues from the checkpoint)")
    if ignored:
        print(f"note: resuming from {path}, which overrides:\n" + "\n".join(ignored), flush=True)


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, finetune: bool = False,
                    iteration: Optional[int] = None, args=None, carry: Optional[dict] = None):
    """Load into ``model`` (and optimizer, scheduler, RNG unless ``finetune``/None).
    Returns (iteration, consumed_samples); (0, 0) for ``finetune``.  With ``args`` (the job's
    flags) a resume prints the flags the checkpoint overrides; ``carry`` (a dict) receives the
    checkpoint's entries that every descendant checkpoint keeps (``CARRIED``)."""
    from torch.distributed.checkpoint import CheckpointException
    named_by = os.path.join(root, LATEST) if iteration is None else f"--ckpt-step {iteration}"
    iteration = read_latest(root) if iteration is None else iteration
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint {path} is missing (named by {named_by}); {root} holds the "
                                      f"iterations {saved_iterations(root)}")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_sd = model.sharded_state_dict()
    request = {"model": model_sd}
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except (Exception, CheckpointException) as e:
        raise _load_error(root, path, e) from e
    check_model_flags(path, common, model)
    _report_rope_changes(path, common, args)
    _report_attention_change(path, common, args, finetune)
    if carry is not None:
        carry.update({k: common[k] for k in CARRIED if common.get(k) is not None})
    if not finetune:
        if "scheduler" not in common:
            raise ConfigurationError(f"{path} holds weights only (no optimizer or scheduler): load it with --finetune")
        request["rng"] = _rng_object(rank, world)
        if optimizer is not None:
            saved_impl = common.get("optimizer_impl", "torch")
            if saved_impl != optimizer.impl:
                raise ConfigurationError(f"{path} holds the optimizer state of --optimizer-impl {saved_impl}; resume "
                                         f"with it, or load the weights only with --no-load-optim (or --finetune)")
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
    except (Exception, CheckpointException) as e:      # CheckpointException derives from BaseException
        raise _load_error(root, path, e) from e
    model.load_state_dict(loaded["model"])
    if finetune:
        return 0, 0
    if optimizer is not None and "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
    if args is not None:
        _report_overrides(path, common, args, optimizer if "optimizer" in loaded else None,
                          loaded.get("rng") is not None)
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
    rng = loaded.get("rng")
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    return common["iteration"], common["consumed_samples"]
