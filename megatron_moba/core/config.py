"""MoBA settings carried on megatron-core's ``TransformerConfig``.

Errors name the command-line flag a Megatron user sets (``--moba-topk`` ...), so a bad
configuration fails at model build with a message that says what to change (a
``ConfigurationError``, a ``ValueError``: the job prints it without a traceback).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_moba.core import hybrid_pattern
from megatron_moba.core.errors import ConfigurationError
from megatron_moba.core.versions import megatron_core_version

megatron_core_version()     # an unsupported megatron-core fails here, naming the supported releases

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402 (after the check)

ATTENTION_CHOICES = ("moba", "full")


@dataclass
class MoBATransformerConfig(TransformerConfig):
    """``TransformerConfig`` plus MoBA.

    Layer numbers are megatron's: 1-based, global across pipeline stages.  In a HybridModel
    (``hybrid_layer_pattern``) the MoBA settings and ``is_moba_layer`` count attention layers only
    (the k-th ``*`` of the pattern), so a GPT of L layers and the pattern ``*-`` x L agree.
    """

    attention: str = "moba"
    """``moba``, or ``full`` to train the dense baseline with the same code (--attention)."""

    moba_chunk_size: int = 512
    """Key block size in tokens (--moba-chunk-size)."""

    moba_topk: int = 3
    """Blocks each query attends, its own included (--moba-topk)."""

    moba_backend: Optional[str] = None
    """``moba_kernels`` backend, None = fastest available (--moba-backend)."""

    moba_full_attn_layers: int = 0
    """The last N layers keep full attention, as in the MoBA paper (--moba-full-attn-layers)."""

    moba_full_attn_layer_list: Optional[List[int]] = None
    """Explicit 1-based layer numbers that keep full attention (--moba-full-attn-layer-list)."""

    hybrid_layer_pattern: Optional[str] = None
    """HybridModel's layer pattern (--hybrid-layer-pattern: ``*`` attention, ``-`` MLP, ``|`` pipeline
    split; megatron_moba.core.hybrid_pattern); None for a GPTModel."""

    def __post_init__(self):
        _check_flags(self)
        if self.hybrid_layer_pattern and hasattr(self, "is_hybrid_model"):
            # megatron's flag for HybridModels (Megatron-LM sets it): output projections initialized with
            # std / sqrt(--num-layers), which counts both halves of each GPT layer, as a GPT's std / sqrt(2 L)
            self.is_hybrid_model = True
        super().__post_init__()

    def attention_layer_count(self) -> int:
        """How many attention layers the model has (a GPT: every layer)."""
        return hybrid_pattern.layer_counts(self.num_layers, self.hybrid_layer_pattern)[0]

    def attention_ordinal(self, layer_number: int) -> Optional[int]:
        """The 1-based number among the attention layers of global layer ``layer_number`` (None: not an
        attention layer).  A GPT's layers are all attention layers: the number itself."""
        if not self.hybrid_layer_pattern:
            return layer_number
        return hybrid_pattern.attention_ordinals(self.hybrid_layer_pattern)[layer_number - 1]

    def full_attention_layers(self) -> List[int]:
        """1-based numbers (among the attention layers) of the layers that run full attention."""
        n = self.attention_layer_count()
        if self.attention == "full":
            return list(range(1, n + 1))
        last = range(n - self.moba_full_attn_layers + 1, n + 1)
        return sorted(set(last) | set(self.moba_full_attn_layer_list or []))

    def is_moba_layer(self, attention_layer: int) -> bool:
        """Whether attention layer ``attention_layer`` (1-based, counted over attention layers) runs MoBA."""
        return attention_layer not in self.full_attention_layers()


def _check_flags(c: MoBATransformerConfig) -> None:
    def need_int(value, flag, minimum):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigurationError(f"{flag} must be an integer >= {minimum}, got {value!r}")

    if c.attention not in ATTENTION_CHOICES:
        raise ConfigurationError(f"--attention must be one of {ATTENTION_CHOICES}, got {c.attention!r}")
    need_int(c.moba_chunk_size, "--moba-chunk-size", 1)
    need_int(c.moba_topk, "--moba-topk", 1)
    need_int(c.moba_full_attn_layers, "--moba-full-attn-layers", 0)
    if c.hybrid_layer_pattern is not None:
        hybrid_pattern.check_pattern(c.hybrid_layer_pattern, c.num_layers, c.pipeline_model_parallel_size)
    layers = c.attention_layer_count()
    which = (f"the attention layers ('*') of --hybrid-layer-pattern ({layers})" if c.hybrid_layer_pattern
             else f"--num-layers ({layers})")
    if c.moba_full_attn_layers > layers:
        raise ConfigurationError(f"--moba-full-attn-layers ({c.moba_full_attn_layers}) exceeds {which}")
    for n in c.moba_full_attn_layer_list or []:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= layers:
            raise ConfigurationError(f"--moba-full-attn-layer-list: layer {n!r} is out of range 1..{layers} "
                                     "(layer numbers are 1-based" + (", counted over the attention layers ('*')"
                                                                     if c.hybrid_layer_pattern else "") + ")")
    if c.moba_backend is not None:
        from moba_kernels import backend_names
        if c.moba_backend not in backend_names():
            raise ConfigurationError(f"--moba-backend {c.moba_backend!r} is unknown; choose one of "
                                     f"{sorted(backend_names())}")
    tp, cp = c.tensor_model_parallel_size, c.context_parallel_size
    if c.num_attention_heads % tp:
        raise ConfigurationError(f"--num-attention-heads ({c.num_attention_heads}) must be divisible by "
                                 f"--tensor-model-parallel-size ({tp})")
    groups = c.num_query_groups or c.num_attention_heads
    if c.num_attention_heads % groups:
        raise ConfigurationError(f"--num-attention-heads ({c.num_attention_heads}) must be a multiple of "
                                 f"--num-query-groups ({groups})")
    if groups % tp and tp % groups:
        raise ConfigurationError(f"--num-query-groups ({groups}) must be a multiple or divisor of "
                                 f"--tensor-model-parallel-size ({tp})")
    if cp < 1:
        raise ConfigurationError(f"--context-parallel-size must be >= 1, got {cp}")


def check_seq_length(config: MoBATransformerConfig, seq_length: int) -> None:
    """Checks that need the training sequence length (called when the model is built)."""
    cp = config.context_parallel_size
    if cp > 1 and seq_length % (2 * cp):
        raise ConfigurationError(f"--seq-length ({seq_length}) must be divisible by 2 x --context-parallel-size "
                                 f"({2 * cp}) for the load-balanced context-parallel layout")
