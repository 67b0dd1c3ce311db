"""MoBA in megatron-core's HybridModel (``megatron.core.models.hybrid``, megatron-core 0.19+).

    config = MoBATransformerConfig(num_layers=8, hybrid_layer_pattern="*-*-*-*-", ...,
                                   moba_chunk_size=512, moba_topk=3, moba_full_attn_layers=1)
    model = build_moba_hybrid(config, vocab_size=32000, seq_length=32768)

``get_moba_hybrid_stack_spec`` is the stack spec: its ``*`` layers are the attention half of the
GPT layer spec (megatron_moba.core.specs: TE's modules when present, the local ones on CPU) with
``HybridCoreAttention`` in the ``core_attention`` slot, which is MoBA, or full attention in the
layers --moba-full-attn-layers / --moba-full-attn-layer-list name (counted over the ``*`` layers);
its ``-`` layers are the MLP half (megatron's ``MLPLayer``).  The pattern's symbols and the GPT <->
HybridModel weight names: megatron_moba.core.hybrid_pattern.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_moba.core.versions import require_hybrid_model

require_hybrid_model()          # megatron-core < 0.19: an error naming --hybrid-layer-pattern, not an ImportError

from megatron.core import parallel_state  # noqa: E402 (after the check)
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules  # noqa: E402
from megatron.core.models.hybrid.hybrid_model import HybridModel  # noqa: E402
from megatron.core.ssm.mlp_layer import MLPLayer  # noqa: E402
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402

from megatron_moba.core.attention import MoBACoreAttention  # noqa: E402
from megatron_moba.core.config import MoBATransformerConfig, check_seq_length  # noqa: E402
from megatron_moba.core.specs import final_norm_spec, moba_and_full_layer_specs, te_available  # noqa: E402


class HybridCoreAttention:
    """The ``core_attention`` of the stack's attention layers (all built from one spec): MoBA, or the
    full core attention ``full`` where the layer's number among the attention layers is a
    full-attention layer (``MoBATransformerConfig.is_moba_layer``)."""

    def __new__(cls, config: MoBATransformerConfig, layer_number: int, *args, full=None, **kwargs):
        ordinal = config.attention_ordinal(layer_number)
        if ordinal is None:
            raise ValueError(f"layer {layer_number} is not an attention layer of --hybrid-layer-pattern "
                             f"{config.hybrid_layer_pattern!r}")
        module = MoBACoreAttention if config.is_moba_layer(ordinal) else full
        return build_module(module, config, layer_number, *args, **kwargs)


class MoBAHybridStack(HybridStack):
    """megatron's ``HybridStack`` with the final norm from the spec (``final_norm``), so that it runs
    without Transformer Engine (megatron's stack always builds TE's norm)."""

    def __init__(self, config, submodules, *args, post_process: bool = True, post_layer_norm: bool = True,
                 final_norm=None, **kwargs):
        super().__init__(config, submodules, *args, post_process=post_process, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if post_process and post_layer_norm:
            self.final_norm = build_module(final_norm, config=config, hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)


def _halves(layer: ModuleSpec) -> tuple:
    """A GPT ``TransformerLayer`` spec -> (its attention half, its MLP half as an ``MLPLayer``); each
    keeps the checkpoint key mapping of its own norms (the local spec names them as TE's fused ones)."""
    s = layer.submodules
    keys = s.sharded_state_dict_keys_map or {}
    attention = ModuleSpec(module=layer.module, params=dict(layer.params), submodules=dataclasses.replace(
        s, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp,
        sharded_state_dict_keys_map={k: v for k, v in keys.items() if not k.startswith("pre_mlp_layernorm")}))
    mlp = ModuleSpec(module=MLPLayer, submodules=dataclasses.replace(
        s, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp,
        sharded_state_dict_keys_map={k: v for k, v in keys.items() if k.startswith("pre_mlp_layernorm")}))
    return attention, mlp


def get_moba_hybrid_stack_spec(config: MoBATransformerConfig, use_te: Optional[bool] = None) -> ModuleSpec:
    """The HybridModel stack spec for ``config`` (``*`` and ``-`` layers; see the module docstring)."""
    if not isinstance(config, MoBATransformerConfig) or not config.hybrid_layer_pattern:
        raise ValueError("get_moba_hybrid_stack_spec needs a MoBATransformerConfig with a hybrid_layer_pattern "
                         "(--hybrid-layer-pattern)")
    use_te = te_available() if use_te is None else use_te
    moba, full = moba_and_full_layer_specs(config, use_te)
    attention, mlp = _halves(moba)
    full_core = full.submodules.self_attention.submodules.core_attention
    attention.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=HybridCoreAttention, params={"full": full_core})
    return ModuleSpec(module=MoBAHybridStack,
                      submodules=HybridStackSubmodules(attention_layer=attention, mlp_layer=mlp),
                      params={"final_norm": final_norm_spec(config, use_te)})


class MoBAHybridModel(HybridModel):
    """``HybridModel`` plus Llama 3.x RoPE scaling (``rope_scaling``, ``rope_scaling_factor``: GPTModel's
    arguments, which HybridModel does not take)."""

    def __init__(self, *args, rope_scaling: bool = False, rope_scaling_factor: float = 8.0,
                 rotary_percent: float = 1.0, rotary_base: int = 10000, **kwargs):
        super().__init__(*args, rotary_percent=rotary_percent, rotary_base=rotary_base, **kwargs)
        if rope_scaling and self.position_embedding_type == "rope":
            from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=self.config.kv_channels, rotary_percent=rotary_percent, rotary_base=rotary_base,
                rope_scaling=True, rope_scaling_factor=rope_scaling_factor,
                use_cpu_initialization=self.config.use_cpu_initialization, cp_group=self.pg_collection.cp)


def build_moba_hybrid(config: MoBATransformerConfig, vocab_size: int, seq_length: int,
                      use_te: Optional[bool] = None, position_embedding_type: str = "rope",
                      **model_kwargs) -> MoBAHybridModel:
    """A HybridModel for this pipeline stage, built from ``config.hybrid_layer_pattern`` with MoBA in its
    attention layers; ``model_kwargs`` go to ``HybridModel`` (``rotary_base``,
    ``share_embeddings_and_output_weights``, ...) or are ``rope_scaling`` / ``rope_scaling_factor``."""
    check_seq_length(config, seq_length)
    model_kwargs.setdefault("pre_process", parallel_state.is_pipeline_first_stage())
    model_kwargs.setdefault("post_process", parallel_state.is_pipeline_last_stage())
    return MoBAHybridModel(config, get_moba_hybrid_stack_spec(config, use_te), vocab_size=vocab_size,
                           max_sequence_length=seq_length, hybrid_layer_pattern=config.hybrid_layer_pattern,
                           position_embedding_type=position_embedding_type, **model_kwargs)
