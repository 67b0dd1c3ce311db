"""MoBA inside megatron-core GPT models on CPU (gloo): exactness, parallel layouts, packing, hybrids."""
import pytest
import torch
import torch.nn.functional as F

import megatron_cases as mc

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_same_run(run, ref, tol=1e-4):
    assert len(run["losses"]) == len(ref["losses"])
    for a, b in zip(run["losses"], ref["losses"]):
        assert abs(a - b) / abs(b) < tol, (run["losses"], ref["losses"])
    for name, g in run["grads"].items():
        assert _rel(g, ref["grads"][name]) < tol, name


# ---------------------------------------------------------------- single process
def _dense_vs_moba():
    ids = torch.randint(0, mc.VOCAB, (2, mc.SEQ), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(mc.SEQ)[None].expand(2, -1)
    results = {}
    weights = mc.reference_weights()
    for name, over in (("moba_all_blocks", dict(moba_topk=mc.SEQ // 8)), ("full", dict(attention="full")),
                       ("moba_sparse", dict(moba_topk=2))):
        model = mc.build_gpt(mc.make_config(**over))
        mc.load_full_weights(model, weights)
        logits = model(ids, pos, attention_mask=None)
        logits.square().mean().backward()
        results[name] = dict(logits=logits.detach(), grads=mc.full_grads(model))
    return results


def test_moba_covering_all_blocks_equals_full_attention_gpt():
    r = mc.run_distributed(_dense_vs_moba)[0]
    assert _rel(r["moba_all_blocks"]["logits"], r["full"]["logits"]) < 1e-5
    for name, g in r["full"]["grads"].items():
        assert _rel(r["moba_all_blocks"]["grads"][name], g) < 1e-5, name
    assert _rel(r["moba_sparse"]["logits"], r["full"]["logits"]) > 1e-3   # sparse MoBA really differs


def _hybrid_core_outputs():
    from megatron_moba.core.attention import FullCoreAttention, MoBACoreAttention
    model = mc.build_gpt(mc.make_config(num_layers=3, moba_full_attn_layer_list=[1], moba_full_attn_layers=1))
    seen = []
    for layer in model.decoder.layers:
        core = layer.self_attention.core_attention
        core.register_forward_hook(lambda mod, args, out: seen.append(
            (type(mod).__name__, [a.detach() for a in args[:3]], out.detach())))
    model(torch.randint(0, mc.VOCAB, (1, mc.SEQ)), torch.arange(mc.SEQ)[None], attention_mask=None)
    kinds = [type(layer.self_attention.core_attention) for layer in model.decoder.layers]
    assert kinds == [FullCoreAttention, MoBACoreAttention, FullCoreAttention]
    return seen


def test_hybrid_layers_really_run_full_attention():
    seen = mc.run_distributed(_hybrid_core_outputs)[0]
    assert [s[0] for s in seen] == ["FullCoreAttention", "MoBACoreAttention", "FullCoreAttention"]
    for kind, (q, k, v), out in seen:            # q [s, b, Hq, d], k/v [s, b, Hkv, d] (GQA unexpanded)
        assert k.shape[2] == 2 and q.shape[2] == 4
        dense = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                               is_causal=True, enable_gqa=True)
        dense = dense.permute(2, 0, 1, 3).reshape(out.shape)
        if kind == "FullCoreAttention":
            assert _rel(out, dense) < 1e-5
        else:
            assert _rel(out, dense) > 1e-3


def _packed_vs_separate():
    from megatron.core.packed_seq_params import PackedSeqParams
    model = mc.build_gpt(mc.make_config())
    lens = [11, 5, 16]
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, mc.VOCAB, (1, n), generator=g) for n in lens]
    cu = torch.tensor([0, 11, 16, 32], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=16, max_seqlen_kv=16)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed = model(torch.cat(docs, dim=1), pos, attention_mask=None, packed_seq_params=params)
    separate = torch.cat([model(d, torch.arange(d.shape[1])[None], attention_mask=None) for d in docs], dim=1)
    return packed.detach(), separate.detach()


def test_packed_thd_equals_documents_one_by_one():
    packed, separate = mc.run_distributed(_packed_vs_separate)[0]
    assert packed.shape == separate.shape
    assert _rel(packed, separate) < 1e-5


# ---------------------------------------------------------------- parallel layouts
@pytest.fixture(scope="module")
def reference():
    return mc.run_distributed(mc.reference_run, {})[0]


def test_tensor_parallel_2_matches_single_process(reference):
    runs = mc.run_distributed(mc.train, {}, reference["weights"], tp=2)
    for run in runs:
        _assert_same_run(run, reference)


def test_tensor_and_sequence_parallel_2_matches_single_process(reference):
    for run in mc.run_distributed(mc.train, {"sequence_parallel": True}, reference["weights"], tp=2):
        _assert_same_run(run, reference)


def test_pipeline_parallel_2_matches_single_process(reference):
    runs = mc.run_distributed(mc.train, {}, reference["weights"], pp=2)
    last = runs[-1]
    assert len(last["losses"]) == 3
    _assert_same_run(last, reference)
    for name, g in runs[0]["grads"].items():           # first stage: embedding and layer 1
        assert _rel(g, reference["grads"][name]) < 1e-4, name


