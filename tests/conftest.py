"""Test session setup (tests/helpers.py and tests/megatron_cases.py are importable through
pyproject.toml's ``pythonpath``)."""
import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter (tiny shapes; set before they are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """The test process is an entry point like `python -m megatron_moba.pretrain`: it applies
    megatron_moba's patches of megatron-core once (on a machine without CUDA, the CPU shims)."""
    from megatron_moba.training.compat import apply_patches
    from megatron_moba.training.logs import quiet_absent_backend_warnings
    quiet_absent_backend_warnings()          # megatron-core's notices about absent TE/apex
    apply_patches()
