#!/usr/bin/env python
"""Check a pretraining job's flags as the job itself would at a given world size, without running it.

    python tools/check_job_flags.py --world-size 64 --name "stage 2" -- <the flags of megatron_moba.pretrain>

Runs the job's own parser and checks (megatron_moba.training.arguments.parse_args) at that world size,
with the defaults of a CUDA machine (--no-cuda: of a CPU one), then the checks the job makes when it
builds its model: the model config (MoBA settings, heads and query groups over TP, context parallelism),
the sequence length over context parallelism and the vocabulary over TP; and the --data-path files
where this machine can read them (each .bin against its .idx, every used split non-empty).  Imports no
CUDA and starts no process group: the launch scripts run it on the submitting host before anything is
submitted.

Prints one line, what the job would train (layout, sequence, RoPE base, maximum positions, MoBA, data);
on an error ``<name>: error: <message>`` on stderr and exit status 2.
"""
import argparse
import sys


def describe(args) -> str:
    rope = (f"RoPE base {args.rotary_base}" + (f" (Llama 3 scaling x{args.rope_scaling_factor:g})"
                                               if args.use_rope_scaling else "")
            if args.position_embedding_type == "rope" else "learned positions")
    attention = ("full attention" if args.attention == "full" else
                 f"MoBA chunk {args.moba_chunk_size} top-{args.moba_topk}, last {args.moba_full_attn_layers} "
                 "layers full attention")
    data = "mock data" if args.mock_data else f"data {' '.join(args.data_path)}"
    if args.train_data_slice:
        data += f" (training documents {args.train_data_slice[0]:g}-{args.train_data_slice[1]:g})"
    return (f"TP {args.tensor_model_parallel_size} x CP {args.context_parallel_size} x PP "
            f"{args.pipeline_model_parallel_size} x DP {args.data_parallel_size} | sequence {args.seq_length}, max "
            f"positions {args.max_position_embeddings}, {rope} | {attention} | global batch {args.global_batch_size}, "
            f"{args.train_iters} iterations | {data}")


def check(flags, world_size: int, name: str, cuda: bool = True, check_files: bool = True):
    """The parsed flags, after every check; exits with status 2 naming ``name`` on an error."""
    from megatron_moba.training.arguments import exit_with_error, parse_args
    args = parse_args(flags, world_size=world_size, cuda=cuda, prog=name)
    try:
        from megatron_moba.training.logs import quiet_absent_backend_warnings
        quiet_absent_backend_warnings()
        from megatron_moba.core.config import check_seq_length
        from megatron_moba.core.model import padded_vocab_size
        from megatron_moba.training.arguments import config_from_args
        config = config_from_args(args)
        check_seq_length(config, args.seq_length)
        if args.vocab_size:
            padded_vocab_size(args.vocab_size, args.tensor_model_parallel_size)
        if check_files and args.data_path:
            from megatron_moba.training.data import check_data
            check_data(args)
    except ValueError as e:           # ConfigurationError, and megatron-core's own config checks
        exit_with_error(str(e), prog=name)
    return args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, required=True, help="GPUs the job runs on (nodes x GPUs per node)")
    p.add_argument("--name", default="moba-pretrain", help="named in the output (e.g. the stage)")
    p.add_argument("--no-cuda", action="store_true", help="resolve the defaults of a machine without CUDA")
    p.add_argument("--no-files", action="store_true", help="do not read the --data-path files")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the job's flags")
    a = p.parse_args(argv)
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    if a.world_size < 1:
        p.error(f"--world-size must be >= 1, got {a.world_size}")
    args = check(flags, a.world_size, a.name, cuda=not a.no_cuda, check_files=not a.no_files)
    print(f"{a.name}: ok: {a.world_size} GPUs = {describe(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
