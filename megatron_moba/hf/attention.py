"""MoBA as an attention implementation for Hugging Face transformers (inference).

    import megatron_moba.hf                                # registers "moba" (with transformers installed)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba")
    model.config.moba_chunk_size, model.config.moba_topk = 4096, 12

Prefill and cached decoding both run MoBA: new queries attend at their absolute positions
(``moba_attn_varlen(..., q_positions=...)``).  ``config.moba_full_attn_layers`` (0-based layer
indices, as the export writes it from --moba-full-attn-layers / --moba-full-attn-layer-list) keeps
those layers on full causal attention (transformers' sdpa), like the megatron model.  Sequences
in a batch must have equal length: padding masks are rejected rather than ignored.
"""
from __future__ import annotations

import torch

from moba_kernels import moba_attn_varlen


def moba_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [b, Hq, q_len, d], key/value [b, Hkv, k_len, d] -> ([b, q_len, Hq, d], None)."""
    cfg = module.config
    chunk, topk = getattr(cfg, "moba_chunk_size", None), getattr(cfg, "moba_topk", None)
    if chunk is None or topk is None:
        raise ValueError("attn_implementation='moba' needs config.moba_chunk_size and config.moba_topk")
    if dropout:
        raise ValueError("MoBA attention has no dropout (attention_dropout must be 0)")
    if getattr(module, "layer_idx", None) in (getattr(cfg, "moba_full_attn_layers", None) or ()):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    b, hq, q_len, d = query.shape
    k_len = key.shape[2]
    if attention_mask is not None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        if not torch.equal(allowed[:, :, :, :k_len].expand(b, -1, q_len, k_len)[:, 0],
                           causal.expand(b, q_len, k_len)):
            raise ValueError("MoBA attention supports causal masks only (no padding): use equal-length sequences")
    q = query.transpose(1, 2).reshape(b * q_len, hq, d)
    k = key.transpose(1, 2).reshape(b * k_len, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * k_len, value.shape[1], d)
    cu = torch.arange(b + 1, dtype=torch.int32, device=query.device) * k_len
    positions = None
    if q_len != k_len:   # cached decoding: the new queries sit at the end of each sequence
        positions = (torch.arange(b, device=query.device)[:, None] * k_len + (k_len - q_len)
                     + torch.arange(q_len, device=query.device)[None, :]).flatten()
    out = moba_attn_varlen(q, k, v, cu, k_len, chunk, topk, softmax_scale=scaling, q_positions=positions)
    return out.view(b, q_len, hq, d), None


def register() -> None:
    """Register ``attn_implementation="moba"`` with transformers (``import megatron_moba.hf`` does it)."""
    from transformers import AttentionInterface
    AttentionInterface.register("moba", moba_attention)
    try:   # transformers >= 4.53 builds masks per implementation: MoBA takes the sdpa-style mask
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        ALL_MASK_ATTENTION_FUNCTIONS.register("moba", sdpa_mask)
    except ImportError:
        pass

