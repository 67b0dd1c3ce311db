"""The job with --hybrid-layer-pattern (megatron-core's HybridModel, 0.19+) on CPU: the GPT's flags with
'*-' x L train the GPT's losses from scratch and resume exactly; a GPT checkpoint is refused by a
HybridModel run naming the flag, and tools/convert_gpt_to_hybrid.py's conversion of it holds the weights
the HybridModel trained; the
evaluation tools (positional loss, needle, block selection) give a hybrid checkpoint the GPT's results;
HF import --hybrid and export (exact round trip, transformers' logits after --finetune steps); bad
patterns are refused naming the flag (also where megatron-core has no HybridModel)."""
import json

import pytest
import torch

import megatron_cases as mc
from megatron_moba.core.versions import hybrid_model_available, installed_version

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
needs_hybrid = pytest.mark.skipif(not hybrid_model_available(),
                                  reason=f"megatron-core {installed_version()} has no HybridModel "
                                         "(megatron.core.models.hybrid, 0.19+)")
HYBRID = mc.edit_flags(mc.TINY, add=[["--num-layers", "4"], ["--hybrid-layer-pattern", "*-*-"],
                                     ["--moba-full-attn-layers", "1"]])
GPT = mc.edit_flags(mc.TINY, add=[["--moba-full-attn-layers", "1"]])


def _run(argv, **layout):
    return mc.run_distributed(mc.run_pretrain, argv, **layout)


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("extra,text", [
    (["--hybrid-layer-pattern", "*M*-"], "--hybrid-layer-pattern '*M*-': 'M' (Mamba) is not supported with MoBA"),
    (["--hybrid-layer-pattern", "*-*-"], "--hybrid-layer-pattern '*-*-' has 4 layers, but --num-layers is 2"),
    (["--num-layers", "4", "--hybrid-layer-pattern", "*-|*-"], "has 2 pipeline segments ('|'), but "
                                                               "--pipeline-model-parallel-size is 1"),
    (["--num-layers", "4", "--hybrid-layer-pattern", "*-*-", "--moba-full-attn-layers", "3"],
     "--moba-full-attn-layers (3) exceeds the attention layers ('*') of --hybrid-layer-pattern (2)"),
])
def test_cli_rejects_bad_patterns_naming_the_flag(extra, text, capsys):
    mc.assert_cli_rejects(extra, text, capsys)


@pytest.mark.skipif(hybrid_model_available(), reason="this megatron-core has HybridModel")
def test_pattern_on_a_megatron_core_without_hybrid_model_names_the_flag(capsys):
    mc.assert_cli_rejects(["--num-layers", "4", "--hybrid-layer-pattern", "*-*-"],
                          f"--hybrid-layer-pattern builds megatron-core's HybridModel (megatron.core.models.hybrid), "
                          f"which megatron-core {installed_version()} does not have", capsys)


# ---------------------------------------------------------------- training, checkpoints, evaluation tools
def _train_and_evaluate(d):
    """GPT and HybridModel runs of the same flags (saved), a hybrid resume, then the three evaluation tools
    on both checkpoints; a GPT checkpoint loaded into the HybridModel."""
    import contextlib
    import io

    import numpy as np

    from megatron_moba.eval import block_selection, needle, positional_loss
    from megatron_moba.training.preprocess import build_indexed_dataset
    rng = np.random.default_rng(0)
    build_indexed_dataset((" ".join(map(str, rng.integers(0, 200, n))) for n in (80, 40, 70)), f"{d}/docs",
                          "NullTokenizer", vocab_size=200, progress=False)
    from megatron_moba.eval.checkpoint import load_for_eval
    from megatron_moba.training.convert_hybrid import gpt_checkpoint_to_hybrid
    out = {"dir": d, "gpt": mc.run_pretrain(GPT + ["--save", f"{d}/gpt"])}
    out["hybrid"] = mc.run_pretrain(HYBRID + ["--save", f"{d}/hy"])
    out["first"] = mc.run_pretrain(HYBRID + ["--save", f"{d}/resumed", "--exit-interval", "3"])
    out["second"] = mc.run_pretrain(HYBRID + ["--load", f"{d}/resumed", "--save", f"{d}/resumed"])
    for name, extra in (("recompute", ["--recompute-granularity", "full"]),
                        ("megatron", ["--optimizer-impl", "megatron"]), ("documents", ["--document-attention"])):
        out[name] = mc.run_pretrain(HYBRID + extra)
    out["gpt_documents"] = mc.run_pretrain(GPT + ["--document-attention"])
    out["wrong_class"] = mc.run_pretrain_error(HYBRID + ["--load", f"{d}/gpt", "--finetune"], "ValueError")
    out["converted"] = gpt_checkpoint_to_hybrid(f"{d}/gpt", f"{d}/converted")
    converted, trained = (load_for_eval(f"{d}/{c}")[0].state_dict() for c in ("converted", "hy"))
    out["converted_weights"] = {k: (converted[k], trained[k]) for k in trained if not k.endswith("_extra_state")}
    with contextlib.redirect_stdout(io.StringIO()):
        out["positional"] = positional_loss.run([f"{d}/gpt", f"{d}/hy"], f"{d}/docs", bucket_width=16,
                                                trailing_tokens=8, progress=False)
        out["needle"] = needle.run([f"{d}/gpt", f"{d}/hy"], [48, 96], f"{d}/needle", depths=[0.5], trials=2,
                                   progress=False)
        out["blocks"] = [block_selection.run(f"{d}/{c}", 2, f"{d}/blocks_{c}", head=1, data_path=f"{d}/docs")
                         for c in ("gpt", "hy")]
        try:
            block_selection.check_flags(f"{d}/hy", 3)
        except ValueError as e:
            out["bad_layer"] = str(e)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return mc.run_distributed(_train_and_evaluate, str(tmp_path_factory.mktemp("hybrid_job")))[0]


