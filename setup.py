"""megatron-moba: MoBA (Mixture of Block Attention) as an attention backend for megatron-core.

Installs two packages: ``moba_kernels`` (from kernels/, the attention ops, no Megatron
dependency) and ``megatron_moba`` (the megatron-core integration, training and tools).

    pip install -e .            # CPU machines: torch 2.13.0 (CPU build), megatron-core 0.16.1
    pip install -e .[dev]       # + pytest
    pip install -e .[gpu]       # + transformer-engine (inside NVIDIA's PyTorch containers it is already there)
"""
from setuptools import setup

setup(
    name="megatron-moba",
    version="0.1.0",
    description="MoBA (Mixture of Block Attention) for megatron-core: kernels, integration, training and tools",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["moba_kernels", "megatron_moba"],
    package_dir={"moba_kernels": "kernels/moba_kernels", "megatron_moba": "megatron_moba"},
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "triton==3.6.0",
        "sentencepiece==0.2.3",
        "datasets==5.2.0",
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
        "dev": ["pytest==9.2.0", "transformers"],
        "gpu": ["transformer-engine[pytorch]"],
    },
    license="Apache-2.0",
)
