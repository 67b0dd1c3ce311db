"""Hugging Face checkpoints (Llama, Mistral, Qwen2/2.5, Qwen3) <-> megatron-core GPT weights.

Import reads ``config.json`` (checked field by field: ``megatron_moba.hf.families``) and
``*.safetensors`` (never pickles).  Every tensor of the checkpoint is carried into the megatron
model or the import fails naming it; the same holds the other way for export, which writes a
``config.json`` + ``model.safetensors`` that transformers loads with no missing or unexpected weight.
The megatron side uses the local layer spec's parameter names with full (unsharded) tensors;
``dist_checkpointing`` reshards them to any TP/PP when the checkpoint is loaded.

Layouts that differ:
* ``linear_qkv.weight`` (and ``.bias``, Qwen2's ``--add-qkv-bias``): per query group, the group's
  query heads, then its key head, then its value head (HF keeps q, k, v separate);
* ``linear_fc1.weight``: ``[gate; up]`` (HF: ``gate_proj``, ``up_proj``);
* Qwen3's per-head ``q_norm``/``k_norm``: megatron's ``q_layernorm``/``k_layernorm`` (``--qk-layernorm``);
* vocabulary rows padded to a multiple of 128 (kept out of the HF side).

``import --hybrid`` writes the checkpoint of a HybridModel (megatron-core 0.19+) instead: pattern
``*-`` per HF layer (``--num-layers`` twice the HF layers), weights renamed by
``megatron_moba.core.hybrid_pattern.gpt_to_hybrid``; export reads either.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
from functools import partial
from types import SimpleNamespace
from typing import Callable, Dict, List, Tuple

import torch

from megatron_moba.core import hybrid_pattern
from megatron_moba.core.model import padded_vocab_size
from megatron_moba.hf.families import (
    Architecture,
    architecture,
    model_flags,
    read_hf_config,
    run_flags,
    tokenizer_flags,
    with_rope,
)
from megatron_moba.hf.safetensors_io import DTYPES, HFWeights, save_sharded

__all__ = ["read_hf_config", "megatron_args", "model_flags", "tokenizer_flags", "load_safetensors",
           "hf_to_megatron", "megatron_to_hf", "hf_import", "import_to_checkpoint", "export_from_checkpoint",
           "run_import", "run_export", "run_flags"]

megatron_args = model_flags          # the model flags (the name earlier releases used)


def load_safetensors(hf_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files of ``hf_dir``; a tensor in two files, or one that
    ``model.safetensors.index.json`` lists but no file holds, fails naming it."""
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir} (pickled .bin checkpoints are not loaded)")
    weights, where = {}, {}
    for f in files:
        for name, t in load_file(f).items():
            if name in weights:
                raise ValueError(f"tensor {name} is in both {where[name]} and {f}")
            weights[name], where[name] = t, f
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            listed = json.load(fh).get("weight_map", {})
        absent = sorted(set(listed) - set(weights))
        if absent:
            raise ValueError(f"{index} lists tensors no *.safetensors file in {hf_dir} holds: {absent[:8]}")
    return weights


def _hf_shapes(a: Architecture) -> Dict[str, tuple]:
    """The HF tensors of this architecture and their shapes."""
    h, d = a.hidden, a.head_dim
    out = {"model.embed_tokens.weight": (a.vocab, h), "model.norm.weight": (h,)}
    if not a.tied:
        out["lm_head.weight"] = (a.vocab, h)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (a.heads * d, h), p + "self_attn.k_proj.weight": (a.groups * d, h),
                    p + "self_attn.v_proj.weight": (a.groups * d, h), p + "self_attn.o_proj.weight": (h, a.heads * d),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (a.ffn, h), p + "mlp.up_proj.weight": (a.ffn, h),
                    p + "mlp.down_proj.weight": (h, a.ffn)})
        if a.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (a.heads * d,), p + "self_attn.k_proj.bias": (a.groups * d,),
                        p + "self_attn.v_proj.bias": (a.groups * d,)})
        if a.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return out


def _shape_of(hf, name: str) -> tuple:
    return hf.shapes[name] if isinstance(hf, HFWeights) else tuple(hf[name].shape)


