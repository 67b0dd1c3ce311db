"""Training data: megatron-core's GPTDataset (indexed .bin/.idx files, blended) or mock data,
served to each data-parallel rank in micro-batches from a resumable sample position."""
from __future__ import annotations

import os
import struct
from typing import List, Optional, Tuple

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_moba.core.errors import ConfigurationError


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
            raise ConfigurationError("--data-path with weights needs pairs: w1 p1 w2 p2 ...")
        return list(paths[1::2]), [float(w) for w in paths[0::2]]
    return list(paths), None


_IDX_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 6: numpy.float64,
           7: numpy.float32, 8: numpy.uint16}          # megatron's indexed_dataset.DType codes
SPLIT_NAMES = ("train", "validation", "test")


def check_indexed_dataset(prefix: str) -> numpy.ndarray:
    """The sequence lengths of ``prefix``.idx, after checking that the .idx is readable and the
    .bin holds exactly the bytes it describes.  Errors name the file: a missing file, a
    truncated or stale .bin (the pair written by different runs), an empty dataset."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise ConfigurationError(f"--data-path {prefix}: {path} does not exist (a dataset is the pair PREFIX.bin "
                                     f"and PREFIX.idx written by tools/preprocess_data.py)")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != _IDX_HEADER:
            raise ConfigurationError(f"{idx} is not a megatron indexed-dataset index (bad header)")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in _DTYPES:
            raise ConfigurationError(f"{idx}: unsupported index version {version} or token dtype code {code}")
        if size < 34 + sequences * 12 + documents * 8:
            raise ConfigurationError(f"{idx} is truncated: {size} bytes, but its header describes {sequences} "
                                     f"sequences and {documents - 1} documents "
                                     f"({34 + sequences * 12 + documents * 8} bytes)")
        lengths = numpy.fromfile(f, dtype=numpy.int32, count=sequences)
    if sequences == 0:
        raise ConfigurationError(f"--data-path {prefix}: the dataset is empty (0 documents in {idx})")
    itemsize = numpy.dtype(_DTYPES[code]).itemsize
    expected, actual = int(lengths.astype(numpy.int64).sum()) * itemsize, os.path.getsize(bin_)
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its index describes"
        raise ConfigurationError(f"{bin_} is {what}: {actual} bytes, but {idx} describes {sequences} sequences of "
                                 f"{expected // itemsize} {numpy.dtype(_DTYPES[code]).name} tokens ({expected} bytes); "
                                 f"the pair is damaged or from different runs: rerun tools/preprocess_data.py")
    return lengths


def split_ranges(split_matrix, num_elements: int) -> List[Optional[Tuple[int, int]]]:
    """[begin, end) element ranges per split, as megatron's BlendedMegatronDatasetBuilder
    computes them (None: a split of weight 0, never built)."""
    return [None if m is None else (int(round(m[0] * float(num_elements))), int(round(m[1] * float(num_elements))))
            for m in split_matrix]


def slice_training_split(split_matrix, data_slice):
    """The split matrix with the training split cut to the fraction ``data_slice`` = (begin, end) of its
    documents (--train-data-slice; None: unchanged).  Validation and test keep their documents."""
    if data_slice is None or split_matrix[0] is None:
        return split_matrix
    (lo, hi), (begin, end) = split_matrix[0], data_slice
    return [(lo + (hi - lo) * begin, lo + (hi - lo) * end)] + list(split_matrix[1:])


def _check_splits(args, prefixes: List[str], split_matrix, used: List[bool]) -> None:
    """Every split that the run uses has tokens in every file: megatron's GPTDataset loops
    forever on an empty one."""
    for prefix in prefixes:
        lengths = check_indexed_dataset(prefix)
        ranges = split_ranges(split_matrix, len(lengths))
        for i, r in enumerate(ranges):
            if not used[i] or r is None:
                continue
            docs, tokens = r[1] - r[0], int(lengths[r[0]:r[1]].astype(numpy.int64).sum())
            if tokens == 0:
                counts = ", ".join(f"{n} {0 if q is None else q[1] - q[0]}" for n, q in zip(SPLIT_NAMES, ranges))
                fix = ("give the validation split more weight in --split, or leave out --eval-interval to train "
                       "without evaluation" if i == 1 else "give the training split more weight in --split"
                       + (" or a larger --train-data-slice" if getattr(args, "train_data_slice", None) else ""))
                raise ConfigurationError(
                    f"--split {args.split} leaves the {SPLIT_NAMES[i]} split of {prefix} empty "
                    f"({docs} documents, {tokens} tokens): it has {len(lengths)} documents, split as {counts}; "
                    f"{fix}")


def evaluation_enabled(args) -> bool:
    """The run evaluates on the validation split (every --eval-interval iterations)."""
    return bool(args.eval_interval) and args.eval_iters > 0


def check_data(args) -> List[bool]:
    """Checks --split and every --data-path file against what the run uses, before anything is
    built (an empty split would make megatron's GPTDataset loop forever); returns which splits
    (train, valid, test) the run uses."""
    blend = parse_data_path(args.data_path) if args.data_path else None
    # mock data (no blend): megatron's config replaces the split with an even "1,1,1"
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(args.split if blend else "1,1,1"))
    split_matrix = slice_training_split(split_matrix, getattr(args, "train_data_slice", None))
    used = [True, evaluation_enabled(args), False]
    if split_matrix[0] is None:
        raise ConfigurationError(f"--split {args.split} gives the training split no weight")
    if used[1] and split_matrix[1] is None:
        raise ConfigurationError(f"--split {args.split} gives the validation split no weight, but --eval-interval "
                                 f"{args.eval_interval} evaluates on it")
    if blend:        # files on object storage (s3://, msc://) are megatron's to check
        _check_splits(args, [q for q in blend[0] if "://" not in q], split_matrix, used)
    return used


def build_datasets(args, tokenizer, checked: bool = False):
    """(train, valid, test) GPTDatasets sized for the run.  Only the splits the run uses are
    built (validation when evaluating, never test): the others are None.  ``checked``: the
    caller ran ``check_data(args)`` already."""
    used = [True, evaluation_enabled(args), False] if checked else check_data(args)
    blend = parse_data_path(args.data_path) if args.data_path else None
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, split=args.split,
        tokenizer=tokenizer, reset_position_ids=args.reset_position_ids, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=args.data_cache_path)
    # a split left unused is not built: megatron builds every split of nonzero weight
    config.split_matrix = [m if u else None for m, u in zip(
        slice_training_split(config.split_matrix, getattr(args, "train_data_slice", None)), used)]
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters if used[1] else 0
    sizes = [args.train_iters * args.global_batch_size, evals * args.global_batch_size, 0]
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


class MicroBatches:
    """This DP rank's micro-batches, from sample ``consumed`` of the global sample stream on.

    Each micro-batch step takes ``micro_batch_size x dp`` consecutive samples and this rank
    keeps its slice; ``consumed`` is the data position that checkpoints store."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed: int = 0):
        if dataset is None or len(dataset) == 0:
            raise ConfigurationError("the dataset is empty: check --data-path and --split")
        self.dataset, self.mbs, self.dp_rank, self.dp_size = dataset, micro_batch_size, dp_rank, dp_size
        self.consumed = consumed

    def __iter__(self):
        return self

    def __next__(self):
        start = self.consumed + self.dp_rank * self.mbs
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.mbs)]
        self.consumed += self.mbs * self.dp_size
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
