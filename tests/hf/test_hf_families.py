"""Each supported HF family (Llama 3.1 / 3.2, Qwen2, Qwen3, Mistral), made small and random by
transformers itself: import -> the megatron model built from the printed flags gives transformers'
logits -> --finetune steps with MoBA -> export -> transformers loads it with no missing or unexpected
weight and gives the megatron model's logits; the round trip without training is exact.  And what
the converter refuses: a tensor it would drop, a config field it does not map, a sliding window."""
import json

import pytest
import torch

import megatron_cases as mc
from helpers import tool_exit_code

transformers = pytest.importorskip("transformers")
V = 300                      # the models' vocabulary; their tokenizer has 100 tokens (as Qwen: rows > tokens)
LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
# name: (transformers class prefix, config, sequence length, continued-pretraining flag changes,
#        variants of the printed flags that must be refused at load (or, RoPE, give other logits))
FAMILIES = {
    "llama3.1": ("Llama", dict(rope_parameters={**LLAMA3, "factor": 8.0, "rope_theta": 500000.0},
                               max_position_embeddings=16384), 8256,
                 [["--rotary-base", "1000000"], ["--rope-scaling-factor", "16.0"]],
                 {"no RoPE scaling": (["--use-rope-scaling", "--rope-scaling-factor"], [])}),
    "llama3.2": ("Llama", dict(rope_parameters={**LLAMA3, "factor": 32.0, "rope_theta": 500000.0},
                               max_position_embeddings=16384, tie_word_embeddings=True), 8256,
                 [["--max-position-embeddings", "32768"]],
                 {"untied": ([], ["--untie-embeddings-and-output-weights"])}),
    "qwen2": ("Qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), 48,
              [["--rotary-base", "2000000"]], {"no qkv bias": (["--add-qkv-bias"], [])}),
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=True), 48, [["--rotary-base", "50000"]],
              {"no QK norm": (["--qk-layernorm"], []), "no head dim": (["--kv-channels"], [])}),
    "mistral": ("Mistral", dict(sliding_window=None), 48,
                [["--rotary-base", "20000"], ["--max-position-embeddings", "256"]],
                {"no vocab size": (["--vocab-size"], [])}),
}
REFUSED = {"no RoPE scaling": None, "untied": "--untie-embeddings-and-output-weights: checkpoint False",
           "no qkv bias": "--add-qkv-bias: checkpoint True, this run False",
           "no QK norm": "--qk-layernorm: checkpoint True, this run False",
           "no head dim": "--kv-channels: checkpoint 32",
           "no vocab size": "vocabulary (--vocab-size, or the tokenizer's size): checkpoint 384 rows"}


