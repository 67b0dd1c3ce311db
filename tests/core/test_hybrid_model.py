"""MoBA in megatron-core's HybridModel (0.19+) on CPU: a GPT of L layers and the HybridModel of pattern
'*-' x L with the same weights give the same loss and gradients (three training steps through megatron's
schedules), in one process and under TP=2, TP=2 + SP, CP=2 and PP=2; full-attention layers are chosen
over the attention layers; bad patterns name the flag.  On a megatron-core without HybridModel the model
tests skip, and the flag fails naming itself."""
import pytest
import torch

import megatron_cases as mc
from megatron_moba.core.versions import hybrid_model_available, installed_version

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
needs_hybrid = pytest.mark.skipif(not hybrid_model_available(),
                                  reason=f"megatron-core {installed_version()} has no HybridModel "
                                         "(megatron.core.models.hybrid, 0.19+)")

GPT = dict(moba_full_attn_layers=1)         # 2 layers: layer 1 MoBA (chunk 8, top-2 of 4 blocks), layer 2 full
TOL = 1e-5


def _hybrid(over, pattern="*-*-"):
    return dict(over, num_layers=4, hybrid_layer_pattern=pattern)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _gpt_and_hybrid(over, pattern="*-*-", weights=None):
    """Train the GPT and the HybridModel from the same (GPT-named) weights in this process group;
    gradients come back in GPT names for both."""
    weights = mc.reference_weights(over) if weights is None else weights
    return dict(weights=weights, gpt=mc.train(over, weights), hybrid=mc.train(_hybrid(over, pattern), weights))


def _assert_equal_runs(hybrid, gpt):
    assert len(hybrid["losses"]) == len(gpt["losses"])
    for a, b in zip(hybrid["losses"], gpt["losses"]):
        assert abs(a - b) / abs(b) < TOL, (hybrid["losses"], gpt["losses"])
    assert sorted(hybrid["grads"]) == sorted(gpt["grads"])
    for name, g in gpt["grads"].items():
        assert _rel(hybrid["grads"][name], g) < TOL, name


def _core_attention_kinds():
    """Pattern '*--*-*' (3 attention layers), last attention layer and attention layer 1 full."""
    model = mc.build_gpt(mc.make_config(num_layers=6, hybrid_layer_pattern="*--*-*", moba_full_attn_layers=1,
                                        moba_full_attn_layer_list=[1]))
    return [type(getattr(layer.self_attention, "core_attention", None)).__name__ for layer in model.decoder.layers]


def _rotary(over, **kwargs):
    from megatron_moba.core.hybrid import build_moba_hybrid
    from megatron_moba.core.model import build_moba_gpt
    build = build_moba_hybrid if over.get("hybrid_layer_pattern") else build_moba_gpt
    model = build(mc.make_config(**over), mc.VOCAB, mc.SEQ, use_te=False, rotary_base=500000, **kwargs)
    return model.rotary_pos_emb(4096)


def _single_process():
    scaled = dict(rope_scaling=True, rope_scaling_factor=16.0)       # Llama 3.x RoPE scaling (--use-rope-scaling)
    rope = dict(gpt=_rotary({}, **scaled), hybrid=_rotary(_hybrid({}), **scaled), unscaled=_rotary(_hybrid({})))
    return dict(_gpt_and_hybrid(GPT), kinds=_core_attention_kinds(), rope=rope)


@pytest.fixture(scope="module")
def single():
    return mc.run_distributed(_single_process)[0]


@needs_hybrid
def test_hybrid_equals_gpt_single_process(single):
    _assert_equal_runs(single["hybrid"], single["gpt"])


@needs_hybrid
def test_full_attention_layers_are_counted_over_attention_layers(single):
    assert single["kinds"] == ["FullCoreAttention", "NoneType", "NoneType", "MoBACoreAttention", "NoneType",
                               "FullCoreAttention"]


@needs_hybrid
def test_rope_scaling_reaches_the_hybrid_model(single):
    rope = single["rope"]
    assert torch.equal(rope["hybrid"], rope["gpt"]) and not torch.equal(rope["unscaled"], rope["gpt"])


