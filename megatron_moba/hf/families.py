"""The Hugging Face model families the converter reads, and what it refuses.

``read_hf_config`` checks a ``config.json`` field by field: every field that changes what the model
computes is mapped to a flag of the pretraining job (``model_flags``) or refused with an error that
names it; the rest (token ids, dtype, init, versions) are listed in ``_METADATA``.  An unknown field
is refused too: it might change the model.  Absent fields take the transformers 5 defaults of the
family (``_DEFAULTS``), except the ones whose default differs between families and releases.

Supported (transformers ``model_type``):

* ``llama``: Llama 2, Llama 3, Llama 3.1/3.2/3.3 (RoPE scaling ``llama3``), tied or untied embeddings;
* ``mistral``: Mistral without a sliding window (``sliding_window: null``, e.g. v0.3); a set window
  is refused unless ``replace_sliding_window`` (MoBA or full attention replaces it);
* ``qwen2``: Qwen2 / Qwen2.5 (q/k/v biases: ``--add-qkv-bias``);
* ``qwen3``: Qwen3 dense (per-head QK RMSNorm: ``--qk-layernorm``; head dim: ``--kv-channels``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

from megatron_moba.core import hybrid_pattern

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}

# fields that do not change what the model computes
_METADATA = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
             "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
             "pretraining_tp",          # Llama: splits the projections' matmuls in slices; same function
             "output_attentions", "output_hidden_states", "return_dict", "use_bfloat16", "tokenizer_class",
             "max_window_layers",       # Qwen: only used to derive layer_types (checked below)
             # PretrainedConfig's bookkeeping and generation defaults (in configs saved from to_dict())
             "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "finetuning_task", "prefix",
             "torchscript", "tf_legacy_loss", "sep_token_id", "decoder_start_token_id", "task_specific_params",
             "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
             "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
             "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
             "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
             "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
             "suppress_tokens", "begin_suppress_tokens"}
# PretrainedConfig fields that leave a causal LM as it is at these values only
_INERT = {"is_encoder_decoder": False, "is_decoder": False, "add_cross_attention": False,
          "tie_encoder_decoder": False, "cross_attention_hidden_size": None, "pruned_heads": {}}
# fields every family maps (checked in architecture())
_COMMON = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
           "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
           "attention_dropout"}
_FAMILY = {"llama": {"attention_bias", "mlp_bias"}, "mistral": {"sliding_window"},
           "qwen2": {"sliding_window", "use_sliding_window", "layer_types"},
           "qwen3": {"attention_bias", "sliding_window", "use_sliding_window", "layer_types"}}
# transformers 5's defaults for absent fields (the same in the four families unless listed per family)
_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0,
             "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "use_sliding_window": False}
_SLIDING_WINDOW_DEFAULT = {"mistral": 4096, "qwen2": None, "qwen3": None}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")
# megatron-core's Llama 3 scaling (RotaryEmbedding._apply_scaling) fixes all but the factor
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class Architecture:
    """What a checked config describes, in the terms of the megatron model."""
    model_type: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    max_positions: int
    norm_eps: float
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling_factor: Optional[float]       # Llama 3 scaling's factor, None without scaling


def _get(cfg: dict, key: str):
    return cfg[key] if cfg.get(key) is not None else _DEFAULTS.get(key)


def _rope(cfg: dict, where: str):
    """(rope_theta, llama3 factor or None) as transformers 5 reads them: ``rope_scaling`` (older
    configs) or ``rope_parameters``, the base in it or at the top level."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: rope_parameters/rope_scaling {params!r} is not a dict")
    if "layer_types" in cfg and any(k in params for k in ("full_attention", "sliding_attention")):
        raise ValueError(f"{where}: RoPE parameters per layer type ({sorted(params)}) are not supported")
    theta = params.get("rope_theta", _get(cfg, "rope_theta"))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{where}: partial_rotary_factor {partial} (RoPE on part of each head) is not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if kind == "default":
        extra = sorted(set(params) - known)
        if extra:
            raise ValueError(f"{where}: RoPE parameters {extra} with rope_type 'default' are not supported "
                             "(transformers would not use them either; remove them)")
        factor = None
    elif kind == "llama3":
        extra = sorted(set(params) - known - {"factor"} - set(LLAMA3_FIXED))
        if extra:
            raise ValueError(f"{where}: llama3 RoPE parameters {extra} are not supported")
        for key in ("factor", *LLAMA3_FIXED):
            if params.get(key) is None:
                raise ValueError(f"{where}: llama3 RoPE scaling without {key}")
        for key, value in LLAMA3_FIXED.items():
            if float(params[key]) != value:
                raise ValueError(f"{where}: llama3 RoPE scaling with {key} {params[key]}: megatron-core's Llama 3 "
                                 f"scaling (--use-rope-scaling) fixes it to {value:g} (as Llama 3.1/3.2/3.3); only "
                                 "the factor (--rope-scaling-factor) is free")
        factor = float(params["factor"])
        if not factor > 0:
            raise ValueError(f"{where}: llama3 RoPE factor {factor} must be > 0")
    else:
        raise ValueError(f"{where}: RoPE scaling {kind!r} is not supported (supported: default, and llama3 through "
                         "--use-rope-scaling --rope-scaling-factor)")
    theta = float(theta)
    if theta != int(theta) or theta <= 0:
        raise ValueError(f"{where}: rope_theta {theta} is not a positive integer (--rotary-base takes integers)")
    return theta, factor


