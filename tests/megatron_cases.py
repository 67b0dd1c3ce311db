"""Helpers for the megatron-core tests: spawn gloo process groups on CPU, build small GPTs,
load one full set of weights into any TP/PP layout, and run training steps through
megatron's own pipeline schedules with the training job's ``forward_step`` and ``finalize_grads``."""
from __future__ import annotations

import os
import shlex
import tempfile
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_moba.training.parallel import free_port

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0, normalization="RMSNorm",
            moba_chunk_size=8, moba_topk=2, pipeline_dtype=torch.float32)
VOCAB, SEQ = 128, 32


def _worker(rank, world, port, outdir, fn, args, tp, pp, cp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    warnings.filterwarnings("ignore")     # megatron warns about absent TE/apex at every import
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from megatron_moba.training.compat import apply_patches
    from megatron_moba.training.parallel import initialize_distributed
    apply_patches()                       # each spawned process is an entry point: the CPU shims
    initialize_distributed(SimpleNamespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                           context_parallel_size=cp, seed=0))
    try:
        result = fn(*args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn, *args, tp=1, pp=1, cp=1, dp=1):
    """Run fn(*args) on tp*pp*cp*dp CPU processes; returns each rank's result."""
    world = tp * pp * cp * dp
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world, free_port(), outdir, fn, args, tp, pp, cp), nprocs=world, join=True)
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=True) for r in range(world)]


def make_config(**overrides):
    from megatron.core import parallel_state as ps

    from megatron_moba.core.config import MoBATransformerConfig
    kw = dict(BASE, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
              pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
              context_parallel_size=ps.get_context_parallel_world_size())
    kw.update(overrides)
    return MoBATransformerConfig(**kw)


def build_gpt(config, seed=1234):
    """A GPT, or with ``config.hybrid_layer_pattern`` a HybridModel (megatron-core 0.19+)."""
    torch.manual_seed(seed)
    if config.hybrid_layer_pattern:
        from megatron_moba.core.hybrid import build_moba_hybrid
        return build_moba_hybrid(config, vocab_size=VOCAB, seq_length=SEQ, use_te=False,
                                 share_embeddings_and_output_weights=False)
    from megatron_moba import build_moba_gpt
    return build_moba_gpt(config, vocab_size=VOCAB, seq_length=SEQ, use_te=False,
                          share_embeddings_and_output_weights=False)


def _global_name(name: str, offset: int) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + offset)
    return ".".join(parts)


def _layer_offset(model) -> int:
    """Global number - 1 of this stage's first layer (GPT and HybridModel layers carry global numbers)."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _to_gpt_names(model, named: dict) -> dict:
    """A HybridModel's global names -> GPT names (pattern '*-' x L), so that runs of both compare."""
    if getattr(model.config, "hybrid_layer_pattern", None):
        from megatron_moba.core.hybrid_pattern import hybrid_to_gpt
        return hybrid_to_gpt(named)
    return named


def load_full_weights(model, full: dict):
    """Copy this rank's TP slice of each of its (pipeline-local) parameters from a full state dict
    (GPT names; a HybridModel of pattern '*-' x L takes them through the GPT <-> hybrid mapping)."""
    from megatron.core import parallel_state as ps
    if getattr(model.config, "hybrid_layer_pattern", None):
        from megatron_moba.core.hybrid_pattern import gpt_to_hybrid
        full = gpt_to_hybrid(full)
    offset = _layer_offset(model)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = full[_global_name(name, offset)]
            if getattr(p, "tensor_model_parallel", False):
                w = w.chunk(tp, dim=p.partition_dim)[rank]
            p.copy_(w)


def full_grads(model) -> dict:
    """Gradients by global parameter name (GPT names, also for a HybridModel), TP shards gathered."""
    from megatron.core import parallel_state as ps
    offset = _layer_offset(model)
    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[_global_name(name, offset)] = g
    return _to_gpt_names(model, out)


