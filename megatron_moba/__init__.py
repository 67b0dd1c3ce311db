"""megatron_moba: MoBA attention for megatron-core.

The attention op itself lives in ``moba_kernels`` (no Megatron dependency); this
package adapts it to Megatron's layouts, layer specs, parallelism and training, in four
subpackages (one dependency direction: core <- training <- eval; hf uses core and training)::

    megatron_moba.core       the megatron-core layer (config, specs, attention, model, layouts, CP)
    megatron_moba.training   the pretraining job (flags, loop, parallelism, optimizer, checkpoints, data)
    megatron_moba.eval       checkpoint evaluation (positional loss, needle, block selection, scaling)
    megatron_moba.hf         Hugging Face conversion and attention implementation


    from megatron_moba import MoBATransformerConfig, build_moba_gpt, get_moba_decoder_block_spec
    from megatron_moba import build_moba_hybrid, get_moba_hybrid_stack_spec    # HybridModel (megatron-core 0.19+)
"""
from importlib import import_module

# Exports load on first use (PEP 562): importing a light submodule (the job's arguments, for
# `--help`) does not import torch and megatron-core.
_EXPORTS = {"MoBATransformerConfig": ".core.config", "build_moba_gpt": ".core.model",
            "get_moba_decoder_block_spec": ".core.specs", "get_moba_layer_specs": ".core.specs",
            "build_moba_hybrid": ".core.hybrid", "get_moba_hybrid_stack_spec": ".core.hybrid"}
__all__ = ["MoBATransformerConfig", "build_moba_gpt", "get_moba_decoder_block_spec", "get_moba_layer_specs",
           "build_moba_hybrid", "get_moba_hybrid_stack_spec"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    if name == "__version__":
        return import_module("moba_kernels").__version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS) + ["__version__"])