def sliding_window_layers(cfg: dict) -> List[int]:
    """The 0-based layers that transformers runs with a sliding window (none: full causal attention)."""
    kind = cfg.get("model_type")
    window = cfg.get("sliding_window", _SLIDING_WINDOW_DEFAULT.get(kind))
    layers = int(cfg["num_hidden_layers"])
    if kind == "mistral":
        return list(range(layers)) if window is not None else []
    if kind in ("qwen2", "qwen3"):
        if not _get(cfg, "use_sliding_window"):
            window = None              # transformers drops the window unless use_sliding_window
        types = cfg.get("layer_types")
        if types is None:
            start = int(cfg.get("max_window_layers", 28))
            types = ["sliding_attention" if window is not None and i >= start else "full_attention"
                     for i in range(layers)]
        return [i for i, t in enumerate(types) if t == "sliding_attention" and window is not None]
    return []


def _without_sliding_window(cfg: dict) -> dict:
    out = dict(cfg, sliding_window=None)
    if out.get("model_type") in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
        if "layer_types" in out:
            out["layer_types"] = ["full_attention"] * int(out["num_hidden_layers"])
    return out


def check_fields(cfg: dict, where: str) -> None:
    """Refuse a config that is not one of the supported families, or has a field this converter does not know."""
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type {kind!r} is not supported (supported: "
                         f"{', '.join(sorted(ARCHITECTURES))})")
    arch = cfg.get("architectures")
    if arch is not None and list(arch) != [ARCHITECTURES[kind]]:
        raise ValueError(f"{where}: architectures {arch}: only {ARCHITECTURES[kind]} (the causal LM) is supported "
                         f"for model_type {kind}")
    unknown = sorted(set(cfg) - _METADATA - set(_INERT) - _COMMON - _FAMILY[kind]
                     - {"moba_chunk_size", "moba_topk", "moba_full_attn_layers"})
    if unknown:
        raise ValueError(f"{where}: config field(s) {', '.join(f'{k} = {cfg[k]!r}' for k in unknown)} are not "
                         f"known to megatron_moba's converter for model_type {kind}: importing would ignore them, "
                         "and they may change the model (remove them from config.json only if they do not)")
    active = [f"{k} = {cfg[k]!r}" for k, inert in _INERT.items() if k in cfg and cfg[k] not in (inert, None)]
    if active:
        raise ValueError(f"{where}: {', '.join(active)} is not supported (a causal LM has {', '.join(_INERT)} "
                         "at their defaults)")
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{where}: config.json has no {', '.join(missing)}"
                         + (" (its default differs between families and transformers releases: give it, "
                            "= num_attention_heads for multi-head attention)" if "num_key_value_heads" in missing
                            else ""))


