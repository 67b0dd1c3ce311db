"""Hugging Face interop: checkpoint conversion (``convert``) and MoBA as a transformers attention
implementation (``attention``).

    import megatron_moba.hf          # registers attn_implementation="moba" when transformers is installed
"""
from importlib.util import find_spec

if find_spec("transformers") is not None:
    from megatron_moba.hf.attention import register as _register
    _register()