@pytest.mark.parametrize("chunk", [8, 6])   # CP chunks are 8 tokens (SEQ 32, 2*cp = 4): aligned and not
def test_context_parallel_2_matches_single_process(chunk):
    over = dict(moba_chunk_size=chunk)
    ref = mc.run_distributed(mc.reference_run, over)[0]
    for run in mc.run_distributed(mc.train, over, ref["weights"], cp=2):
        _assert_same_run(run, ref)


def test_tensor_and_context_parallel_2x2_match_single_process(reference):
    for run in mc.run_distributed(mc.train, {}, reference["weights"], tp=2, cp=2):
        _assert_same_run(run, reference)


QWEN_ATTENTION = dict(qk_layernorm=True, add_qkv_bias=True, kv_channels=32)


@pytest.fixture(scope="module")
def qwen_reference():
    ref = mc.run_distributed(mc.reference_run, QWEN_ATTENTION)[0]
    assert any("q_layernorm" in name for name in ref["grads"]) and any(".bias" in name for name in ref["grads"])
    return ref


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_qk_norm_and_qkv_bias_under_tensor_parallel_match_single_process(qwen_reference, sp):
    """Qwen's attention (--qk-layernorm, --add-qkv-bias, --kv-channels): each TP rank's QK-norm gradient
    covers its own heads only, so it is summed over the TP group (the first step's gradients checked)."""
    for run in mc.run_distributed(mc.train, dict(QWEN_ATTENTION, sequence_parallel=sp), qwen_reference["weights"],
                                  tp=2):
        _assert_same_run(run, qwen_reference)


# ---------------------------------------------------------------- bad configurations
@pytest.mark.parametrize("over,flag", [
    (dict(moba_topk=0), "--moba-topk"),
    (dict(moba_chunk_size=0), "--moba-chunk-size"),
    (dict(num_attention_heads=6, num_query_groups=6, tensor_model_parallel_size=4), "--tensor-model-parallel-size"),
    (dict(moba_full_attn_layer_list=[3]), "--moba-full-attn-layer-list"),
    (dict(moba_full_attn_layers=5), "--moba-full-attn-layers"),
    (dict(attention="linear"), "--attention"),
    (dict(moba_backend="flash"), "--moba-backend"),
])
def test_bad_config_names_the_flag(over, flag):
    from megatron_moba.core.config import MoBATransformerConfig
    kw = {k: v for k, v in mc.BASE.items()}
    kw.update(over)
    with pytest.raises(ValueError, match=flag):
        MoBATransformerConfig(**kw)


def test_seq_length_must_divide_by_twice_cp():
    from megatron_moba import MoBATransformerConfig, build_moba_gpt
    from megatron_moba.core.config import check_seq_length
    cfg = MoBATransformerConfig(**dict(mc.BASE, context_parallel_size=2))
    with pytest.raises(ValueError, match=r"--seq-length \(30\) must be divisible by 2 x --context-parallel-size"):
        build_moba_gpt(cfg, vocab_size=mc.VOCAB, seq_length=30)      # fails before touching parallel state
    check_seq_length(cfg, 32)


def test_context_parallel_rejects_sequences_it_cannot_split():
    from megatron_moba.core.context_parallel import cp_token_index
    with pytest.raises(ValueError, match="divisible by 2 x --context-parallel-size"):
        cp_token_index([0, 12, 18], cp=2, rank=0)
    assert cp_token_index([0, 8, 16], cp=2, rank=1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]


def _packed_cp(weights):
    """Packed THD documents under CP=2: each rank's logits at its global tokens."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_moba.core.context_parallel import cp_token_index
    model = mc.build_gpt(mc.make_config())
    mc.load_full_weights(model, weights)
    lens = [12, 4, 16]
    cu_list = [0, 12, 16, 32]
    cu = torch.tensor(cu_list, dtype=torch.int32)
    tokens = torch.randint(0, mc.VOCAB, (1, 32), generator=torch.Generator().manual_seed(8))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=16, max_seqlen_kv=16)
    cp = ps.get_context_parallel_world_size()
    mine = cp_token_index(cu_list, cp, ps.get_context_parallel_rank()) if cp > 1 else torch.arange(32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    logits = model(tokens[:, mine], pos[:, mine], attention_mask=None, packed_seq_params=params)
    return mine, logits.detach()


def test_packed_thd_under_context_parallel_matches_single_process(reference):
    _, full = mc.run_distributed(_packed_cp, reference["weights"])[0]
    for mine, local in mc.run_distributed(_packed_cp, reference["weights"], cp=2):
        assert _rel(local, full[:, mine]) < 1e-5


def test_spec_choice_without_transformer_engine():
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_moba import MoBATransformerConfig, get_moba_layer_specs
    from megatron_moba.core.attention import FullCoreAttention, MoBACoreAttention
    cfg = MoBATransformerConfig(**dict(mc.BASE, num_layers=4, moba_full_attn_layers=2))
    specs = get_moba_layer_specs(cfg, use_te=False)
    cores = [s.submodules.self_attention.submodules.core_attention.module for s in specs]
    assert cores == [MoBACoreAttention, MoBACoreAttention, FullCoreAttention, FullCoreAttention]
    if not gpt_layer_specs.HAVE_TE:
        with pytest.raises(ValueError, match="use_te=True needs Transformer Engine"):
            get_moba_layer_specs(cfg, use_te=True)
