"""Layer specs: megatron-core's GPT layer specs with MoBA in the ``core_attention`` slot.

    from megatron_moba.core.specs import get_moba_decoder_block_spec
    block_spec = get_moba_decoder_block_spec(config)            # config: MoBATransformerConfig
    model = GPTModel(config, block_spec, vocab_size, max_sequence_length)

MoBA layers get ``MoBACoreAttention``; full-attention layers (``--moba-full-attn-layers``,
``--moba-full-attn-layer-list``, or ``--attention full``) keep the stock core attention of
the chosen spec: Transformer Engine's on GPU, ``FullCoreAttention`` in the local spec
(megatron's local ``DotProductAttention`` needs CUDA).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_moba.core.attention import FullCoreAttention, MoBACoreAttention
from megatron_moba.core.config import MoBATransformerConfig
from megatron_moba.core.errors import ConfigurationError


def te_available() -> bool:
    return bool(gpt_layer_specs.HAVE_TE) and torch.cuda.is_available()


def _stock_layer_spec(config: MoBATransformerConfig, use_te: bool) -> ModuleSpec:
    common = dict(num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
                  qk_layernorm=config.qk_layernorm)
    if use_te:
        if not gpt_layer_specs.HAVE_TE:
            raise ConfigurationError("use_te=True needs Transformer Engine (pip install -e '.[gpu]', or NVIDIA's "
                                     "PyTorch container); use_te=False builds the local (CPU-capable) spec")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization, **common)


class SequenceParallelTorchNorm:
    """torch's LayerNorm/RMSNorm for the local spec under --sequence-parallel.

    megatron's ``WrappedTorchNorm`` refuses sequence parallelism; the norm itself is the same
    per token, only its weight gradients are partial per TP rank, so the parameters are
    marked ``sequence_parallel`` for megatron's grad finalization to all-reduce (as its
    fused norms do)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ConfigurationError(f"--normalization {config.normalization} is not supported by the local spec "
                                     f"with --sequence-parallel; use LayerNorm or RMSNorm")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def _local_sp_norms(spec: ModuleSpec, qk_layernorm: bool = False) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    if qk_layernorm:      # per-head norms (--qk-layernorm): their gradients are also summed over the TP group
        spec.submodules.self_attention.submodules.q_layernorm = SequenceParallelTorchNorm
        spec.submodules.self_attention.submodules.k_layernorm = SequenceParallelTorchNorm
    return spec


def _with_core_attention(layer_spec: ModuleSpec, module) -> ModuleSpec:
    spec = copy.deepcopy(layer_spec)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=module)
    return spec


def moba_and_full_layer_specs(config: MoBATransformerConfig, use_te: bool) -> tuple:
    """(MoBA layer spec, full-attention layer spec): megatron's GPT ``TransformerLayer`` spec with
    MoBA, or the full core attention (TE's on GPU, ``FullCoreAttention`` in the local spec)."""
    if not isinstance(config, MoBATransformerConfig):
        raise TypeError("MoBA layer specs need a MoBATransformerConfig (megatron_moba.core.config)")
    if config.multi_latent_attention:
        raise ConfigurationError("MoBA layer specs support standard multi-head/GQA attention, "
                                 "not --multi-latent-attention")
    stock = _stock_layer_spec(config, use_te)
    if config.sequence_parallel and not use_te:
        stock = _local_sp_norms(stock, config.qk_layernorm)
    moba = _with_core_attention(stock, MoBACoreAttention)
    full = stock if use_te else _with_core_attention(stock, FullCoreAttention)
    return moba, full


def final_norm_spec(config: MoBATransformerConfig, use_te: bool):
    """The norm after the last layer: TE's own with TE (its layers fuse their input norms), else the local
    spec's (``SequenceParallelTorchNorm`` under --sequence-parallel)."""
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
        return TESpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
    if config.sequence_parallel:
        return SequenceParallelTorchNorm
    return _stock_layer_spec(config, use_te).submodules.input_layernorm


def get_moba_layer_specs(config: MoBATransformerConfig, use_te: Optional[bool] = None) -> list:
    """One ``TransformerLayer`` spec per layer of the whole model (layer ``i`` is number ``i + 1``)."""
    if not isinstance(config, MoBATransformerConfig):
        raise TypeError("get_moba_layer_specs needs a MoBATransformerConfig (megatron_moba.core.config)")
    if config.hybrid_layer_pattern:
        raise ValueError("this config has a --hybrid-layer-pattern: it describes a HybridModel "
                         "(megatron_moba.core.hybrid.build_moba_hybrid), not a GPT")
    use_te = te_available() if use_te is None else use_te
    moba, full = moba_and_full_layer_specs(config, use_te)
    return [moba if config.is_moba_layer(n) else full for n in range(1, config.num_layers + 1)]


def get_moba_decoder_block_spec(config: MoBATransformerConfig, use_te: Optional[bool] = None,
                                vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
                                ) -> TransformerBlockSubmodules:
    """The decoder block spec of this pipeline stage (as megatron's own block-spec builders)."""
    specs = get_moba_layer_specs(config, use_te)
    use_te = te_available() if use_te is None else use_te
    if config.pipeline_model_parallel_layout is not None:
        from megatron.core.transformer.enums import LayerType
        local = config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank))
    return TransformerBlockSubmodules(layer_specs=[specs[i] for i in local], layer_norm=final_norm_spec(config, use_te))
