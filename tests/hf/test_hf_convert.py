"""Hugging Face Llama <-> megatron checkpoints: same logits at TP=1 and TP=2, exact round trip; MoBA inside
transformers.  The other families and what is refused: test_hf_families.py."""
import os
import subprocess
import sys

import pytest
import torch

import megatron_cases as mc

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository


def _tool(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf_checkpoint.py"), *args],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module", params=["untied", "tied"])
def hf_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=request.param == "tied")
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(d / "hf"))
    out = _tool("import", "--hf-dir", str(d / "hf"), "--save", str(d / "mg"))
    assert "--finetune" in out
    return d, model


@pytest.mark.parametrize("tp", [1, 2])
def test_imported_checkpoint_gives_hf_logits(hf_model, tp):
    d, model = hf_model
    tokens = torch.randint(0, 200, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    for logits in mc.run_distributed(mc.hf_logits_in_megatron, str(d / "hf"), str(d / "mg"), tokens, tp=tp):
        assert (logits[..., :200] - expected).abs().max().item() < 1e-4


def test_export_round_trip_is_exact(hf_model):
    from safetensors.torch import load_file
    d, _ = hf_model
    _tool("export", "--load", str(d / "mg"), "--out", str(d / "back"))
    a, b = load_file(str(d / "hf" / "model.safetensors")), load_file(str(d / "back" / "model.safetensors"))
    if "lm_head.weight" not in a:          # tied: transformers saves only the embedding
        b.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(d / "back"))
    assert reloaded.config.num_key_value_heads == 2


def test_import_rejects_what_it_cannot_convert(tmp_path):
    from megatron_moba.hf.convert import read_hf_config
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "num_attention_heads": 2, "hidden_size": 8}')
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported \(supported: llama, mistral, qwen2, "
                                         r"qwen3\)"):
        read_hf_config(str(tmp_path))


# ---------------------------------------------------------------- MoBA inside transformers
def _hf_moba(path, chunk, topk):
    import megatron_moba.hf  # noqa: F401  (registers "moba")
    model = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="moba").eval()
    model.config.moba_chunk_size, model.config.moba_topk = chunk, topk
    return model


def test_hf_moba_attention_matches_megatron_moba(hf_model):
    d, eager = hf_model
    tokens = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = _hf_moba(str(d / "hf"), 8, 100)(tokens).logits
        sparse = _hf_moba(str(d / "hf"), 8, 2)(tokens).logits
        assert (dense - eager(tokens).logits).abs().max().item() < 1e-5       # topk >= blocks: dense
    megatron = mc.run_distributed(mc.hf_logits_in_megatron, str(d / "hf"), str(d / "mg"), tokens,
                                  ["--moba-chunk-size", "8", "--moba-topk", "2"])[0]
    assert (sparse - megatron[..., :200]).abs().max().item() < 1e-4
    assert (sparse - dense).abs().max().item() > 1e-3                        # the sparsity is real


def test_hf_moba_cached_decoding_matches_recomputation(hf_model):
    d, _ = hf_model
    model = _hf_moba(str(d / "hf"), 8, 2)
    prompt = torch.randint(0, 200, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True)
        full = model(cached.sequences[:, :-1]).logits[:, prompt.shape[1] - 1:]
    assert (torch.stack(cached.logits, 1) - full).abs().max().item() < 1e-4


def test_hf_moba_rejects_padding():
    from megatron_moba.hf.attention import moba_attention

    class M:
        config = type("C", (), {"moba_chunk_size": 4, "moba_topk": 2})()
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[..., 0] = False                                                      # a padded first token
    with pytest.raises(ValueError, match="causal masks only"):
        moba_attention(M(), q, k, k, mask)


# ---------------------------------------------------------------- bf16, streaming, sharded export
@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A bf16 Llama saved by transformers in 3 shards, with a tokenizer and a generation config."""
    from tokenizers import Tokenizer, models
    d = tmp_path_factory.mktemp("hf_bf16")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(str(d / "hf"), max_shard_size="40KB")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 200)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(d / "hf" / "tokenizer.json"))
    (d / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return d, model


def test_bf16_import_streams_and_export_shards_like_save_pretrained(bf16_model):
    import json

    from safetensors.torch import load_file

    from megatron_moba.hf.safetensors_io import HFWeights
    d, model = bf16_model
    assert len(json.loads((d / "hf" / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    weights = HFWeights(str(d / "hf"))
    assert weights.nbytes() == sum(t.numel() * 2 for t in model.state_dict().values())
    _tool("import", "--hf-dir", str(d / "hf"), "--save", str(d / "mg"))
    # the bf16 checkpoint loads into an fp32 model (a CPU run without --bf16) and gives the HF model's logits
    tokens = torch.randint(0, 200, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = transformers.LlamaForCausalLM(model.config).float().eval()
        expected.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        expected = expected(tokens).logits
    logits = mc.run_distributed(mc.hf_logits_in_megatron, str(d / "hf"), str(d / "mg"), tokens)[0]
    assert (logits[..., :200] - expected).abs().max().item() < 1e-4
    out = _tool("export", "--load", str(d / "mg"), "--out", str(d / "back"), "--max-shard-size", "50KB")
    assert "in bfloat16" in out
    index = json.loads((d / "back" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    back = {}
    for f in files:
        assert os.path.getsize(d / "back" / f) <= 50_000 + 4096     # a shard: 50 KB of tensors and its header
        back.update(load_file(str(d / "back" / f)))
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in back.values())
    original = model.state_dict()
    assert sorted(back) == sorted(original)
    for k, t in original.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], t), k        # bit for bit, in bf16
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (d / "back" / f).read_bytes() == (d / "hf" / f).read_bytes()
    assert json.loads((d / "back" / "generation_config.json").read_text())["eos_token_id"] == 2
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(d / "back"))
    assert reloaded.dtype == torch.bfloat16
    assert transformers.AutoTokenizer.from_pretrained(str(d / "back")) is not None
    # --dtype: the same weights in float32, one file
    _tool("export", "--load", str(d / "mg"), "--out", str(d / "fp32"), "--dtype", "float32")
    single = load_file(str(d / "fp32" / "model.safetensors"))
    assert not (d / "fp32" / "model.safetensors.index.json").exists()
    assert all(single[k].dtype == torch.float32 and torch.equal(single[k], t.float()) for k, t in original.items())
