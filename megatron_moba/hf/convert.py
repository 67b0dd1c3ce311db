"""Llama-architecture Hugging Face checkpoints <-> megatron-core GPT weights.

Import reads ``config.json`` and ``*.safetensors`` (never pickles); export writes the same.
The megatron side uses the local layer spec's parameter names with full (unsharded)
tensors; ``dist_checkpointing`` reshards them to any TP/PP when the checkpoint is loaded.

Layouts that differ:
* ``linear_qkv.weight``: per query group, the group's query heads, then its key head, then
  its value head (HF keeps q, k, v separate);
* ``linear_fc1.weight``: ``[gate; up]`` (HF: ``gate_proj``, ``up_proj``);
* vocabulary rows padded to a multiple of 128 (kept out of the HF side).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Tuple

import torch

from megatron_moba.core.model import padded_vocab_size


def read_hf_config(hf_dir: str) -> dict:
    """The checked Llama config of an HF checkpoint directory (or of a ``config.json`` file)."""
    path = hf_dir if os.path.isfile(hf_dir) else os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a Hugging Face checkpoint directory")
    cfg = json.load(open(path))
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") not in ("llama", "mistral", "qwen2") and not any("Llama" in a for a in arch):
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} is not a Llama-architecture model")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise ValueError(f"{path}: head_dim {head_dim} x heads {heads} != hidden_size {cfg['hidden_size']}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {cfg.get('hidden_act')!r} is not supported (SwiGLU needs silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{path}: biases in attention/MLP are not supported")
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    scaling = (cfg.get("rope_parameters") or {}).get("rope_type", "default")
    if cfg.get("rope_scaling") or scaling != "default":
        raise ValueError(f"{path}: RoPE scaling ({cfg.get('rope_scaling') or scaling}) is not supported")
    return cfg | {"rope_theta": float(rope)}


def megatron_args(cfg: dict) -> list:
    """The pretraining flags that describe this HF model."""
    args = ["--num-layers", cfg["num_hidden_layers"], "--hidden-size", cfg["hidden_size"],
            "--ffn-hidden-size", cfg["intermediate_size"], "--num-attention-heads", cfg["num_attention_heads"],
            "--num-query-groups", cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            "--normalization", "RMSNorm", "--norm-epsilon", cfg.get("rms_norm_eps", 1e-6), "--swiglu",
            "--disable-bias-linear",
            "--rotary-base", int(cfg["rope_theta"]), "--max-position-embeddings", cfg["max_position_embeddings"]]
    if not cfg.get("tie_word_embeddings", False):
        args.append("--untie-embeddings-and-output-weights")
    return [str(a) for a in args]


def load_safetensors(hf_dir: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir} (pickled .bin checkpoints are not loaded)")
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _qkv_layout(cfg):
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    return heads, groups, cfg["hidden_size"] // heads


def hf_to_megatron(cfg: dict, hf: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    heads, groups, d = _qkv_layout(cfg)
    h = cfg["hidden_size"]
    vocab = padded_vocab_size(cfg["vocab_size"])

    def pad_rows(w):
        return torch.cat([w, w.new_zeros(vocab - w.shape[0], w.shape[1])]) if w.shape[0] < vocab else w
    out = {"embedding.word_embeddings.weight": pad_rows(hf["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not cfg.get("tie_word_embeddings", False):
        out["output_layer.weight"] = pad_rows(hf["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf[p + "self_attn.q_proj.weight"].view(groups, heads // groups * d, h)
        k = hf[p + "self_attn.k_proj.weight"].view(groups, d, h)
        v = hf[p + "self_attn.v_proj.weight"].view(groups, d, h)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, h)
        out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def megatron_to_hf(cfg: dict, mg: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    heads, groups, d = _qkv_layout(cfg)
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    out = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": mg["decoder.final_layernorm.weight"]}
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = mg["output_layer.weight"][:vocab]
    for i in range(cfg["num_hidden_layers"]):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = mg[m + "self_attention.linear_qkv.weight"].view(groups, (heads // groups + 2) * d, h)
        q, k, v = qkv.split([heads // groups * d, d, d], dim=1)
        out[p + "self_attn.q_proj.weight"] = q.reshape(-1, h)
        out[p + "self_attn.k_proj.weight"] = k.reshape(-1, h)
        out[p + "self_attn.v_proj.weight"] = v.reshape(-1, h)
        out[p + "self_attn.o_proj.weight"] = mg[m + "self_attention.linear_proj.weight"]
        out[p + "input_layernorm.weight"] = mg[m + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = mg[m + "pre_mlp_layernorm.weight"]
        gate, up = mg[m + "mlp.linear_fc1.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = mg[m + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def save_hf(cfg: dict, weights: Dict[str, torch.Tensor], out_dir: str) -> None:
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def hf_import(hf_dir: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    cfg = read_hf_config(hf_dir)
    return cfg, hf_to_megatron(cfg, load_safetensors(hf_dir))


def _build(cfg: dict, extra_flags=(), world_size: int = 1):
    """The megatron model (this process's part) for an HF config, and its parsed flags."""
    from megatron_moba.core.model import build_moba_gpt
    from megatron_moba.training.arguments import config_from_args, parse_args
    flags = megatron_args(cfg) + ["--seq-length", str(cfg["max_position_embeddings"]), "--train-iters", "1",
                                  "--mock-data", "--vocab-size", str(cfg["vocab_size"]), *extra_flags]
    args = parse_args(flags, world_size=world_size)
    config = config_from_args(args)
    model = build_moba_gpt(config, padded_vocab_size(cfg["vocab_size"]), args.seq_length,
                           rotary_base=args.rotary_base,
                           share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    return model, args


def import_to_checkpoint(hf_dir: str, save_dir: str) -> list:
    """HF Llama directory -> megatron dist checkpoint (weights only, iteration 0; loads at any
    TP/PP with ``--load save_dir --finetune``).  Returns the model flags to train with."""
    from megatron_moba.training.checkpointing import save_checkpoint
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        what = sorted(os.listdir(save_dir))[:5] if os.path.isdir(save_dir) else "a file"
        raise FileExistsError(f"--save {save_dir} is not an empty directory (it holds {what}): importing there "
                              "would replace its latest_checkpointed_iteration.txt and the checkpoints it names; "
                              "import into a new or empty directory")
    cfg, weights = hf_import(hf_dir)
    model, args = _build(cfg)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(weights))
    unused = sorted(set(weights) - set(params))
    if missing or unused:
        raise ValueError(f"HF -> megatron name mismatch: missing {missing[:5]}, unused {unused[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != weights[name].shape:
                raise ValueError(f"{name}: megatron shape {tuple(p.shape)} != converted {tuple(weights[name].shape)}")
            p.copy_(weights[name])
    save_checkpoint(save_dir, 0, model, None, None, 0, args, extra={"hf_config": cfg})
    return megatron_args(cfg)


def _config_for_checkpoint(cfg: dict, saved: dict, path: str, source: str, trained: bool) -> dict:
    """``cfg`` checked against the flags the checkpoint was trained with (``saved``), and, for a
    checkpoint of the training job (``trained``), updated with what training may change without
    changing the weights' shapes: RoPE base, positions, MoBA settings."""
    if not saved:
        return cfg
    heads = cfg["num_attention_heads"]
    expect = {"num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
              "ffn_hidden_size": cfg["intermediate_size"], "num_attention_heads": heads,
              "num_query_groups": cfg.get("num_key_value_heads") or heads,
              "untie_embeddings_and_output_weights": not cfg.get("tie_word_embeddings", False),
              "normalization": "RMSNorm", "swiglu": True, "disable_bias_linear": True,
              "position_embedding_type": "rope"}
    if saved.get("padded_vocab_size"):
        expect["padded_vocab_size"] = padded_vocab_size(cfg["vocab_size"])
    found = dict(saved)
    if found.get("num_query_groups") is None:
        found["num_query_groups"] = found.get("num_attention_heads")
    if found.get("ffn_hidden_size") is None and found.get("hidden_size"):      # megatron's default: 4 x hidden
        found["ffn_hidden_size"] = 4 * found["hidden_size"]
    wrong = [f"{k}: checkpoint {found.get(k)!r}, HF config {v!r}" for k, v in expect.items()
             if k in found and found[k] != v]
    if wrong:
        raise ValueError(f"{path} does not have the architecture of the HF config {source}: " + "; ".join(wrong))
    out = dict(cfg)
    if not trained:
        return out
    if saved.get("rotary_base") and int(saved["rotary_base"]) != int(cfg["rope_theta"]):
        out["rope_theta"] = float(saved["rotary_base"])
        if isinstance(out.get("rope_parameters"), dict):
            out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": float(saved["rotary_base"])}
    if saved.get("max_position_embeddings"):
        out["max_position_embeddings"] = max(int(cfg["max_position_embeddings"]), int(saved["max_position_embeddings"]))
    if saved.get("attention", "moba") == "moba" and saved.get("moba_chunk_size"):
        out["moba_chunk_size"], out["moba_topk"] = saved["moba_chunk_size"], saved["moba_topk"]
        layers, last = int(saved["num_layers"]), int(saved.get("moba_full_attn_layers") or 0)
        full = set(range(layers - last + 1, layers + 1)) | set(saved.get("moba_full_attn_layer_list") or [])
        out["moba_full_attn_layers"] = sorted(n - 1 for n in full)     # 0-based, as transformers' layer_idx
    return out


def export_from_checkpoint(load_dir: str, out_dir: str, hf_config=None) -> None:
    """megatron dist checkpoint (from this project) -> HF Llama directory (config.json +
    model.safetensors).  The HF config is the one carried from the import unless ``hf_config``
    (a dict, or the path of a config.json or of an HF directory) is given; its RoPE base,
    positions and MoBA settings follow the flags the checkpoint was trained with."""
    from megatron.core import dist_checkpointing

    from megatron_moba.training.checkpointing import checkpoint_dir, load_checkpoint, read_latest
    path = checkpoint_dir(load_dir, read_latest(load_dir))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is missing (named by {load_dir}/latest_checkpointed_iteration.txt)")
    common = dist_checkpointing.load_common_state_dict(path)
    if isinstance(hf_config, str):
        source, cfg = hf_config, read_hf_config(hf_config)
    elif hf_config is not None:
        source, cfg = "given", hf_config
    else:
        source, cfg = "stored at import", common.get("hf_config")
    if cfg is None:
        raise ValueError(f"{path} has no stored HF config (neither imported from HF nor trained from an imported "
                         "checkpoint): pass --hf-config with the config.json (or directory) of the HF model it has "
                         "the architecture of")
    cfg = _config_for_checkpoint(cfg, common.get("args") or {}, path, source, trained="scheduler" in common)
    model, _ = _build(cfg)
    load_checkpoint(load_dir, model, finetune=True)
    weights = {k: v.detach().cpu() for k, v in model.named_parameters()}
    save_hf(cfg, megatron_to_hf(cfg, weights), out_dir)


def _single_process() -> None:
    """One process (TP = PP = CP = 1): the parallel state the conversions build their model in."""
    from types import SimpleNamespace

    from megatron_moba.training.parallel import initialize_distributed
    initialize_distributed(SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                           context_parallel_size=1, seed=0))


def run_import(hf_dir: str, save_dir: str) -> list:
    """What ``tools/convert_hf_checkpoint.py import`` does: ``import_to_checkpoint`` in one process,
    then print the flags to train with.  Returns them.  Without CUDA the caller applies the CPU shim
    first (megatron_moba.training.compat.apply_patches)."""
    _single_process()
    flags = import_to_checkpoint(hf_dir, save_dir)
    print(f"wrote {save_dir} (iteration 0, weights only). Train with:\n  --load {save_dir} --finetune "
          + " ".join(flags))
    return flags


def run_export(load_dir: str, out_dir: str, hf_config=None) -> None:
    """What ``tools/convert_hf_checkpoint.py export`` does: ``export_from_checkpoint`` in one process."""
    _single_process()
    export_from_checkpoint(load_dir, out_dir, hf_config)
    print(f"wrote {out_dir}/config.json and model.safetensors")
