"""megatron_moba: MoBA attention for megatron-core.

The attention op itself lives in ``moba_kernels`` (no Megatron dependency); this
package adapts it to Megatron's layouts, layer specs, training loop and tools.
"""
import moba_kernels

__version__ = moba_kernels.__version__
