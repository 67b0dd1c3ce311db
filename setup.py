"""megatron-moba: MoBA (Mixture of Block Attention) as an attention backend for megatron-core.

Installs two packages and their subpackages: ``moba_kernels`` (from kernels/, the attention ops,
no Megatron dependency; ``moba_kernels.triton_backend`` among them) and ``megatron_moba`` (the
megatron-core integration, training and tools).

    pip install -c constraints.txt -e '.[dev]'   # what `make install` runs: the tested versions
    pip install -e .                               # any versions in the ranges below
    pip install -e '.[gpu]'                        # + transformer-engine (NVIDIA's containers have it)

``install_requires`` declares ranges, not pins, so that an environment that already has a
suitable torch (NVIDIA's PyTorch containers: torch 2.x.0a0+<git>.nv<yy.mm>) keeps it; the exact
versions tested on CPU are in constraints.txt.
"""
from setuptools import find_packages, setup

PACKAGES = (find_packages(include=["megatron_moba", "megatron_moba.*"])
            + find_packages("kernels", include=["moba_kernels", "moba_kernels.*"]))

setup(
    name="megatron-moba",
    version="0.1.0",
    description="MoBA (Mixture of Block Attention) for megatron-core: kernels, integration, training and tools",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    # moba_kernels (and its subpackages) live under kernels/; megatron_moba at the root.
    package_dir={"moba_kernels": "kernels/moba_kernels"},
    install_requires=[
        # Lower bounds: what the code needs; upper bounds: the newest release line tested (with the
        # exact versions in constraints.txt).  torch: torch.library.custom_op/register_fake/
        # register_autograd (2.4) and megatron-core's own floor (torch>=2.6); tested: 2.13.
        "torch>=2.6,<2.14",
        # 0.16.1: the oldest release the integration is tested with; 0.19.x: the newest.
        "megatron-core>=0.16.1,<0.20",
        # The triton backend's kernels (autotune restore_value, tl.static_range); 3.2 is the
        # release torch 2.6 was built against, 3.6 the one tested.  No Linux-only wheels elsewhere:
        # without triton the backend reports itself unavailable (moba_kernels.available_backends).
        "triton>=3.2,<3.7; platform_system == 'Linux'",
        "sentencepiece>=0.2",          # SentencePieceTrainer.train(sentence_iterator=...)
        "datasets>=2.0",               # datasets.load_from_disk / DatasetDict (tools/preprocess_data.py)
        "numpy<2.4",   # triton 3.6's interpreter (TRITON_INTERPRET=1) int()s size-1 arrays: an error from numpy 2.4
        "psutil",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "tokenizers",
        "safetensors",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["moba-pretrain = megatron_moba.pretrain:main"]},
    extras_require={
        "dev": ["pytest>=8", "transformers", "ruff>=0.15"],      # ruff: `make lint` (config in pyproject.toml)
        "gpu": ["transformer-engine[pytorch]"],
    },
    license="Apache-2.0",
)
