"""HybridModel layer patterns (``--hybrid-layer-pattern``) and the GPT <-> HybridModel weight names.

A pattern is Megatron-LM's string of layer symbols, one per layer; with MoBA these are supported:

    *   an attention layer (input norm + self-attention): MoBA, or full attention for the layers
        --moba-full-attn-layers / --moba-full-attn-layer-list name, counted over the ``*`` layers
    -   an MLP layer (pre-MLP norm + MLP)
    |   a pipeline split (one segment per --pipeline-model-parallel-size stage)

One GPT layer is ``*-``: a GPT of L layers is the HybridModel of pattern ``"*-" * L`` (with
``--num-layers 2L``: Megatron-LM's --num-layers counts every layer of the pattern).  GPT layer i
(0-based) holds hybrid layers 2i (``input_layernorm``, ``self_attention``) and 2i+1
(``pre_mlp_layernorm``, ``mlp``); GPT's ``decoder.final_layernorm`` is ``decoder.final_norm``.
``gpt_to_hybrid`` / ``hybrid_to_gpt`` are that mapping, the one place it is written (the tests,
the HF conversion and its export use it).  No torch or megatron import: the job's flag checks use it.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

FLAG = "--hybrid-layer-pattern"
ATTENTION, MLP, PIPE = "*", "-", "|"
# symbols of megatron-core's HybridModel that MoBA does not serve, and what they are
UNSUPPORTED = {"M": "Mamba", "G": "gated delta net", "D": "DeepSeek sparse attention",
               "+": "multi-latent attention", "E": "mixture of experts", "/": "multi-token prediction"}

_ATTENTION_PARTS = ("input_layernorm.", "self_attention.", "self_attn_bda.")
_MLP_PARTS = ("pre_mlp_layernorm.", "mlp.", "mlp_bda.")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
GPT_FINAL_NORM, HYBRID_FINAL_NORM = "decoder.final_layernorm.", "decoder.final_norm."


def layer_symbols(pattern: str) -> str:
    """The pattern's layers, pipeline splits left out."""
    return pattern.replace(PIPE, "")


def check_pattern(pattern: str, num_layers: Optional[int] = None, pipeline_model_parallel_size: int = 1) -> str:
    """``pattern`` if MoBA's HybridModel can build it, else a ValueError naming the flag."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{FLAG} must be a non-empty string of layer symbols, e.g. '*-*-' (got {pattern!r})")
    for symbol in pattern:
        if symbol not in (ATTENTION, MLP, PIPE):
            what = f" ({UNSUPPORTED[symbol]})" if symbol in UNSUPPORTED else ""
            raise ValueError(f"{FLAG} {pattern!r}: {symbol!r}{what} is not supported with MoBA; use '*' (attention: "
                             "MoBA or full), '-' (MLP) and '|' (a pipeline split)")
    layers = layer_symbols(pattern)
    if ATTENTION not in layers:
        raise ValueError(f"{FLAG} {pattern!r} has no attention layer ('*'), so nothing for MoBA")
    if num_layers is not None and len(layers) != num_layers:
        raise ValueError(f"{FLAG} {pattern!r} has {len(layers)} layers, but --num-layers is {num_layers}: "
                         f"--num-layers counts every layer of the pattern (a GPT of L layers is '*-' x L, "
                         f"--num-layers 2L)")
    segments = pattern.split(PIPE)
    pp = pipeline_model_parallel_size
    if len(segments) > 1:
        if len(segments) != pp:
            raise ValueError(f"{FLAG} {pattern!r} has {len(segments)} pipeline segments ('|'), but "
                             f"--pipeline-model-parallel-size is {pp}: give one segment per stage, or no '|'")
        if not all(segments):
            raise ValueError(f"{FLAG} {pattern!r} has an empty pipeline segment")
    elif len(layers) % pp:
        raise ValueError(f"{FLAG} {pattern!r} has {len(layers)} layers, not divisible by "
                         f"--pipeline-model-parallel-size ({pp}): split the stages with '|'")
    return pattern


def attention_ordinals(pattern: str) -> List[Optional[int]]:
    """Per layer of the pattern (0-based), its 1-based number among the attention layers, or None."""
    out, n = [], 0
    for symbol in layer_symbols(pattern):
        if symbol == ATTENTION:
            n += 1
        out.append(n if symbol == ATTENTION else None)
    return out


def layer_counts(num_layers: int, pattern: Optional[str]) -> Tuple[int, int]:
    """(attention layers, MLP layers): a GPT (no pattern) has one of each per layer."""
    if not pattern:
        return num_layers, num_layers
    layers = layer_symbols(pattern)
    return layers.count(ATTENTION), layers.count(MLP)


def gpt_pattern(num_gpt_layers: int) -> str:
    """The pattern of a GPT of ``num_gpt_layers`` layers."""
    return (ATTENTION + MLP) * num_gpt_layers


def is_gpt_pattern(pattern: Optional[str]) -> bool:
    """Whether ``pattern`` is a GPT's, ``*-`` repeated (pipeline splits between blocks allowed)."""
    if not pattern:
        return False
    layers = layer_symbols(pattern)
    return len(layers) % 2 == 0 and layers == gpt_pattern(len(layers) // 2) and all(
        len(s) % 2 == 0 for s in pattern.split(PIPE))


def hybrid_flags(gpt_flags: List[str]) -> List[str]:
    """A GPT's command-line flags (with ``--num-layers L``) -> its HybridModel's: ``--num-layers 2L
    --hybrid-layer-pattern '*-' x L``."""
    out = list(gpt_flags)
    i = out.index("--num-layers") + 1
    layers = int(out[i])
    out[i] = str(2 * layers)
    return out + ["--hybrid-layer-pattern", gpt_pattern(layers)]


def gpt_to_hybrid_name(name: str) -> str:
    """A GPT parameter (or state-dict entry) name -> the HybridModel's (pattern ``*-`` x L)."""
    if name.startswith(GPT_FINAL_NORM):
        return HYBRID_FINAL_NORM + name[len(GPT_FINAL_NORM):]
    m = _LAYER.match(name)
    if not m:
        return name
    i, rest = int(m.group(1)), m.group(2)
    if rest.startswith(_ATTENTION_PARTS):
        return f"decoder.layers.{2 * i}.{rest}"
    if rest.startswith(_MLP_PARTS):
        return f"decoder.layers.{2 * i + 1}.{rest}"
    raise ValueError(f"GPT weight {name} belongs to neither the attention nor the MLP half of its layer")


def hybrid_to_gpt_name(name: str) -> str:
    """The inverse of ``gpt_to_hybrid_name``."""
    if name.startswith(HYBRID_FINAL_NORM):
        return GPT_FINAL_NORM + name[len(HYBRID_FINAL_NORM):]
    m = _LAYER.match(name)
    if not m:
        return name
    j, rest = int(m.group(1)), m.group(2)
    if not rest.startswith(_MLP_PARTS if j % 2 else _ATTENTION_PARTS):
        raise ValueError(f"HybridModel weight {name} is not where a '*-' x L pattern puts it (even layers "
                         "attention, odd layers MLP)")
    return f"decoder.layers.{j // 2}.{rest}"


def gpt_to_hybrid(state: Dict) -> Dict:
    """GPT names -> HybridModel names (``*-`` x L), values as they are."""
    return {gpt_to_hybrid_name(k): v for k, v in state.items()}


def hybrid_to_gpt(state: Dict) -> Dict:
    """HybridModel names (``*-`` x L) -> GPT names, values as they are."""
    return {hybrid_to_gpt_name(k): v for k, v in state.items()}
