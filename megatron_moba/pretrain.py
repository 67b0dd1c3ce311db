"""Pretrain (or continue pretraining) a GPT with MoBA attention.

    torchrun --nproc-per-node 8 -m megatron_moba.pretrain --num-layers 24 --hidden-size 2048 \
        --num-attention-heads 16 --seq-length 32768 --moba-chunk-size 512 --moba-topk 3 ...
    python -m megatron_moba.pretrain --help
"""
from __future__ import annotations

import sys

from megatron_moba.training.arguments import parse_args


def main(argv=None) -> int:
    args = parse_args(argv)                  # before torch and megatron-core are imported: `--help` is quick
    from megatron_moba.training.logs import quiet_absent_backend_warnings
    quiet_absent_backend_warnings()
    from megatron_moba.training.compat import apply_patches
    apply_patches(args.optimizer_impl)       # without CUDA: megatron-core's CPU shims (compat.py)
    import torch.distributed as dist

    from megatron_moba.training.trainer import pretrain
    try:
        pretrain(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
