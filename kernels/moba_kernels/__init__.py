"""moba_kernels: MoBA (Mixture of Block Attention) ops, independent of Megatron.

Public API::

    moba_attn_varlen(q, k, v, cu_seqlens, max_seqlen, chunk_size, topk, softmax_scale=None, backend=None)
    moba_attn(q, k, v, chunk_size, topk, softmax_scale=None, backend=None)
    moba_select_blocks(q, k, chunk_size, topk, cu_seqlens=None, max_seqlen=None)
    available_backends(device=None)     # the backends usable on a device
    backend_names()                     # every name ``backend=`` accepts
    batch_cu_seqlens(batch, seqlen, device)   # one shared int32 cu_seqlens per shape (layouts cached by it)
    TensorKeyedCache(size)              # host bookkeeping keyed by live tensors (see cache.py)
    clear_caches()                      # empty every cache of the package (and every TensorKeyedCache)

Code outside the package uses these names only (tests/test_import_rules.py checks).
"""
from .api import available_backends, backend_names, batch_cu_seqlens, moba_attn, moba_attn_varlen, moba_select_blocks
from .cache import TensorKeyedCache, clear_caches

__version__ = "0.1.0"
__all__ = ["moba_attn", "moba_attn_varlen", "moba_select_blocks", "available_backends", "backend_names",
           "batch_cu_seqlens", "TensorKeyedCache", "clear_caches", "__version__"]
