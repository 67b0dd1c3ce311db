"""Safetensors reading one tensor at a time and writing sharded as transformers' ``save_pretrained``.

``HFWeights`` indexes a Hugging Face directory's ``*.safetensors`` from their headers only
(names, shapes, dtypes) and loads a tensor when asked (``safe_open``, the file released after each
tensor), so an import holds one HF tensor at a time besides the model it fills.

``save_sharded`` writes ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), each shard at most
``max_shard_size`` bytes (a tensor larger than that gets a shard of its own), making and writing one
tensor at a time.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Dict, Iterable, List, Tuple

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def parse_size(text) -> int:
    """Bytes of ``text``: an integer, or a number with KB/MB/GB (powers of 1000) or KiB/MiB/GiB (of 1024),
    as transformers' ``max_shard_size``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: give bytes, or a size such as 5GB or 500MiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise ValueError(f"--max-shard-size {text!r} must be at least one byte")
    return size


def _header(path: str) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets): 8 bytes of length, then JSON."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 100 * 2 ** 20:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        return json.loads(f.read(n))


class HFWeights:
    """The tensors of an HF directory's ``*.safetensors``, indexed from their headers, loaded one at a
    time.  A tensor in two files, or one that ``model.safetensors.index.json`` lists but no file holds,
    fails naming it."""

    def __init__(self, hf_dir: str):
        files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {hf_dir} (pickled .bin checkpoints are not loaded)")
        self.where: Dict[str, str] = {}
        self.shapes: Dict[str, tuple] = {}
        self.dtypes: Dict[str, torch.dtype] = {}
        for f in files:
            for name, info in _header(f).items():
                if name == "__metadata__":
                    continue
                if name in self.where:
                    raise ValueError(f"tensor {name} is in both {self.where[name]} and {f}")
                self.where[name], self.shapes[name] = f, tuple(info["shape"])
                self.dtypes[name] = _SAFETENSORS_DTYPES.get(info["dtype"])
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as fh:
                listed = json.load(fh).get("weight_map", {})
            absent = sorted(set(listed) - set(self.where))
            if absent:
                raise ValueError(f"{index} lists tensors no *.safetensors file in {hf_dir} holds: {absent[:8]}")
        self.loads = 0

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __iter__(self):
        return iter(self.where)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.where[name], framework="pt") as f:
            t = f.get_tensor(name)
        self.loads += 1
        return t

    def nbytes(self) -> int:
        return sum(_numel(s) * torch.empty((), dtype=self.dtypes[n]).element_size() for n, s in self.shapes.items())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plan_shards(sizes: Iterable[Tuple[str, int]], max_shard_size: int) -> List[List[str]]:
    """Names grouped into shards in order, each at most ``max_shard_size`` bytes (a larger tensor alone)."""
    shards, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path: str, names: List[str], shapes: Dict[str, tuple], dtype: torch.dtype,
                      make: Callable[[str], torch.Tensor], metadata: Dict[str, str]) -> None:
    """A safetensors file of ``names`` (in order), each made by ``make(name)``, cast to ``dtype`` and written
    at once, so that one tensor at a time is held (safetensors' own ``save_file`` copies every tensor of the
    file to bytes first).  The layout is the format's: an 8-byte little-endian header length, the JSON
    header (padded with spaces to a multiple of 8 bytes), then the tensors' bytes in header order."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        size = _numel(shapes[name]) * itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shapes[name]), "data_offsets": [offset,
                                                                                                    offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:
            t = make(name)
            if tuple(t.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: made shape {tuple(t.shape)}, expected {tuple(shapes[name])}")
            t = t.detach().to("cpu", dtype).contiguous()
            f.write(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
            del t


def save_sharded(producers: Dict[str, Tuple[tuple, Callable[[], torch.Tensor]]], out_dir: str, dtype: torch.dtype,
                 max_shard_size) -> List[str]:
    """Write the tensors ``producers`` names ({name: (shape, make)}, made one shard at a time and cast to
    ``dtype``) as transformers' ``save_pretrained`` shards them; returns the files written."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(name, _numel(shape) * itemsize) for name, (shape, _) in producers.items()]
    shards = plan_shards(sizes, parse_size(max_shard_size))
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "model*.safetensors")) + glob.glob(
            os.path.join(out_dir, "model.safetensors.index.json")):
        os.remove(stale)                     # an earlier export's shards would be read as part of this one
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    shapes = {name: shape for name, (shape, _) in producers.items()}
    for file, shard in zip(names, shards):
        write_safetensors(os.path.join(out_dir, file), shard, shapes, dtype, lambda n: producers[n][1](),
                          {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}, f, indent=2)
    return names