@needs_hybrid
@pytest.mark.parametrize("layout,over,pattern", [
    (dict(tp=2), {}, "*-*-"),
    (dict(tp=2), {"sequence_parallel": True}, "*-*-"),
    (dict(cp=2), {}, "*-*-"),
    (dict(pp=2), {}, "*-|*-"),
], ids=["tp2", "tp2_sp", "cp2", "pp2"])
def test_hybrid_equals_gpt_under_parallelism(single, layout, over, pattern):
    for rank in mc.run_distributed(_gpt_and_hybrid, dict(GPT, **over), pattern, single["weights"], **layout):
        _assert_equal_runs(rank["hybrid"], rank["gpt"])
        if layout.get("pp") is None:     # every rank has the whole model: the same losses as one process
            for a, b in zip(rank["gpt"]["losses"], single["gpt"]["losses"]):
                assert abs(a - b) / b < 1e-4


# ---------------------------------------------------------------- configuration (no model: every megatron-core)
@pytest.mark.parametrize("over,text", [
    (dict(hybrid_layer_pattern="*M*-", num_layers=4), r"'M' \(Mamba\) is not supported with MoBA"),
    (dict(hybrid_layer_pattern="*E*E", num_layers=4), r"'E' \(mixture of experts\)"),
    (dict(hybrid_layer_pattern="*-*-/*-", num_layers=4), r"'/' \(multi-token prediction\)"),
    (dict(hybrid_layer_pattern="*-x-", num_layers=4), "'x' is not supported"),
    (dict(hybrid_layer_pattern="*-*-", num_layers=2), r"has 4 layers, but --num-layers is 2"),
    (dict(hybrid_layer_pattern="----", num_layers=4), r"has no attention layer"),
    (dict(hybrid_layer_pattern="*-|*-", num_layers=4), r"2 pipeline segments .* --pipeline-model-parallel-size is 1"),
    (dict(hybrid_layer_pattern="*-*-", num_layers=4, moba_full_attn_layers=3),
     r"--moba-full-attn-layers \(3\) exceeds the attention layers \('\*'\) of --hybrid-layer-pattern \(2\)"),
    (dict(hybrid_layer_pattern="*-*-", num_layers=4, moba_full_attn_layer_list=[3]),
     r"--moba-full-attn-layer-list: layer 3 is out of range 1..2 .*counted over the attention layers"),
])
def test_bad_pattern_names_the_flag(over, text):
    from megatron_moba.core.config import MoBATransformerConfig
    with pytest.raises(ValueError, match=text):
        MoBATransformerConfig(**dict(mc.BASE, **over))


def test_gpt_hybrid_name_mapping_round_trips():
    from megatron_moba.core import hybrid_pattern as hp
    names = ["embedding.word_embeddings.weight", "decoder.layers.0.input_layernorm.weight",
             "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
             "decoder.layers.1.mlp.linear_fc2.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    hybrid = [hp.gpt_to_hybrid_name(n) for n in names]
    assert hybrid[1:6] == ["decoder.layers.0.input_layernorm.weight",
                           "decoder.layers.0.self_attention.linear_qkv.weight",
                           "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.3.mlp.linear_fc2.weight",
                           "decoder.final_norm.weight"]
    assert [hp.hybrid_to_gpt_name(n) for n in hybrid] == names
    with pytest.raises(ValueError, match="not where a"):
        hp.hybrid_to_gpt_name("decoder.layers.1.self_attention.linear_qkv.weight")
    assert hp.is_gpt_pattern("*-*-|*-") and not hp.is_gpt_pattern("*|-*-") and not hp.is_gpt_pattern("*--*")


@pytest.mark.skipif(hybrid_model_available(), reason="this megatron-core has HybridModel")
def test_pattern_without_hybrid_model_names_the_flag():
    from megatron_moba.core.versions import require_hybrid_model
    with pytest.raises(ValueError, match=r"--hybrid-layer-pattern builds megatron-core's HybridModel .* does not have"):
        require_hybrid_model()


@needs_hybrid
def test_stack_spec_carries_moba_in_core_attention():
    from megatron.core.ssm.mlp_layer import MLPLayer

    from megatron_moba.core.attention import FullCoreAttention
    from megatron_moba.core.config import MoBATransformerConfig
    from megatron_moba.core.hybrid import HybridCoreAttention, MoBAHybridStack, get_moba_hybrid_stack_spec
    spec = get_moba_hybrid_stack_spec(MoBATransformerConfig(**dict(mc.BASE, num_layers=4,
                                                                   hybrid_layer_pattern="*-*-")), use_te=False)
    assert spec.module is MoBAHybridStack
    core = spec.submodules.attention_layer.submodules.self_attention.submodules.core_attention
    assert core.module is HybridCoreAttention and core.params["full"].module is FullCoreAttention
    assert spec.submodules.mlp_layer.module is MLPLayer
    assert spec.params["final_norm"] is not None         # the local norm, not megatron's TE-only final norm