def save_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(98)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def make_hf(prefix, overrides, d, seed=0):
    """A random HF model saved in ``d`` with a tokenizer: every weight drawn (transformers zeroes biases
    and sets norms to 1, which would hide a dropped bias or norm)."""
    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(**{**SMALL, **overrides})
    model = getattr(transformers, prefix + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(str(d))
    save_tokenizer(d)
    return model


def _load(prefix, path):
    model, info = getattr(transformers, prefix + "ForCausalLM").from_pretrained(str(path), output_loading_info=True)
    return model.eval(), {k: v for k, v in info.items() if v}


@pytest.fixture(scope="module", params=list(FAMILIES))
def chain(request, tmp_path_factory):
    name = request.param
    prefix, overrides, length, changes, variants = FAMILIES[name]
    d = tmp_path_factory.mktemp(name.replace(".", "_"))
    model = make_hf(prefix, overrides, d / "hf")
    tokens = torch.randint(0, V, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    res = mc.run_distributed(mc.hf_family_chain, str(d), tokens, changes, variants)[0]
    return dict(name=name, prefix=prefix, d=d, tokens=tokens, expected=expected, res=res)


def _err(a, b):
    return (a[..., :V] - b[..., :V]).abs().max().item()


def test_imported_checkpoint_gives_transformers_logits(chain):
    res, name = chain["res"], chain["name"]
    flags = res["printed"]
    assert flags[flags.index("--tokenizer-type"):flags.index("--tokenizer-type") + 4] == [
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str((chain["d"] / "hf").resolve())]
    assert flags[flags.index("--vocab-size") + 1] == str(V)
    expect = {"llama3.1": ["--use-rope-scaling"], "llama3.2": [], "qwen2": ["--add-qkv-bias"],
              "qwen3": ["--qk-layernorm", "--kv-channels"], "mistral": []}[name]
    assert all(f in flags for f in expect), flags
    assert ("--untie-embeddings-and-output-weights" in flags) == (name not in ("llama3.2", "qwen3"))
    err = _err(res["imported"], chain["expected"])
    print(f"{name}: imported logits vs transformers, {chain['tokens'].shape[1]} tokens: max abs {err:.2e}")
    assert err < 1e-4


def test_a_flag_left_out_is_refused_or_changes_the_logits(chain):
    res = chain["res"]
    for variant in FAMILIES[chain["name"]][4]:
        if REFUSED[variant] is None:       # RoPE scaling: no tensor, a different model (which the test sees)
            assert _err(res[variant], chain["expected"]) > 1e-2, variant
        else:
            assert isinstance(res[variant], str) and REFUSED[variant] in res[variant], (variant, res[variant])
            assert "pass the checkpoint's model flags" in res[variant]


def test_round_trip_without_training_is_exact(chain):
    from safetensors.torch import load_file
    d = chain["d"]
    a, b = load_file(str(d / "hf" / "model.safetensors")), load_file(str(d / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.load(open(d / "back" / "config.json")) == json.load(open(d / "hf" / "config.json"))
    assert _load(chain["prefix"], d / "back")[1] == {}


def test_continued_pretraining_export_loads_in_transformers_with_the_run_s_logits(chain):
    from safetensors.torch import load_file
    res, d, name = chain["res"], chain["d"], chain["name"]
    assert len(res["losses"]) == 3 and all(0 < x < 20 for x in res["losses"])
    exported, problems = _load(chain["prefix"], d / "out")
    assert problems == {}                                         # no missing / unexpected / mismatched weight
    cfg = exported.config
    assert (cfg.moba_chunk_size, cfg.moba_topk) == (16, 2)
    rope = cfg.rope_parameters
    changes = dict(FAMILIES[name][3])
    assert rope["rope_theta"] == float(changes.get("--rotary-base", rope["rope_theta"]))
    if name.startswith("llama"):
        assert rope["rope_type"] == "llama3"
        imported = FAMILIES[name][1]["rope_parameters"]["factor"]
        assert rope["factor"] == float(changes.get("--rope-scaling-factor", imported))
    assert cfg.max_position_embeddings == int(changes.get("--max-position-embeddings", cfg.max_position_embeddings))
    trained, original = load_file(str(d / "out" / "model.safetensors")), load_file(str(d / "hf" / "model.safetensors"))
    assert sorted(trained) == sorted(original)
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    with torch.no_grad():
        hf = exported(chain["tokens"]).logits
    err = _err(res["trained"], hf)
    print(f"{name}: trained export, transformers vs megatron: max abs {err:.2e}")
    assert err < 1e-4
    assert _err(res["trained"], chain["expected"]) > 1e-3             # training (and the RoPE change) is visible


def test_the_export_runs_moba_in_transformers_as_the_run_does(chain):
    import megatron_moba.hf  # noqa: F401  (registers attn_implementation="moba")
    model = getattr(transformers, chain["prefix"] + "ForCausalLM").from_pretrained(
        str(chain["d"] / "out"), attn_implementation="moba").eval()
    tokens = chain["tokens"][:, :64]
    with torch.no_grad():
        moba, full = model(tokens).logits, _load(chain["prefix"], chain["d"] / "out")[0](tokens).logits
    assert _err(chain["res"]["trained_moba"], moba) < 1e-4
    assert _err(moba, full) > 1e-3                                     # 48-64 tokens, chunk 16, top-2: sparse


@pytest.mark.parametrize("chain", ["qwen2", "qwen3"], indirect=True)
def test_biases_and_qk_norms_load_at_tensor_parallel_2(chain):
    d = chain["d"]
    for logits in mc.run_distributed(mc.hf_logits_in_megatron, str(d / "hf"), str(d / "mg"), chain["tokens"],
                                     ["--attention", "full"], tp=2):
        assert _err(logits, chain["expected"]) < 1e-4


@pytest.mark.parametrize("chain", ["llama3.1"], indirect=True)
def test_flags_command_prints_the_import_s_flags(chain, monkeypatch, capsys):
    assert tool_exit_code(monkeypatch, "convert_hf_checkpoint.py", "flags", "--hf-dir", chain["d"] / "hf") == 0
    assert capsys.readouterr().out.split() == chain["res"]["printed"]


# ---------------------------------------------------------------- what is refused
DELETE = object()
CONFIG_REFUSALS = [
    ("Llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     "RoPE scaling 'yarn' is not supported"),
    ("Llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_scaling": {"type": "linear",
                                                                                                   "factor": 2.0}},
     "RoPE scaling 'linear' is not supported"),
    ("Llama", {"rope_parameters": {**LLAMA3, "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 2.0}},
     "llama3 RoPE scaling with low_freq_factor 2.0"),
    ("Llama", {"rope_parameters": {**LLAMA3, "factor": 8.0, "rope_theta": 5e5, "original_max_position_embeddings": 64}},
     "original_max_position_embeddings 64"),
    ("Llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.5}}, "rope_theta 10000.5"),
    ("Llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ("Llama", {"attention_bias": True}, "attention_bias true"),
    ("Llama", {"mlp_bias": True}, "mlp_bias true"),
    ("Llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("Llama", {"attention_dropout": 0.1}, "attention_dropout 0.1"),
    ("Llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config = {'quant_method': 'gptq'}"),
    ("Llama", {"num_key_value_heads": DELETE}, "config.json has no num_key_value_heads"),
    ("Llama", {"architectures": ["LlamaForSequenceClassification"]}, "only LlamaForCausalLM"),
    ("Llama", {"model_type": "gemma"}, "model_type 'gemma' is not supported"),
    ("Llama", {"is_encoder_decoder": True}, "is_encoder_decoder = True is not supported"),
    ("Qwen3", {"attention_bias": True}, "attention_bias true"),
    ("Qwen2", {"use_sliding_window": True, "sliding_window": 32,
               "layer_types": ["full_attention", "sliding_attention"]}, "sliding_window 32 is set for layer(s) [1]"),
    ("Mistral", {"sliding_window": 4096}, "sliding_window 4096 is set"),
    ("Mistral", {"sliding_window": DELETE}, "sliding_window 4096 is set"),      # absent: transformers' default
]


def _config_dir(d, prefix, changes):
    d.mkdir(parents=True, exist_ok=True)
    getattr(transformers, prefix + "Config")(**SMALL).save_pretrained(str(d))
    cfg = json.load(open(d / "config.json"))
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("prefix,changes,message", CONFIG_REFUSALS, ids=[m for _, _, m in CONFIG_REFUSALS])
def test_a_config_field_that_is_not_mapped_is_refused_naming_it(tmp_path, prefix, changes, message):
    from megatron_moba.hf.families import read_hf_config
    d = _config_dir(tmp_path / "hf", prefix, changes)
    with pytest.raises(ValueError) as e:
        read_hf_config(str(d))
    assert message in str(e.value) and str(d / "config.json") in str(e.value), str(e.value)


@pytest.mark.parametrize("prefix", ["Llama", "Mistral", "Qwen2", "Qwen3"])
def test_a_config_saved_with_all_its_defaults_is_accepted(tmp_path, prefix):
    """``PretrainedConfig.to_dict()`` writes every field, transformers' bookkeeping included."""
    from megatron_moba.hf.families import model_flags, read_hf_config
    window = {"sliding_window": None} if prefix == "Mistral" else {}
    cfg = getattr(transformers, prefix + "Config")(**SMALL, **window).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "--num-query-groups" in model_flags(read_hf_config(str(tmp_path)))


def test_the_tool_refuses_a_sliding_window_and_says_how(tmp_path, monkeypatch, capsys):
    d = _config_dir(tmp_path / "hf", "Mistral", {"sliding_window": 16})
    assert tool_exit_code(monkeypatch, "convert_hf_checkpoint.py", "import", "--hf-dir", d,
                          "--save", tmp_path / "mg") == 1
    err = capsys.readouterr().err
    assert "sliding_window 16 is set for layer(s) [0, 1]" in err and "a different model past the window" in err
    assert "--replace-sliding-window" in err and not (tmp_path / "mg").exists()


def _tampered(tmp_path, prefix, overrides, edit):
    from safetensors.torch import load_file, save_file
    src = tmp_path / "src"
    make_hf(prefix, overrides, src)
    weights = load_file(str(src / "model.safetensors"))
    d = tmp_path / "tampered"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    save_file(edit(weights), str(d / "model.safetensors"))
    return str(d)


@pytest.mark.parametrize("prefix,overrides,edit,message", [
    ("Qwen2", {}, lambda w: {**w, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)},
     "HF tensor(s) ['model.layers.0.self_attn.rotary_emb.inv_freq'] are not carried"),
    ("Qwen2", {}, lambda w: {k: v for k, v in w.items() if k != "model.layers.1.self_attn.k_proj.bias"},
     "lacks tensors its config needs: ['model.layers.1.self_attn.k_proj.bias']"),
    ("Qwen3", {"head_dim": 32}, lambda w: {**w, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)},
     "model.layers.0.self_attn.q_norm.weight has shape (16,), the config implies (32,)"),
    ("Llama", {"tie_word_embeddings": True}, lambda w: {**w, "lm_head.weight": torch.randn(V, 64)},
     "lm_head.weight differs from model.embed_tokens.weight"),
], ids=["extra tensor", "missing bias", "wrong shape", "untied output layer of a tied model"])
def test_a_tampered_checkpoint_is_refused_naming_the_tensor(tmp_path, prefix, overrides, edit, message):
    from megatron_moba.hf.convert import hf_import
    d = _tampered(tmp_path, prefix, overrides, edit)
    with pytest.raises(ValueError) as e:
        hf_import(d)
    assert message in str(e.value), str(e.value)


def test_a_tied_checkpoint_that_also_stores_the_output_layer_imports(tmp_path):
    from megatron_moba.hf.convert import hf_import
    d = _tampered(tmp_path, "Llama", {"tie_word_embeddings": True},
                  lambda w: {**w, "lm_head.weight": w["model.embed_tokens.weight"].clone()})
    _, weights = hf_import(d)
    assert "output_layer.weight" not in weights


def test_a_sliding_window_replaced_by_full_attention_on_request(tmp_path):
    """--replace-sliding-window: the megatron model is the HF model without its window (not the
    windowed one, past the window), and the export says so (sliding_window null)."""
    windowed = make_hf("Mistral", {"sliding_window": 16}, tmp_path / "hf")
    tokens = torch.randint(0, V, (1, 48), generator=torch.Generator().manual_seed(2))
    full = transformers.MistralForCausalLM(transformers.MistralConfig(**{**SMALL, "sliding_window": None}))
    full.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        with_window, without = windowed(tokens).logits, full.eval()(tokens).logits
    res = mc.run_distributed(mc.hf_family_chain, str(tmp_path), tokens, [], {}, (True,), False)[0]
    assert _err(res["imported"], without) < 1e-4 and _err(res["imported"], with_window) > 1e-3
    assert json.load(open(tmp_path / "back" / "config.json"))["sliding_window"] is None
    exported, problems = _load("Mistral", tmp_path / "back")
    assert problems == {} and exported.config.sliding_window is None
    with torch.no_grad():
        assert _err(exported(tokens).logits, without) < 1e-5


def test_the_model_flags_parse_and_rope_scaling_defaults_to_llama_3_1(capsys):
    from megatron_moba.training.arguments import parse_args
    args = parse_args(mc.TINY + ["--use-rope-scaling", "--num-attention-heads", "6", "--num-query-groups", "3",
                                 "--kv-channels", "16", "--qk-layernorm", "--add-qkv-bias"], world_size=1)
    assert (args.rope_scaling_factor, args.kv_channels, args.qk_layernorm, args.add_qkv_bias) == (8.0, 16, True, True)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from megatron_moba.hf.families import tokenizer_flags
    from megatron_moba.training.tokenizer import build_tokenizer
    save_tokenizer(tmp_path)
    cfg = {"model_type": "llama", **SMALL, "vocab_size": 64}
    with pytest.raises(ValueError, match="the tokenizer has 100 tokens, more than vocab_size 64 in config.json"):
        tokenizer_flags(str(tmp_path), cfg)
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path), 300).vocab_size == 300      # rows > tokens
    with pytest.raises(ValueError, match="--vocab-size 64 is smaller than the vocabulary of --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path), 64)
