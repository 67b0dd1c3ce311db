"""Model FLOPs of a training iteration, counting only the attention MoBA really computes.

Forward FLOPs per token (matmuls only, 2 FLOPs per multiply-add), backward = 2x forward:
  QKV and output projections, the MLP (3 matrices with SwiGLU, 2 without), the logits, and
  attention: 4 * head_dim * heads * (keys the query attends).  A HybridModel (--hybrid-layer-pattern)
  counts its attention (``*``) and MLP (``-``) layers separately.
"""
from __future__ import annotations

from typing import Optional

import torch


def mean_attended_keys(seq_length: int, chunk_size: Optional[int] = None, topk: Optional[int] = None) -> float:
    """Average keys per query over one causal sequence: full attention when chunk_size is None,
    else MoBA (own block up to the query, plus min(topk - 1, earlier blocks) full blocks)."""
    s = seq_length
    if chunk_size is None:
        return (s + 1) / 2
    t = torch.arange(s, dtype=torch.float64)
    block = torch.div(t, chunk_size, rounding_mode="floor")
    keys = (t - block * chunk_size + 1) + torch.clamp(block, max=topk - 1) * chunk_size
    return float(keys.mean())


def flops_per_iteration(args, config) -> float:
    """Model FLOPs of one optimizer step (forward + backward) of the whole global batch."""
    h, layers, s = args.hidden_size, args.num_layers, args.seq_length
    heads = args.num_attention_heads
    head_dim = h // heads
    groups = args.num_query_groups or heads
    ffn = args.ffn_hidden_size or 4 * h
    vocab = getattr(args, "padded_vocab_size", None) or args.vocab_size or 0
    dense = 2 * h * (h + 2 * groups * head_dim) + 2 * h * h + 2 * h * ffn * (3 if args.swiglu else 2)
    moba_keys = mean_attended_keys(s, args.moba_chunk_size, args.moba_topk)
    full_keys = mean_attended_keys(s)
    from megatron_moba.core.hybrid_pattern import layer_counts
    attention_layers, mlp_layers = layer_counts(layers, getattr(args, "hybrid_layer_pattern", None))
    attention = sum(4 * head_dim * heads * (moba_keys if config.is_moba_layer(n) else full_keys)
                    for n in range(1, attention_layers + 1))
    projections = 2 * h * (h + 2 * groups * head_dim) + 2 * h * h
    per_token = attention_layers * projections + mlp_layers * (dense - projections) + attention + 2 * h * vocab
    return 3.0 * per_token * args.global_batch_size * s


def peak_tflops() -> Optional[float]:
    """Dense bf16 peak of the local GPU for MFU, where known."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0)):
        if key in name:
            return value
    return None


def memory_gib() -> float:
    """Peak GPU memory allocated, or this process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil
    return psutil.Process().memory_info().rss / 2**30
