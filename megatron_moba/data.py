"""Training data: megatron-core's GPTDataset (indexed .bin/.idx files, blended) or mock data,
served to each data-parallel rank in micro-batches from a resumable sample position."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset


def parse_data_path(paths: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """megatron's --data-path syntax: ``p1 p2 ...`` or ``w1 p1 w2 p2 ...``."""
    def is_number(x):
        try:
            float(x)
            return True
        except ValueError:
            return False
    if len(paths) > 1 and is_number(paths[0]):
        if len(paths) % 2:
            raise ValueError("--data-path with weights needs pairs: w1 p1 w2 p2 ...")
        return list(paths[1::2]), [float(w) for w in paths[0::2]]
    return list(paths), None


def build_datasets(args, tokenizer):
    """(train, valid, test) GPTDatasets sized for the run."""
    blend = parse_data_path(args.data_path) if args.data_path else None
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, split=args.split,
        tokenizer=tokenizer, reset_position_ids=args.reset_position_ids, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=args.data_cache_path)
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters if args.eval_interval else args.eval_iters
    sizes = [args.train_iters * args.global_batch_size, evals * args.global_batch_size, 0]
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


class MicroBatches:
    """This DP rank's micro-batches, from sample ``consumed`` of the global sample stream on.

    Each micro-batch step takes ``micro_batch_size x dp`` consecutive samples and this rank
    keeps its slice; ``consumed`` is the data position that checkpoints store."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed: int = 0):
        if dataset is None or len(dataset) == 0:
            raise ValueError("the dataset is empty: check --data-path and --split")
        self.dataset, self.mbs, self.dp_rank, self.dp_size = dataset, micro_batch_size, dp_rank, dp_size
        self.consumed = consumed

    def __iter__(self):
        return self

    def __next__(self):
        start = self.consumed + self.dp_rank * self.mbs
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.mbs)]
        self.consumed += self.mbs * self.dp_size
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
