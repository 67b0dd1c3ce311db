"""Hugging Face Llama <-> megatron checkpoints: same logits at TP=1 and TP=2, exact round trip."""
import os
import subprocess
import sys

import pytest
import torch

import megatron_cases as mc

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    from megatron_moba.hf_convert import read_hf_config
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "num_attention_heads": 2, "hidden_size": 8}')
    with pytest.raises(ValueError, match="not a Llama-architecture model"):
        read_hf_config(str(tmp_path))
