"""moba_kernels: MoBA (Mixture of Block Attention) ops, independent of Megatron.

Public API::

    moba_attn_varlen(q, k, v, cu_seqlens, max_seqlen, chunk_size, topk, softmax_scale=None, backend=None)
    moba_attn(q, k, v, chunk_size, topk, softmax_scale=None, backend=None)
    moba_select_blocks(q, k, chunk_size, topk, cu_seqlens=None, max_seqlen=None)
    available_backends(device=None)
"""
from .api import available_backends, moba_attn, moba_attn_varlen, moba_select_blocks

__version__ = "0.1.0"
__all__ = ["moba_attn", "moba_attn_varlen", "moba_select_blocks", "available_backends", "__version__"]
