"""megatron_moba: MoBA attention for megatron-core.

The attention op itself lives in ``moba_kernels`` (no Megatron dependency); this
package adapts it to Megatron's layouts, layer specs, parallelism and training::

    from megatron_moba import MoBATransformerConfig, build_moba_gpt, get_moba_decoder_block_spec
"""
import moba_kernels

from .config import MoBATransformerConfig
from .model import build_moba_gpt
from .specs import get_moba_decoder_block_spec, get_moba_layer_specs

__version__ = moba_kernels.__version__
__all__ = ["MoBATransformerConfig", "build_moba_gpt", "get_moba_decoder_block_spec", "get_moba_layer_specs"]