def batches(steps, micro, mbs=2, seed=7):
    """Micro-batches in the training job's format (what megatron's GPTDataset yields): full
    sequences; production ``forward_step`` takes each CP rank's chunks itself."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (steps, micro, mbs, SEQ + 1), generator=g)
    pos = torch.arange(SEQ)[None].expand(mbs, -1)
    return [[dict(tokens=t[:, :-1], labels=t[:, 1:], position_ids=pos.clone(),
                  loss_mask=torch.ones(mbs, SEQ, dtype=torch.float)) for t in step] for step in tokens]


def train(config_overrides, full_weights, steps=3, micro=2, lr=1e-2):
    """Run `steps` optimizer steps through megatron's schedule with the training job's own
    ``forward_step`` and gradient reduction (``parallel.finalize_grads``); returns the losses
    (last stage) and the gradients of the first step.  A step's loss is the masked token mean over
    its micro-batches and the CP group (the sums production's loss function reports)."""
    from functools import partial

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_moba.training.parallel import finalize_grads
    from megatron_moba.training.tokenizer import build_tokenizer
    from megatron_moba.training.trainer import forward_step
    config = make_config(**config_overrides)
    model = build_gpt(config)
    load_full_weights(model, full_weights)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    fb = get_forward_backward_func()
    step_fn = partial(forward_step, eod=build_tokenizer("NullTokenizer", vocab_size=VOCAB).eod,
                      document_attention=False)                  # as Trainer builds it
    losses, first_grads = [], None
    cp, cp_group = ps.get_context_parallel_world_size(), ps.get_context_parallel_group()
    for step in batches(steps, micro):
        opt.zero_grad()
        out = fb(forward_step_func=step_fn, data_iterator=iter(step), model=[model],
                 num_microbatches=micro, seq_length=SEQ // cp, micro_batch_size=2, forward_only=False)
        finalize_grads(model)
        if ps.is_pipeline_last_stage():
            stats = torch.stack([torch.stack([o["loss_sum"].double(), o["tokens"].double()]) for o in out]).sum(0)
            if cp > 1:
                dist.all_reduce(stats, group=cp_group)
            losses.append((stats[0] / stats[1]).item())
        if first_grads is None:
            first_grads = full_grads(model)
        opt.step()
    return dict(losses=losses, grads=first_grads)


def reference_weights(config_overrides=None, seed=1234):
    """Full weights of a single-process model (run inside a 1-process group)."""
    model = build_gpt(make_config(**(config_overrides or {})), seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def reference_run(config_overrides, steps=3, micro=2):
    full = reference_weights(config_overrides)
    return dict(weights=full, **train(config_overrides, full, steps, micro))



TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "64", "--moba-chunk-size", "16", "--moba-topk", "2", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "6", "--lr", "3e-3", "--lr-warmup-iters", "1",
        "--mock-data", "--vocab-size", "200", "--normalization", "RMSNorm", "--disable-bias-linear",
        "--log-interval", "1", "--untie-embeddings-and-output-weights"]


def run_pretrain(argv):
    """The job's own entry (arguments + Trainer) inside an already initialized process group."""
    from megatron_moba.training.arguments import parse_args
    from megatron_moba.training.trainer import pretrain
    return pretrain(parse_args(list(argv), world_size=dist.get_world_size()))


def crash_during_save(argv):
    """Run, with the checkpoint writer failing half-way through the save; report what is left."""
    from megatron_moba.training import checkpointing
    real_save = checkpointing.dist_checkpointing.save

    def broken_save(state, path, *a, **k):
        open(os.path.join(path, "partial.bin"), "wb").write(b"half a checkpoint")
        raise OSError("disk full (simulated)")
    checkpointing.dist_checkpointing.save = broken_save
    try:
        run_pretrain(argv)
        return "no error"
    except OSError as e:
        return str(e)
    finally:
        checkpointing.dist_checkpointing.save = real_save


def assert_cli_rejects(extra, text, capsys):
    """``parse_args(TINY + extra)`` exits with an error message containing ``text``."""
    import pytest

    from megatron_moba.training.arguments import parse_args
    with pytest.raises(SystemExit):
        parse_args(TINY + extra, world_size=1)
    assert text in capsys.readouterr().err


def run_pretrain_error(argv, kind: str = "RuntimeError"):
    """run_pretrain, returning the message of the builtin exception ``kind`` instead of raising it."""
    import builtins
    try:
        run_pretrain(argv)
        return "no error"
    except getattr(builtins, kind) as e:
        return str(e)


def hf_logits_in_megatron(hf_dir, ckpt, tokens, flags=()):
    """Logits of the imported checkpoint (--finetune load) at this run's TP, gathered over the vocabulary."""
    from megatron.core import parallel_state as ps

    from megatron_moba.hf.convert import _build, read_hf_config
    from megatron_moba.training.checkpointing import load_checkpoint
    tp = ps.get_tensor_model_parallel_world_size()
    model, _ = _build(read_hf_config(hf_dir), ["--tensor-model-parallel-size", str(tp), *flags],
                      world_size=dist.get_world_size())
    load_checkpoint(ckpt, model, finetune=True)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1])[None], attention_mask=None)
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def trainer_dtypes(argv):
    """(dtypes of the model's weights, dtypes of the optimizer's main weights) after two steps."""
    from megatron_moba.training.arguments import parse_args
    from megatron_moba.training.trainer import Trainer
    trainer = Trainer(parse_args(list(argv), world_size=dist.get_world_size()))
    losses = trainer.train()
    groups = trainer.optimizer.optimizer.param_groups
    main = sorted({str(p.dtype) for g in groups for p in g["params"]})
    return sorted({str(p.dtype) for p in trainer.model.parameters()}), main, losses