def _check_hf_tensors(a: Architecture, hf) -> None:
    """``hf``: a dict of tensors, or ``HFWeights`` (shapes from the headers; nothing loaded but a tied
    checkpoint's two output matrices, compared)."""
    expected = _hf_shapes(a)
    if a.tied and "lm_head.weight" in hf:      # some tied checkpoints store the output layer too
        if "model.embed_tokens.weight" not in hf or not torch.equal(hf["lm_head.weight"],
                                                                    hf["model.embed_tokens.weight"]):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight, but tie_word_embeddings is "
                             "true: the model would not be the one this checkpoint's output layer computes")
        expected["lm_head.weight"] = (a.vocab, a.hidden)
    missing = sorted(set(expected) - set(iter(hf)))
    if missing:
        raise ValueError(f"the HF checkpoint lacks tensors its config needs: {missing[:8]}"
                         + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
    extra = sorted(set(iter(hf)) - set(expected))
    if extra:
        raise ValueError(f"HF tensor(s) {extra[:8]} are not carried by the conversion of a {a.model_type} model "
                         "(unknown to it): refusing to drop them" + (f" (and {len(extra) - 8} more)"
                                                                     if len(extra) > 8 else ""))
    for name, shape in expected.items():
        if _shape_of(hf, name) != shape:
            raise ValueError(f"HF tensor {name} has shape {_shape_of(hf, name)}, the config implies {shape}")


def hf_to_megatron(cfg: dict, hf: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Megatron parameters (full tensors) from every tensor of an HF checkpoint (checked first)."""
    return {k: make() for k, make in hf_to_megatron_lazy(cfg, hf).items()}


def hf_to_megatron_lazy(cfg: dict, hf) -> Dict[str, Callable[[], torch.Tensor]]:
    """{megatron parameter: a function making it} from an HF checkpoint (a dict of tensors, or
    ``HFWeights``: each function then loads the HF tensors it needs, one parameter at a time).  The
    checkpoint's names and shapes are checked first."""
    a = architecture(cfg)
    _check_hf_tensors(a, hf)
    h = a.hidden
    vocab = padded_vocab_size(a.vocab)

    def pad_rows(name):
        w = hf[name]
        return torch.cat([w, w.new_zeros(vocab - w.shape[0], w.shape[1])]) if w.shape[0] < vocab else w

    def qkv(p, kind):
        shape = (a.groups, -1, h) if kind == "weight" else (a.groups, -1)
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"].reshape(shape) for x in "qkv")
        out = torch.cat([q, k, v], dim=1)
        return out.reshape(-1, h) if kind == "weight" else out.reshape(-1)

    def take(name):
        return lambda: hf[name]
    out = {"embedding.word_embeddings.weight": lambda: pad_rows("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": take("model.norm.weight")}
    if not a.tied:
        out["output_layer.weight"] = lambda: pad_rows("lm_head.weight")
    for i in range(a.layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "self_attention.linear_qkv.weight"] = partial(qkv, p, "weight")
        if a.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = partial(qkv, p, "bias")
        if a.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = take(p + "self_attn.q_norm.weight")
            out[m + "self_attention.k_layernorm.weight"] = take(p + "self_attn.k_norm.weight")
        out[m + "self_attention.linear_proj.weight"] = take(p + "self_attn.o_proj.weight")
        out[m + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = partial(lambda p: torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                                        hf[p + "mlp.up_proj.weight"]]), p)
        out[m + "mlp.linear_fc2.weight"] = take(p + "mlp.down_proj.weight")
    return out


def megatron_to_hf(cfg: dict, mg: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The HF checkpoint's tensors from the megatron parameters; every parameter is used."""
    return {k: make() for k, (_, make) in megatron_to_hf_lazy(cfg, mg).items()}


def megatron_to_hf_lazy(cfg: dict, mg: Dict[str, torch.Tensor]) -> Dict[str, Tuple[tuple, Callable]]:
    """{HF tensor: (shape, a function making it, contiguous)} from the megatron parameters, in the HF
    checkpoint's order; every parameter is used (else the conversion fails naming it)."""
    a = architecture(cfg)
    d, qpg = a.head_dim, a.heads // a.groups
    shapes = _hf_shapes(a)
    used = set()

    def take(name):
        used.add(name)
        return name

    def split_qkv(name, which):
        t = mg[name]
        parts = t.view(a.groups, (qpg + 2) * d, *t.shape[1:]).split([qpg * d, d, d], dim=1)
        return parts["qkv".index(which)].reshape(-1, *t.shape[1:]).contiguous()

    def rows(name, n=None, half=None):
        t = mg[name]
        if half is not None:
            t = t.chunk(2)[half]
        return (t[:n] if n is not None else t).contiguous()
    out = {"model.embed_tokens.weight": partial(rows, take("embedding.word_embeddings.weight"), a.vocab)}
    for i in range(a.layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for x in "qkv":
            out[f"{p}self_attn.{x}_proj.weight"] = partial(split_qkv, take(m + "self_attention.linear_qkv.weight"), x)
        if a.qkv_bias:
            for x in "qkv":
                out[f"{p}self_attn.{x}_proj.bias"] = partial(split_qkv, take(m + "self_attention.linear_qkv.bias"), x)
        if a.qk_norm:
            out[p + "self_attn.q_norm.weight"] = partial(rows, take(m + "self_attention.q_layernorm.weight"))
            out[p + "self_attn.k_norm.weight"] = partial(rows, take(m + "self_attention.k_layernorm.weight"))
        out[p + "self_attn.o_proj.weight"] = partial(rows, take(m + "self_attention.linear_proj.weight"))
        out[p + "input_layernorm.weight"] = partial(rows, take(m + "input_layernorm.weight"))
        out[p + "post_attention_layernorm.weight"] = partial(rows, take(m + "pre_mlp_layernorm.weight"))
        fc1 = take(m + "mlp.linear_fc1.weight")
        out[p + "mlp.gate_proj.weight"] = partial(rows, fc1, None, 0)
        out[p + "mlp.up_proj.weight"] = partial(rows, fc1, None, 1)
        out[p + "mlp.down_proj.weight"] = partial(rows, take(m + "mlp.linear_fc2.weight"))
    out["model.norm.weight"] = partial(rows, take("decoder.final_layernorm.weight"))
    if not a.tied:
        out["lm_head.weight"] = partial(rows, take("output_layer.weight"), a.vocab)
    left = sorted(set(mg) - used)
    if left:
        raise ValueError(f"megatron parameters {left[:8]} have no place in a {a.model_type} HF checkpoint: "
                         "refusing to drop them")
    return {k: (shapes[k], make) for k, make in out.items()}


def hf_import(hf_dir: str, replace_sliding_window: bool = False) -> Tuple[dict, Dict[str, torch.Tensor]]:
    cfg = read_hf_config(hf_dir, replace_sliding_window)
    return cfg, hf_to_megatron(cfg, load_safetensors(hf_dir))


def hf_dtype(cfg: dict) -> torch.dtype:
    """The dtype the HF config names (``torch_dtype``, transformers 5's ``dtype``; float32 without one)."""
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.json names dtype {name!r}; the conversion handles {sorted(DTYPES)}")
    return DTYPES[name]


def _dtype_flags(dtype: torch.dtype) -> List[str]:
    """The job's flags for a model whose weights are ``dtype`` (bf16/fp16 weights: megatron's optimizer)."""
    if dtype == torch.float32:
        return []
    return ["--bf16" if dtype == torch.bfloat16 else "--fp16", "--optimizer-impl", "megatron"]


def _build(cfg: dict, extra_flags=(), world_size: int = 1, hybrid: bool = False, dtype: torch.dtype = torch.float32):
    """The megatron model (this process's part) for an HF config, with ``dtype`` weights, and its parsed
    flags; ``hybrid``: the HybridModel of pattern ``*-`` per HF layer instead of a GPT."""
    from megatron_moba.training.arguments import parse_args
    from megatron_moba.training.model import build_model
    a = architecture(cfg)
    flags = model_flags(cfg, hybrid)
    flags += ["--seq-length", str(a.max_positions), "--train-iters", "1", "--mock-data", "--vocab-size", str(a.vocab),
              *_dtype_flags(dtype), *extra_flags]
    args = parse_args(flags, world_size=world_size, cuda=False)
    args.skip_weight_init = True          # every weight is loaded: no random initialization (time, memory)
    model = build_model(args, SimpleNamespace(vocab_size=a.vocab))      # the model's rows, not a tokenizer's
    return model, args


def _check_empty(save_dir: str) -> None:
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        what = sorted(os.listdir(save_dir))[:5] if os.path.isdir(save_dir) else "a file"
        raise FileExistsError(f"--save {save_dir} is not an empty directory (it holds {what}): importing there "
                              "would replace its latest_checkpointed_iteration.txt and the checkpoints it names; "
                              "import into a new or empty directory")


def import_to_checkpoint(hf_dir: str, save_dir: str, replace_sliding_window: bool = False,
                         hybrid: bool = False) -> list:
    """HF directory -> megatron dist checkpoint (weights only, iteration 0; loads at any TP/PP with
    ``--load save_dir --finetune``), of a GPTModel or (``hybrid``) a HybridModel, in the dtype the HF
    config names.  The model is filled one parameter at a time from the HF tensors it needs (read one
    at a time from the safetensors files).  Returns the flags to train with (model and tokenizer)."""
    from megatron_moba.training.checkpointing import save_checkpoint
    _check_empty(save_dir)
    cfg = read_hf_config(hf_dir, replace_sliding_window)
    hf = HFWeights(hf_dir)
    makers = hf_to_megatron_lazy(cfg, hf)              # names and shapes checked here, nothing loaded yet
    tok = tokenizer_flags(hf_dir, cfg)
    model, args = _build(cfg, tok, hybrid=hybrid, dtype=hf_dtype(cfg))
    if hybrid:
        makers = hybrid_pattern.gpt_to_hybrid(makers)
    params = dict(model.named_parameters())
    missing, unused = sorted(set(params) - set(makers)), sorted(set(makers) - set(params))
    if missing or unused:
        raise ValueError(f"HF -> megatron name mismatch: missing {missing[:5]}, unused {unused[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            w = makers[name]()
            if p.shape != w.shape:
                raise ValueError(f"{name}: megatron shape {tuple(p.shape)} != converted {tuple(w.shape)}")
            p.copy_(w)
            del w
    save_checkpoint(save_dir, 0, model, None, None, 0, args, extra={"hf_config": cfg})
    return model_flags(cfg, hybrid) + tok


def _config_for_checkpoint(cfg: dict, saved: dict, path: str, source: str, trained: bool) -> dict:
    """``cfg`` checked against the flags the checkpoint was trained with (``saved``), and, for a
    checkpoint of the training job (``trained``), updated with what training may change without
    changing the weights' shapes: RoPE base and scaling, positions, MoBA settings."""
    if not saved:
        return cfg
    a = architecture(cfg, source)
    pattern = saved.get("hybrid_layer_pattern")
    if pattern:
        if not hybrid_pattern.is_gpt_pattern(pattern):
            raise ValueError(f"{path} is a HybridModel of --hybrid-layer-pattern {pattern!r}: an HF {a.model_type} "
                             "checkpoint holds the pattern '*-' repeated (attention, then MLP, per layer) only")
        saved = dict(saved, num_layers=hybrid_pattern.layer_counts(int(saved["num_layers"]), pattern)[0])
    expect = {"num_layers": a.layers, "hidden_size": a.hidden, "ffn_hidden_size": a.ffn,
              "num_attention_heads": a.heads, "num_query_groups": a.groups, "kv_channels": a.head_dim,
              "untie_embeddings_and_output_weights": not a.tied, "normalization": "RMSNorm", "swiglu": True,
              "disable_bias_linear": True, "add_qkv_bias": a.qkv_bias,
              "qk_layernorm": a.qk_norm, "position_embedding_type": "rope"}
    if saved.get("padded_vocab_size"):
        expect["padded_vocab_size"] = padded_vocab_size(a.vocab)
    found = {k: v for k, v in saved.items() if k in expect}
    found.setdefault("add_qkv_bias", False)          # flags newer than the checkpoint: their defaults
    found.setdefault("qk_layernorm", False)
    if found.get("num_query_groups") is None:
        found["num_query_groups"] = saved.get("num_attention_heads")
    if found.get("ffn_hidden_size") is None and saved.get("hidden_size"):      # megatron's default: 4 x hidden
        found["ffn_hidden_size"] = 4 * saved["hidden_size"]
    if found.get("kv_channels") is None and saved.get("hidden_size") and saved.get("num_attention_heads"):
        found["kv_channels"] = saved["hidden_size"] // saved["num_attention_heads"]
    wrong = [f"{k}: checkpoint {found.get(k)!r}, HF config {v!r}" for k, v in expect.items()
             if k in found and found[k] != v]
    if wrong:
        raise ValueError(f"{path} does not have the architecture of the HF config {source}: " + "; ".join(wrong))
    out = dict(cfg)
    if not trained:
        return out
    if saved.get("position_embedding_type", "rope") == "rope" and saved.get("rotary_base"):
        factor = (saved.get("rope_scaling_factor") or 8.0) if saved.get("use_rope_scaling") else None
        if (int(saved["rotary_base"]), factor) != (int(a.rope_theta), a.rope_scaling_factor):
            out = with_rope(out, float(saved["rotary_base"]), factor)
    if saved.get("max_position_embeddings"):
        out["max_position_embeddings"] = max(a.max_positions, int(saved["max_position_embeddings"]))
    if saved.get("attention", "moba") == "moba" and saved.get("moba_chunk_size"):
        out["moba_chunk_size"], out["moba_topk"] = saved["moba_chunk_size"], saved["moba_topk"]
        layers, last = int(saved["num_layers"]), int(saved.get("moba_full_attn_layers") or 0)
        full = set(range(layers - last + 1, layers + 1)) | set(saved.get("moba_full_attn_layer_list") or [])
        out["moba_full_attn_layers"] = sorted(n - 1 for n in full)     # 0-based, as transformers' layer_idx
    architecture(out, source)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _checkpoint_dtype(saved: dict) -> torch.dtype:
    """The dtype of a checkpoint's model weights, from the flags it was saved with: bf16/fp16 weights with
    megatron's optimizer (an import of a bf16 model, a GPU run with --bf16), else fp32."""
    if saved.get("optimizer_impl") == "megatron" and saved.get("bf16"):
        return torch.bfloat16
    if saved.get("fp16"):
        return torch.float16
    return torch.float32


def _tokenizer_source(saved: dict, tokenizer_dir=None):
    if tokenizer_dir:
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"--tokenizer-dir {tokenizer_dir} is not a directory")
        return tokenizer_dir
    model = saved.get("tokenizer_model")
    if saved.get("tokenizer_type") in ("HuggingFaceTokenizer", "SentencePieceTokenizer") and model:
        d = model if os.path.isdir(model) else os.path.dirname(model)
        return d if os.path.isdir(d) else None
    return None


def _write_side_files(cfg: dict, out_dir: str, source) -> List[str]:
    """Tokenizer files of ``source`` and a generation_config.json (``source``'s, else from the config's
    token ids, as transformers makes one); returns the files written."""
    import shutil
    written = []
    for name in TOKENIZER_FILES:
        if source and os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
            written.append(name)
    gen = os.path.join(source, "generation_config.json") if source else None
    if gen and os.path.isfile(gen):
        shutil.copyfile(gen, os.path.join(out_dir, "generation_config.json"))
    else:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump({k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
                      | {"_from_model_config": True}, f, indent=2)
    return written + ["generation_config.json"]


def export_from_checkpoint(load_dir: str, out_dir: str, hf_config=None, replace_sliding_window: bool = False,
                           dtype=None, max_shard_size="5GB", tokenizer_dir=None) -> dict:
    """megatron dist checkpoint (from this project) -> HF directory: config.json, the weights sharded as
    transformers' ``save_pretrained`` (``max_shard_size``), the tokenizer files (of ``tokenizer_dir``, else
    of the tokenizer the checkpoint was trained with) and generation_config.json.  The weights keep the
    checkpoint's dtype unless ``dtype`` (a torch dtype or its name).  The HF config is the one carried
    from the import unless ``hf_config`` (a dict, or the path of a config.json or of an HF directory) is
    given; its RoPE base and scaling, positions and MoBA settings follow the flags the checkpoint was
    trained with.  Returns what was written."""
    from megatron.core import dist_checkpointing

    from megatron_moba.training.checkpointing import checkpoint_dir, load_checkpoint, read_latest
    path = checkpoint_dir(load_dir, read_latest(load_dir))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is missing (named by {load_dir}/latest_checkpointed_iteration.txt)")
    common = dist_checkpointing.load_common_state_dict(path)
    if isinstance(hf_config, str):
        source, cfg = hf_config, read_hf_config(hf_config, replace_sliding_window)
    elif hf_config is not None:
        source, cfg = "given", hf_config
    else:
        source, cfg = "stored at import", common.get("hf_config")
    if cfg is None:
        raise ValueError(f"{path} has no stored HF config (neither imported from HF nor trained from an imported "
                         "checkpoint): pass --hf-config with the config.json (or directory) of the HF model it has "
                         "the architecture of")
    saved = common.get("args") or {}
    cfg = _config_for_checkpoint(cfg, saved, path, source, trained="scheduler" in common)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    stored = _checkpoint_dtype(saved)
    out_dtype = dtype or stored
    tokenizer_source = _tokenizer_source(saved, tokenizer_dir)
    hybrid = bool(saved.get("hybrid_layer_pattern"))
    model, _ = _build(cfg, hybrid=hybrid, dtype=stored)
    load_checkpoint(load_dir, model, finetune=True)
    weights = {k: v.detach() for k, v in model.named_parameters()}
    if hybrid:
        weights = hybrid_pattern.hybrid_to_gpt(weights)
    makers = megatron_to_hf_lazy(cfg, weights)
    files = save_sharded(makers, out_dir, out_dtype, max_shard_size)
    name = {v: k for k, v in DTYPES.items()}[out_dtype]
    cfg = dict(cfg)
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    side = _write_side_files(cfg, out_dir, tokenizer_source)
    return {"weights": files, "dtype": name, "side_files": side, "tokenizer_source": tokenizer_source}


def release_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once (mallopt M_MMAP_THRESHOLD 1 MiB,
    M_TRIM_THRESHOLD 0): a conversion frees one tensor-sized block after another, which glibc's dynamic
    threshold would otherwise keep in the heap, adding to the peak.  No effect without glibc."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)         # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)               # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _single_process() -> None:
    """One process (TP = PP = CP = 1): the parallel state the conversions build their model in."""
    release_freed_memory()
    from megatron_moba.training.parallel import initialize_distributed
    initialize_distributed(SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                           context_parallel_size=1, seed=0))


def _note_without_tokenizer(flags: List[str], hf_dir: str) -> str:
    if "--tokenizer-type" in flags:
        return ""
    return (f"\nnote: {hf_dir} has no tokenizer.json or tokenizer.model: add the model's tokenizer "
            "(--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR) to these flags")


def run_import(hf_dir: str, save_dir: str, replace_sliding_window: bool = False, hybrid: bool = False) -> list:
    """What ``tools/convert_hf_checkpoint.py import`` does: ``import_to_checkpoint`` in one process,
    then print the flags to train with (shell-quoted).  Returns them.  Without CUDA the caller applies
    the CPU shim first (megatron_moba.training.compat.apply_patches)."""
    read_hf_config(hf_dir, replace_sliding_window)          # a refused config fails before any setup
    if hybrid:
        from megatron_moba.core.versions import require_hybrid_model
        require_hybrid_model("--hybrid")
    _single_process()
    flags = import_to_checkpoint(hf_dir, save_dir, replace_sliding_window, hybrid)
    print(f"wrote {save_dir} (iteration 0, weights only). Train with:\n  --load {save_dir} --finetune "
          + " ".join(shlex.quote(f) for f in flags) + _note_without_tokenizer(flags, hf_dir))
    return flags


def run_export(load_dir: str, out_dir: str, hf_config=None, replace_sliding_window: bool = False, dtype=None,
               max_shard_size="5GB", tokenizer_dir=None) -> dict:
    """What ``tools/convert_hf_checkpoint.py export`` does: ``export_from_checkpoint`` in one process."""
    _single_process()
    out = export_from_checkpoint(load_dir, out_dir, hf_config, replace_sliding_window, dtype, max_shard_size,
                                 tokenizer_dir)
    print(f"wrote {out_dir}: config.json, {len(out['weights'])} safetensors file(s) in {out['dtype']} "
          f"({', '.join(out['weights'])}), " + ", ".join(out["side_files"])
          + ("" if out["tokenizer_source"] else "; no tokenizer files (the checkpoint names no tokenizer "
                                                  "directory): pass --tokenizer-dir"))
    return out
