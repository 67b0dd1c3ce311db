"""A GPTModel checkpoint of the job -> the HybridModel checkpoint with the same weights (megatron-core 0.19+).

    python tools/convert_gpt_to_hybrid.py --load ckpt/gpt_run --save ckpt/hybrid
    #   then: ... -m megatron_moba.pretrain --load ckpt/hybrid --finetune <the run's flags> \\
    #             --num-layers 2L --hybrid-layer-pattern '*-*-...'   (printed)

A GPT of L layers is the HybridModel of pattern ``*-`` x L (``--num-layers 2L``); the weights are
renamed by ``megatron_moba.core.hybrid_pattern.gpt_to_hybrid`` and saved weights-only at iteration 0
(as an HF import), to continue with ``--finetune``: the optimizer state does not carry over (its
sharded keys are the model class's).  Same loss and gradients as the GPT (tests/training/test_hybrid_job.py).
"""
from __future__ import annotations

import argparse
import copy
import os
from types import SimpleNamespace
from typing import List, Optional

import torch

from megatron_moba.core import hybrid_pattern


def gpt_checkpoint_to_hybrid(load_dir: str, save_dir: str, iteration: Optional[int] = None) -> List[str]:
    """Convert checkpoint ``load_dir`` (its latest iteration, or ``iteration``) into ``save_dir`` (new or
    empty), in this process's (single-rank) process group; returns the flags that change: ``--num-layers
    2L --hybrid-layer-pattern '*-' x L``.  The MoBA flags keep their meaning (counted over attention layers)."""
    from megatron.core import dist_checkpointing

    from megatron_moba.core.versions import require_hybrid_model
    from megatron_moba.training.arguments import flag_defaults
    from megatron_moba.training.checkpointing import (
        CARRIED,
        checkpoint_dir,
        load_checkpoint,
        read_latest,
        save_checkpoint,
    )
    from megatron_moba.training.model import build_model
    from megatron_moba.training.parallel import initialize_distributed
    require_hybrid_model("the HybridModel checkpoint")
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        raise FileExistsError(f"--save {save_dir} is not an empty directory: convert into a new or empty one")
    path = checkpoint_dir(load_dir, read_latest(load_dir) if iteration is None else iteration)
    common = dist_checkpointing.load_common_state_dict(path)
    saved = common.get("args")
    if not saved:
        raise ValueError(f"{path} does not record the flags it was trained with (not saved by megatron_moba's job)")
    if saved.get("hybrid_layer_pattern"):
        raise ValueError(f"{path} is a HybridModel checkpoint already (--hybrid-layer-pattern "
                         f"{saved['hybrid_layer_pattern']!r})")
    args = argparse.Namespace(**{**flag_defaults(), **saved})
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = args.context_parallel_size = 1
    args.sequence_parallel = False
    initialize_distributed(args)
    rows = SimpleNamespace(vocab_size=args.padded_vocab_size)       # the checkpoint's rows (already padded)
    gpt = build_model(args, rows)
    load_checkpoint(load_dir, gpt, finetune=True, iteration=iteration)
    layers = args.num_layers
    hybrid_args = copy.copy(args)
    hybrid_args.num_layers, hybrid_args.hybrid_layer_pattern = 2 * layers, hybrid_pattern.gpt_pattern(layers)
    hybrid = build_model(hybrid_args, rows)
    weights = hybrid_pattern.gpt_to_hybrid(dict(gpt.named_parameters()))
    params = dict(hybrid.named_parameters())
    if sorted(weights) != sorted(params):
        raise ValueError(f"GPT -> HybridModel name mismatch: {sorted(set(weights) ^ set(params))[:6]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    save_checkpoint(save_dir, 0, hybrid, None, None, 0, hybrid_args,
                    extra={k: common[k] for k in CARRIED if common.get(k) is not None})
    return ["--num-layers", str(2 * layers), "--hybrid-layer-pattern", hybrid_args.hybrid_layer_pattern]