# ---------------------------------------------------------------- HF families (tests/hf/test_hf_families.py)
HF_JOB = ["--seq-length", "64", "--moba-chunk-size", "16", "--moba-topk", "2", "--micro-batch-size", "2",
          "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-3", "--lr-warmup-iters", "1", "--mock-data",
          "--log-interval", "1"]


def edit_flags(flags, drop=(), add=()):
    """``flags`` without the flags in ``drop`` (with their values), then ``add`` ([flag, value] pairs or
    lone switches) replacing or appending."""
    out, i = [], 0
    while i < len(flags):
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        if flags[i] in drop:
            i += 2 if takes_value else 1
            continue
        out.append(flags[i])
        i += 1
    for item in add:
        flag, *value = item if isinstance(item, (list, tuple)) else [item]
        if flag in out and value:
            out[out.index(flag) + 1] = value[0]
        elif flag not in out:
            out += [flag, *value]
    return out


def job_logits(flags, load, tokens, attention="full"):
    """Logits of checkpoint ``load`` (--finetune load) in the model the pretraining job builds from
    ``flags``, tokenizer included (with full attention unless ``attention``)."""
    from megatron_moba.training.arguments import parse_args
    from megatron_moba.training.checkpointing import load_checkpoint
    from megatron_moba.training.model import build_model
    from megatron_moba.training.tokenizer import build_tokenizer
    n = tokens.shape[1]
    args = parse_args(list(flags) + ["--seq-length", str(n), "--train-iters", "1", "--mock-data", "--attention",
                                     attention], world_size=dist.get_world_size())
    model = build_model(args, build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size))
    load_checkpoint(load, model, finetune=True, args=args)
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(n)[None], attention_mask=None)


def hf_family_chain(d, tokens, changes, variants, import_flags=(), train=True):
    """The continued-pretraining chain of one HF model in ``d``/hf: the tool's import (its printed flags),
    the imported logits, each variant (flags dropped/added: its load error or its logits), the export
    without training, then (``train``) ``--finetune`` steps with MoBA under the printed flags +
    ``changes``, the export of that run and its logits (full attention, and MoBA on 64 tokens)."""
    import contextlib
    import io

    from megatron_moba.hf.convert import run_export, run_import
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_import(f"{d}/hf", f"{d}/mg", *import_flags)
    flags = shlex.split(printed.getvalue().split("--finetune ")[1].splitlines()[0])     # as a shell reads it
    out = {"printed": flags, "imported": job_logits(flags, f"{d}/mg", tokens)}
    for name, (drop, add) in variants.items():
        try:
            out[name] = job_logits(edit_flags(flags, drop, add), f"{d}/mg", tokens)
        except ValueError as e:
            out[name] = str(e)
    run_export(f"{d}/mg", f"{d}/back")
    if not train:
        return out
    trained = edit_flags(flags, add=changes)
    out["losses"] = run_pretrain(trained + HF_JOB + ["--load", f"{d}/mg", "--finetune", "--save", f"{d}/run"])
    run_export(f"{d}/run", f"{d}/out")
    out["trained"] = job_logits(trained, f"{d}/run", tokens)
    out["trained_moba"] = job_logits(trained + HF_JOB[2:6], f"{d}/run", tokens[:, :64], "moba")    # chunk 16, top-2
    return out
