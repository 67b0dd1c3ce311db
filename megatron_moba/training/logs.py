"""Logging of the pretraining job and the tools: Python ``logging`` as Megatron-LM configures it
(megatron-core's INFO messages about datasets and checkpoints reach the console on rank 0), and
warnings filters for notices that do not apply to a run.

Light on purpose (no torch import): the command lines import it before parsing.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Optional

from megatron_moba.core.errors import ConfigurationError

LOG_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"

# Notices megatron-core prints at import time when optional fused backends are absent: the job
# runs its own PyTorch fallbacks on purpose (and always on CPU), so they say nothing actionable.
ABSENT_BACKEND_MESSAGES = (
    r"Transformer Engine and Apex are not installed\.",
    r"Apex is not installed\.",
    r"Transformer Engine is not installed\.",
    r"If you are using transformer_engine as the transformer implementation",   # selective recompute on core_attn
    # TransformerConfig's own default, no CUDA graphs (0.19 says cuda_graph_modules)
    r"full scope is deprecated\. Use empty cuda_graph_(scope|modules)",
)
# torch.distributed functions megatron-core's distributed optimizer still calls (not the user's to change)
DEPRECATED_IN_MEGATRON = (
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
)


def quiet_absent_backend_warnings() -> None:
    """Ignore megatron-core's absent-Apex/Transformer-Engine notices and the like (by message;
    every other warning stays)."""
    for message in ABSENT_BACKEND_MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for message in DEPRECATED_IN_MEGATRON:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def setup_logging(level: Optional[int] = None, rank: int = 0) -> int:
    """Console logging as in Megatron-LM: ``level`` (``--logging-level``, else the environment's
    MEGATRON_LOGGING_LEVEL) on every rank if given, else INFO on rank 0 and WARNING on the others.
    A handler already on the root logger (the caller's own logging setup) is kept.  Returns the level."""
    env = os.environ.get("MEGATRON_LOGGING_LEVEL", "").strip()
    if level is None and env:
        level = int(env) if env.isdigit() else logging.getLevelName(env.upper())
        if not isinstance(level, int):
            raise ConfigurationError(f"MEGATRON_LOGGING_LEVEL={env!r} is not a logging level (a number, or DEBUG, "
                                     "INFO, WARNING, ERROR, CRITICAL)")
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(format=LOG_FORMAT)          # a no-op when the root logger has a handler
    logging.getLogger().setLevel(level)
    return level
