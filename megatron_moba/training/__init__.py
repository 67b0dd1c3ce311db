"""The pretraining job (``python -m megatron_moba.pretrain``): flags (arguments), the loop (trainer),
the GPT for the flags (model), process groups and gradient reduction (parallel), optimizers
(optimizer), dist_checkpointing (checkpointing), GPTDataset batches (data), tokenizers, FLOP
accounting (flops), corpus preprocessing (preprocess), logging (logs), the training-throughput
benchmark (bench), GPT -> HybridModel checkpoints (convert_hybrid) and every patch of megatron-core's
internals (compat).

Imports ``megatron_moba.core``; nothing from ``megatron_moba.eval`` or ``megatron_moba.hf``.
"""
