"""Pretrain (or continue pretraining) a GPT with MoBA attention.

    torchrun --nproc-per-node 8 -m megatron_moba.pretrain --num-layers 24 --hidden-size 2048 \
        --num-attention-heads 16 --seq-length 32768 --moba-chunk-size 512 --moba-topk 3 ...
    python -m megatron_moba.pretrain --help
"""
from __future__ import annotations

import sys

from megatron_moba.core.errors import ConfigurationError
from megatron_moba.training.arguments import exit_with_error, parse_args


def main(argv=None) -> int:
    """Run the job; 0 when it ends normally.  Errors in what the user asked for (argparse's, and every
    ``ConfigurationError``: flags, data, checkpoint directories, the megatron-core release, MoBA settings)
    print ``moba-pretrain: error: <message>`` on rank 0 and exit with status 2 on every rank, without a
    traceback; any other exception keeps its traceback."""
    args = parse_args(argv)                  # before torch and megatron-core are imported: `--help` is quick
    try:
        _pretrain(args)
    except ConfigurationError as e:
        exit_with_error(str(e))             # SystemExit(2)
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _pretrain(args) -> None:
    from megatron_moba.training.logs import quiet_absent_backend_warnings
    quiet_absent_backend_warnings()
    from megatron_moba.training.compat import apply_patches
    apply_patches(args.optimizer_impl)       # without CUDA: megatron-core's CPU shims (compat.py)
    from megatron_moba.training.trainer import pretrain
    pretrain(args)


if __name__ == "__main__":
    sys.exit(main())