def architecture(cfg: dict, where: str = "HF config") -> Architecture:
    """The checked ``Architecture`` of a config dict; ValueError naming the field otherwise."""
    check_fields(cfg, where)
    kind = cfg["model_type"]
    heads, groups, hidden = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]), int(cfg["hidden_size"])
    if heads % groups:
        raise ValueError(f"{where}: num_key_value_heads {groups} does not divide num_attention_heads {heads}")
    if kind == "qwen3":
        head_dim = cfg.get("head_dim") or 128                     # Qwen3Config's default
    else:
        if not cfg.get("head_dim") and hidden % heads:
            raise ValueError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and "
                             "there is no head_dim")
        head_dim = cfg.get("head_dim") or hidden // heads
    if _get(cfg, "hidden_act") != "silu":
        raise ValueError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (the SwiGLU MLP, --swiglu, "
                         "is silu-gated)")
    if float(_get(cfg, "attention_dropout")) != 0.0:
        raise ValueError(f"{where}: attention_dropout {cfg['attention_dropout']} is not supported (MoBA layers have "
                         "no attention dropout)")
    for key in ("attention_bias", "mlp_bias"):
        if key in _FAMILY[kind] and _get(cfg, key):
            what = "q/k/v/o projections" if key == "attention_bias" else "MLP projections"
            raise ValueError(f"{where}: {key} true (biases in the {what}) is not supported: megatron-core biases "
                             "either q/k/v only (--add-qkv-bias, as Qwen2) or every linear layer")
    window = sliding_window_layers(cfg)
    if window:
        raise ValueError(
            f"{where}: sliding_window {cfg.get('sliding_window', _SLIDING_WINDOW_DEFAULT.get(kind))} is set for "
            f"layer(s) {window}: there each token attends only the last sliding_window tokens, while megatron_moba "
            "runs MoBA or full causal attention, a different model past the window.  To continue pretraining with "
            "MoBA/full attention in place of the window, import with --replace-sliding-window (the checkpoint and "
            "its export then have sliding_window null)")
    theta, factor = _rope(cfg, where)
    return Architecture(model_type=kind, layers=int(cfg["num_hidden_layers"]), hidden=hidden,
                        ffn=int(cfg["intermediate_size"]), heads=heads, groups=groups, head_dim=int(head_dim),
                        vocab=int(cfg["vocab_size"]), max_positions=int(cfg["max_position_embeddings"]),
                        norm_eps=float(_get(cfg, "rms_norm_eps")), tied=bool(_get(cfg, "tie_word_embeddings")),
                        qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3", rope_theta=theta,
                        rope_scaling_factor=factor)