@needs_hybrid
def test_hybrid_trains_the_gpt_losses_and_resumes_exactly(runs):
    assert len(runs["hybrid"]) == 6
    for a, b in zip(runs["hybrid"], runs["gpt"]):    # from scratch: the same initialization, data and math
        assert abs(a - b) / b < 1e-5, (runs["hybrid"], runs["gpt"])
    assert runs["first"] + runs["second"] == runs["hybrid"]  # bit-identical on CPU


@needs_hybrid
def test_hybrid_checkpoint_resumes_at_tp2_pp2(runs):
    """Saved in one process ('*-*-'), resumed at TP=2 + SP and PP=2 ('*-|*-'): the single-process losses."""
    argv = mc.edit_flags(HYBRID, add=[["--hybrid-layer-pattern", "*-|*-"], ["--tensor-model-parallel-size", "2"],
                                      ["--pipeline-model-parallel-size", "2"], "--sequence-parallel"])
    for losses in _run(argv + ["--load", f"{runs['dir']}/resumed", "--ckpt-step", "3"], tp=2, pp=2):
        assert len(losses) == 3
        for a, b in zip(losses, runs["second"]):
            assert abs(a - b) / b < 1e-4, (losses, runs["second"])


@needs_hybrid
def test_hybrid_under_recompute_megatron_optimizer_and_packed_documents(runs):
    for name, ref in (("recompute", "hybrid"), ("megatron", "hybrid"), ("documents", "gpt_documents")):
        for a, b in zip(runs[name], runs[ref]):
            assert abs(a - b) / b < 1e-5, (name, runs[name], runs[ref])
    assert abs(runs["documents"][-1] - runs["hybrid"][-1]) > 1e-4        # documents attend within themselves


@needs_hybrid
def test_gpt_checkpoint_converts_to_the_hybrid_one(runs):
    assert runs["converted"] == ["--num-layers", "4", "--hybrid-layer-pattern", "*-*-"]
    assert len(runs["converted_weights"]) == 15
    for name, (converted, trained) in runs["converted_weights"].items():
        assert torch.allclose(converted, trained, rtol=1e-5, atol=1e-7), name


@needs_hybrid
def test_gpt_checkpoint_is_refused_naming_the_flag(runs):
    assert "--hybrid-layer-pattern: checkpoint none (GPTModel), this run '*-*-' (HybridModel)" in runs["wrong_class"]


@needs_hybrid
def test_evaluation_tools_give_the_hybrid_checkpoint_the_gpt_results(runs):
    gpt, hy = runs["positional"]
    assert [b["documents"] for b in hy["buckets"]] == [b["documents"] for b in gpt["buckets"]]
    for a, b in zip(hy["buckets"], gpt["buckets"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * b["loss"]
    assert abs(hy["trailing_loss"] - gpt["trailing_loss"]) < 1e-5 * gpt["trailing_loss"]
    cells = {}
    for row in runs["needle"]:
        cells.setdefault((row["length"], row["depth"]), []).append(row)
    for gpt_row, hy_row in cells.values():
        assert hy_row["predictions"] == gpt_row["predictions"]
    gpt_sel, hy_sel = runs["blocks"]
    assert hy_sel["layer_attention"] == gpt_sel["layer_attention"] == "full"      # attention layer 2 of 2
    assert abs(hy_sel["kept_mass"]["overall"] - gpt_sel["kept_mass"]["overall"]) < 1e-5
    assert "layers 1..2 (1-based, counted over the attention layers" in runs["bad_layer"]


# ---------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf_chain(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path_factory.mktemp("hybrid_hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=50000.0, rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():                        # every weight drawn (norms are 1 after init)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(str(d / "hf"))
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(98)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "hf" / "tokenizer.json"))
    tokens = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    res = mc.run_distributed(mc.hf_family_chain, str(d), tokens, [["--rotary-base", "20000"]], {}, (False, True))[0]
    return d, tokens, expected, res, transformers


@needs_hybrid
def test_hf_import_as_hybrid_gives_transformers_logits(hf_chain):
    d, _, expected, res, _ = hf_chain
    flags = res["printed"]
    assert flags[flags.index("--num-layers") + 1] == "4" and flags[flags.index("--hybrid-layer-pattern") + 1] == "*-*-"
    assert (res["imported"][..., :200] - expected).abs().max().item() < 1e-4
    from megatron_moba.hf.families import model_flags, read_hf_config
    assert model_flags(read_hf_config(str(d / "hf")), hybrid=True) == flags[:flags.index("--tokenizer-type")]


@needs_hybrid
def test_hf_export_of_hybrid_checkpoints(hf_chain):
    from safetensors.torch import load_file
    d, tokens, _, res, transformers = hf_chain
    a, b = load_file(str(d / "hf" / "model.safetensors")), load_file(str(d / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)        # round trip: exact
    exported = transformers.LlamaForCausalLM.from_pretrained(str(d / "out")).eval()   # after --finetune steps
    assert "20000" in json.dumps(json.load(open(d / "out" / "config.json")))       # the run's --rotary-base
    with torch.no_grad():
        logits = exported(tokens).logits
    assert (logits - res["trained"][..., :200]).abs().max().item() < 1e-4
    assert (logits - res["imported"][..., :200]).abs().max().item() > 1e-4           # it trained
