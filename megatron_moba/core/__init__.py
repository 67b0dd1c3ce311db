"""The megatron-core layer: ``MoBATransformerConfig`` (config), the layer specs that put MoBA in the
``core_attention`` slot (specs), the core attention modules (attention), the GPT builder (model), the
HybridModel stack spec and builder (hybrid; megatron-core 0.19+) with its layer patterns and the GPT <->
HybridModel weight names (hybrid_pattern),
sbhd/thd <-> varlen conversions (layouts), context-parallel gathering (context_parallel), the
supported megatron-core releases (versions) and the error class for a user's configuration (errors).

Imports only megatron-core and ``moba_kernels``' public API; nothing from the training job,
evaluation or HF packages (tests/test_import_rules.py checks).
"""