def read_hf_config(hf_dir: str, replace_sliding_window: bool = False) -> dict:
    """The checked config of an HF checkpoint directory (or of a ``config.json`` file), as a dict.
    With ``replace_sliding_window`` a sliding window is dropped from it (MoBA/full attention replaces it)."""
    path = hf_dir if os.path.isfile(hf_dir) else os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a Hugging Face checkpoint directory")
    with open(path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    check_fields(cfg, path)
    if replace_sliding_window and sliding_window_layers(cfg):
        cfg = _without_sliding_window(cfg)
    architecture(cfg, path)
    return cfg


def model_flags(cfg: dict, hybrid: bool = False) -> List[str]:
    """The pretraining job's model flags (Megatron-LM's names) that rebuild this HF model (``hybrid``: as a
    HybridModel, ``--num-layers 2L --hybrid-layer-pattern '*-' x L``)."""
    a = architecture(cfg)
    args = ["--num-layers", a.layers, "--hidden-size", a.hidden, "--ffn-hidden-size", a.ffn,
            "--num-attention-heads", a.heads, "--num-query-groups", a.groups]
    if a.head_dim * a.heads != a.hidden:
        args += ["--kv-channels", a.head_dim]
    args += ["--normalization", "RMSNorm", "--norm-epsilon", repr(a.norm_eps), "--swiglu", "--disable-bias-linear"]
    if a.qkv_bias:
        args.append("--add-qkv-bias")
    if a.qk_norm:
        args.append("--qk-layernorm")
    args += ["--position-embedding-type", "rope", "--rotary-base", int(a.rope_theta)]
    if a.rope_scaling_factor is not None:
        args += ["--use-rope-scaling", "--rope-scaling-factor", repr(a.rope_scaling_factor)]
    args += ["--max-position-embeddings", a.max_positions]
    if not a.tied:
        args.append("--untie-embeddings-and-output-weights")
    args = [str(x) for x in args]
    return hybrid_pattern.hybrid_flags(args) if hybrid else args


def with_rope(cfg: dict, theta: float, factor: Optional[float]) -> dict:
    """``cfg`` with RoPE base ``theta`` and Llama 3 scaling ``factor`` (None: none), written where the
    config keeps its RoPE settings (``rope_parameters`` in transformers 5, else ``rope_theta`` and
    ``rope_scaling``)."""
    out = dict(cfg)
    old = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if factor is None:
        scaling = {"rope_type": "default"}
    elif old.get("rope_type", old.get("type")) == "llama3":
        scaling = {k: v for k, v in old.items() if k not in ("type", "rope_theta")}
        scaling.update(rope_type="llama3", factor=float(factor))
    else:
        scaling = {"rope_type": "llama3", "factor": float(factor), **LLAMA3_FIXED}
    if "rope_parameters" in cfg:
        out["rope_parameters"] = {**scaling, "rope_theta": float(theta)}
        if cfg.get("rope_scaling") is not None:          # transformers reads rope_scaling first
            out["rope_scaling"] = dict(out["rope_parameters"])
    else:
        out["rope_scaling"] = None if factor is None else scaling
    if "rope_theta" in cfg or "rope_parameters" not in cfg:
        out["rope_theta"] = float(theta)
    return out


def tokenizer_flags(hf_dir: str, cfg: dict) -> List[str]:
    """The job's tokenizer flags for the tokenizer saved with the HF model (``tokenizer.json``:
    HuggingFaceTokenizer; else ``tokenizer.model``: SentencePieceTokenizer), with ``--vocab-size``
    the model's vocabulary (which may have more rows than the tokenizer has tokens); just
    ``--vocab-size`` when the directory has no tokenizer."""
    from megatron_moba.training.tokenizer import build_tokenizer
    vocab = architecture(cfg).vocab
    d = os.path.abspath(hf_dir if os.path.isdir(hf_dir) else os.path.dirname(hf_dir))
    if os.path.isfile(os.path.join(d, "tokenizer.json")):
        kind, model = "HuggingFaceTokenizer", d
    elif os.path.isfile(os.path.join(d, "tokenizer.model")):
        kind, model = "SentencePieceTokenizer", os.path.join(d, "tokenizer.model")
    else:
        return ["--vocab-size", str(vocab)]
    tokens = build_tokenizer(kind, model).vocab_size
    if tokens > vocab:
        raise ValueError(f"{model}: the tokenizer has {tokens} tokens, more than vocab_size {vocab} in config.json: "
                         "its token ids past the embedding would fail in training")
    return ["--tokenizer-type", kind, "--tokenizer-model", model, "--vocab-size", str(vocab)]


def run_flags(hf_dir: str, replace_sliding_window: bool = False, hybrid: bool = False) -> list:
    """What ``tools/convert_hf_checkpoint.py flags`` does: print the model and tokenizer flags of an
    HF directory (its config checked as the import checks it; weights not read), space-separated for
    scripts that split them (examples/continued_pretraining_long_context.sh)."""
    cfg = read_hf_config(hf_dir, replace_sliding_window)
    flags = model_flags(cfg, hybrid) + tokenizer_flags(hf_dir, cfg)
    print(" ".join(flags))
    return flags
