"""Scaling sweeps: one description -> MoBA and full-attention training runs per model size, their
positional-loss evaluation, and one table of loss against training compute.

    from megatron_moba.eval import sweep
    desc = sweep.load_description("examples/sweeps/cpu-tiny.yaml")
    runs = sweep.plan_runs(desc, "runs/sweeps/cpu-tiny")        # one Run per (model size, variant)
    print(sweep.launch_command(runs[0], desc))                 # python -m megatron_moba.pretrain ...

Compute is C = 6·N·D FLOPs (N non-embedding parameters, D training tokens) in PFLOP/s-days
(8.64e19 FLOPs).  ``tools/scaling_sweep.py`` is the command line and documents the description.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shlex
from dataclasses import dataclass, field
from typing import Callable, List, Optional

PFLOPS_DAY = 8.64e19
SCHEMA = {      # key -> (default, nested schema or None); REQUIRED marks keys without a default
    "name": ("sweep", None), "out": (None, None), "models": ("REQUIRED", None), "variants": (["moba", "full"], None),
    "seq_length": ("REQUIRED", None), "global_batch": ("REQUIRED", None), "micro_batch": (None, None),
    "tokens": (None, None), "train_iters": (None, None), "lr": (3e-4, None), "min_lr": (None, None),
    "warmup_iters": (None, None), "seed": (1234, None), "extra_args": ([], None),
    "moba": ({}, {"chunk": (512, None), "topk": (3, None), "full_attn_layers": (0, None)}),
    "data": ("REQUIRED", {"stdlib_corpus": (None, {"max_bytes": (4_000_000, None), "vocab_size": (2048, None),
                                                   "eval_every": (10, None)}),
                          "train": (None, None), "eval": (None, None), "mock": (False, None),
                          "tokenizer_type": ("NullTokenizer", None), "tokenizer_model": (None, None),
                          "vocab_size": (None, None), "split": ("100,0,0", None)}),
    "eval": ({}, {"bucket_width": (2048, None), "trailing_tokens": (None, None), "num_docs": (64, None),
                  "micro_batch": (1, None)}),
    "fit": ({}, {"buckets": (None, None), "ratio_at": (None, None)}),
    "launch": ({}, {"nproc_per_node": (1, None), "env": ({}, None)}),
    "slurm": ({}, {"partition": (None, None), "account": (None, None), "time": ("02:00:00", None),
                   "gpus_per_task": (None, None), "cpus_per_task": (8, None), "extra": ([], None)}),
}
MODEL_KEYS = ("name", "layers", "hidden", "heads", "query_groups", "ffn_hidden", "tokens", "train_iters", "lr")


def _fill(values, schema: dict, where: str) -> dict:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} {where} (known: {', '.join(schema)})")
    out = {}
    for key, (default, nested) in schema.items():
        if key not in values and default == "REQUIRED":
            raise ValueError(f"missing key {key!r} {where}")
        value = values[key] if key in values else copy.deepcopy(default)
        if nested is not None and value is not None:
            value = _fill(value, nested, f"under {key!r}")
        out[key] = value
    return out


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def validate(desc: dict) -> dict:
    """Defaults filled in, every key and value checked; errors name the key."""
    d = _fill(desc, SCHEMA, "in the sweep description")
    s = _positive_int(d["seq_length"], "seq_length")
    gb = _positive_int(d["global_batch"], "global_batch")
    mb = d["micro_batch"] = _positive_int(d["micro_batch"] or gb, "micro_batch")
    if gb % mb:
        raise ValueError(f"global_batch ({gb}) must be a multiple of micro_batch ({mb})")
    if not isinstance(d["models"], list) or not d["models"]:
        raise ValueError("models must be a non-empty list of {layers, hidden, heads}")
    bad = sorted(set(d["variants"]) - {"moba", "full"}) if isinstance(d["variants"], list) else [d["variants"]]
    if bad or not d["variants"]:
        raise ValueError(f"variants must be a list of moba and/or full, got {d['variants']!r}")
    models, names = [], set()
    for i, m in enumerate(d["models"]):
        m = _fill(m, {k: ("REQUIRED" if k in ("layers", "hidden", "heads") else None, None) for k in MODEL_KEYS},
                  f"in models[{i}]")
        for k in ("layers", "hidden", "heads"):
            _positive_int(m[k], f"models[{i}].{k}")
        if m["hidden"] % m["heads"]:
            raise ValueError(f"models[{i}]: hidden ({m['hidden']}) must be divisible by heads ({m['heads']})")
        m["name"] = str(m["name"] or f"L{m['layers']}-H{m['hidden']}")
        if m["name"] in names:
            raise ValueError(f"models[{i}]: two models are named {m['name']!r}")
        names.add(m["name"])
        tokens, iters = m["tokens"] or d["tokens"], m["train_iters"] or d["train_iters"]
        if bool(tokens) == bool(iters):
            raise ValueError(f"models[{i}] ({m['name']}): give exactly one of tokens and train_iters "
                             "(at the top level or per model)")
        m["train_iters"] = _positive_int(iters, f"models[{i}].train_iters") if iters else \
            math.ceil(_positive_int(tokens, f"models[{i}].tokens") / (gb * s))
        m["lr"] = float(m["lr"] or d["lr"])
        models.append(m)
    d["models"] = models
    data = d["data"]
    modes = [k for k in ("stdlib_corpus", "train", "mock") if data[k] or k == "stdlib_corpus" and data[k] is not None]
    if len(modes) != 1:
        raise ValueError("data needs exactly one of stdlib_corpus, train (an indexed dataset prefix) and mock: true")
    if data["mock"] and not data["eval"]:
        raise ValueError("data: mock training data needs an eval dataset prefix (data.eval) for the positional loss")
    if data["stdlib_corpus"] is not None:
        data.update(train="{out}/data/train", eval="{out}/data/eval", tokenizer_type="SentencePieceTokenizer",
                    tokenizer_model="{out}/data/spm.model", split="100,0,0")
    data["eval"] = data["eval"] or data["train"]
    e = d["eval"]
    if _positive_int(e["bucket_width"], "eval.bucket_width") > s:
        raise ValueError(f"eval.bucket_width ({e['bucket_width']}) is larger than seq_length ({s})")
    e["trailing_tokens"] = _positive_int(e["trailing_tokens"] or e["bucket_width"], "eval.trailing_tokens")
    if e["trailing_tokens"] > s:
        raise ValueError(f"eval.trailing_tokens ({e['trailing_tokens']}) is larger than seq_length ({s})")
    if not isinstance(d["launch"]["env"], dict):
        raise ValueError("launch.env must be a mapping of environment variables")
    d["launch"]["env"] = {str(k): str(v) for k, v in d["launch"]["env"].items()}
    if not isinstance(d["extra_args"], list):
        raise ValueError("extra_args must be a list of command-line words")
    d["extra_args"] = [str(a) for a in d["extra_args"]]
    return d


def load_description(path: str) -> dict:
    """A YAML (or JSON) sweep description, validated; errors name the file."""
    import yaml
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such sweep description")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
        return validate(raw if raw is not None else {})
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML or JSON: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def non_embedding_params(layers: int, hidden: int, heads: int, query_groups: Optional[int] = None,
                         ffn_hidden: Optional[int] = None, swiglu: bool = False, bias: bool = True,
                         layernorm: bool = False) -> int:
    """Parameters of a megatron GPT outside the embeddings and the output layer."""
    kv, groups, ffn = hidden // heads, query_groups or heads, ffn_hidden or 4 * hidden
    norm = hidden * (2 if layernorm else 1)
    qkv = hidden * kv * (heads + 2 * groups) + (kv * (heads + 2 * groups) if bias else 0)
    proj = heads * kv * hidden + (hidden if bias else 0)
    fc1 = hidden * ffn * (2 if swiglu else 1) + (ffn * (2 if swiglu else 1) if bias else 0)
    fc2 = ffn * hidden + (hidden if bias else 0)
    return layers * (2 * norm + qkv + proj + fc1 + fc2) + norm


@dataclass
class Run:
    name: str
    model: dict
    variant: str
    directory: str
    train_iters: int
    argv: List[str] = field(default_factory=list)
    params: int = 0                 # N, non-embedding
    tokens: int = 0                 # D

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.directory, "ckpt")

    @property
    def compute_pflops_days(self) -> float:
        return 6.0 * self.params * self.tokens / PFLOPS_DAY

    def done(self) -> bool:
        from megatron_moba.training.checkpointing import LATEST
        path = os.path.join(self.checkpoint, LATEST)
        return os.path.isfile(path) and open(path).read().strip() == str(self.train_iters)


def data_paths(desc: dict, out: str) -> dict:
    return {k: v.replace("{out}", out) if isinstance(v, str) else v for k, v in desc["data"].items()}


def plan_runs(desc: dict, out: str) -> List[Run]:
    """Every (model, variant) run with its pretraining flags, N and D."""
    from megatron_moba.training.arguments import parse_args
    out = os.path.abspath(out)
    data, moba = data_paths(desc, out), desc["moba"]
    s, gb = desc["seq_length"], desc["global_batch"]
    if data["mock"]:
        data_flags = ["--mock-data"]
    else:
        data_flags = ["--data-path", data["train"], "--split", data["split"],
                      "--data-cache-path", os.path.join(out, "data", "cache")]
    data_flags += ["--tokenizer-type", data["tokenizer_type"]]
    data_flags += ["--tokenizer-model", data["tokenizer_model"]] if data["tokenizer_model"] else []
    data_flags += ["--vocab-size", str(data["vocab_size"])] if data["vocab_size"] else []
    runs = []
    for m in desc["models"]:
        iters = m["train_iters"]
        warmup = desc["warmup_iters"] if desc["warmup_iters"] is not None else min(max(1, iters // 10), iters - 1)
        model_flags = ["--num-layers", m["layers"], "--hidden-size", m["hidden"], "--num-attention-heads", m["heads"]]
        model_flags += ["--num-query-groups", m["query_groups"]] if m["query_groups"] else []
        model_flags += ["--ffn-hidden-size", m["ffn_hidden"]] if m["ffn_hidden"] else []
        for variant in desc["variants"]:
            name = f"{m['name']}-{variant}"
            directory = os.path.join(out, "runs", name)
            ckpt = os.path.join(directory, "ckpt")
            attention = ["--attention", variant] + (
                ["--moba-chunk-size", moba["chunk"], "--moba-topk", moba["topk"],
                 "--moba-full-attn-layers", moba["full_attn_layers"]] if variant == "moba" else [])
            argv = [str(a) for a in model_flags + attention + [
                "--seq-length", s, "--micro-batch-size", desc["micro_batch"], "--global-batch-size", gb,
                "--train-iters", iters, "--lr", m["lr"], "--min-lr", desc["min_lr"] if desc["min_lr"] is not None
                else m["lr"] / 10, "--lr-warmup-iters", warmup, "--seed", desc["seed"],
                "--log-interval", min(max(1, iters // 10), iters - 1), "--save", ckpt, "--load", ckpt,
                "--metrics-file", os.path.join(directory, "metrics.jsonl")] + data_flags] + desc["extra_args"]
            try:
                args = parse_args(argv, world_size=desc["launch"]["nproc_per_node"])
            except SystemExit:
                raise ValueError(f"run {name}: the pretraining job rejects its flags (message above): "
                                 f"{shlex.join(argv)}") from None
            params = non_embedding_params(m["layers"], m["hidden"], m["heads"], args.num_query_groups,
                                          args.ffn_hidden_size, args.swiglu, not args.disable_bias_linear,
                                          args.normalization == "LayerNorm")
            runs.append(Run(name, m, variant, directory, iters, argv, params, iters * gb * s))
    return runs


def launch_command(run: Run, desc: dict, python: str = "python") -> List[str]:
    n = desc["launch"]["nproc_per_node"]
    head = ["torchrun", "--nproc-per-node", str(n)] if n > 1 else [python]
    return head + ["-m", "megatron_moba.pretrain"] + run.argv


def prepare_data(desc: dict, out: str, write_corpus: Optional[Callable] = None, log=print) -> None:
    """For ``data.stdlib_corpus``: corpus JSONL (``write_corpus(path, max_bytes)``, default
    ``preprocess.stdlib_corpus``), every eval_every-th
    document held out for evaluation, SentencePiece trained on the rest, two indexed datasets."""
    cfg = desc["data"]["stdlib_corpus"]
    paths = data_paths(desc, os.path.abspath(out))
    if cfg is None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        for key in ("eval",) if paths["mock"] else ("train", "eval"):
            if not IndexedDataset.exists(paths[key]):
                raise ValueError(f"data.{key}: {paths[key]}.bin/.idx not found")
        return
    if all(os.path.exists(p) for p in (paths["train"] + ".idx", paths["eval"] + ".idx", paths["tokenizer_model"])):
        return
    from megatron_moba.training.preprocess import build_indexed_dataset, stdlib_corpus, train_sentencepiece
    write_corpus = write_corpus or stdlib_corpus
    corpus = os.path.join(os.path.dirname(paths["train"]), "corpus.jsonl")
    os.makedirs(os.path.dirname(corpus), exist_ok=True)
    n = write_corpus(corpus, cfg["max_bytes"])
    texts = [json.loads(line)["text"] for line in open(corpus)]
    every = cfg["eval_every"]
    train = [t for i, t in enumerate(texts) if i % every != every - 1]
    held_out = [t for i, t in enumerate(texts) if i % every == every - 1]
    if not held_out or not train:
        raise ValueError(f"data.stdlib_corpus: {n} documents, eval_every {every}: nothing left to "
                         f"{'evaluate' if train else 'train'} on")
    tok = train_sentencepiece(iter(train), paths["tokenizer_model"][:-len(".model")], cfg["vocab_size"])
    stats = [build_indexed_dataset(iter(t), paths[k], "SentencePieceTokenizer", tok, progress=False)
             for k, t in (("train", train), ("eval", held_out))]
    log(f"data: {n} documents -> {stats[0]['tokens']} training tokens ({stats[0]['documents']} documents), "
        f"{stats[1]['documents']} held-out documents ({stats[1]['tokens']} tokens), vocabulary {stats[0]['vocab_size']}")


def slurm_script(runs: List[Run], desc: dict, out: str, description_path: str, python_bin: Optional[str] = None) -> str:
    """A Slurm array script, one task per run; a task whose final checkpoint exists does nothing.
    ``python_bin``: the directory of the python (and torchrun) to run, put first on PATH."""
    sl, n = desc["slurm"], desc["launch"]["nproc_per_node"]
    gpus = n if sl["gpus_per_task"] is None else sl["gpus_per_task"]
    out = os.path.abspath(out)
    lines = ["#!/bin/bash",
             f"# Scaling sweep {desc['name']!r}: {len(runs)} training runs, one array task each.",
             "#   submit with sbatch; when every task has finished, evaluate, tabulate and fit with:",
             f"#   python tools/scaling_sweep.py {description_path} --out {out}",
             f"#SBATCH --job-name=moba-sweep-{desc['name']}", f"#SBATCH --array=0-{len(runs) - 1}",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={sl['cpus_per_task']}",
             f"#SBATCH --time={sl['time']}", f"#SBATCH --output={out}/slurm/%A_%a.out"]
    lines += [f"#SBATCH --gpus-per-task={gpus}"] if gpus else []
    lines += [f"#SBATCH --partition={sl['partition']}"] if sl["partition"] else []
    lines += [f"#SBATCH --account={sl['account']}"] if sl["account"] else []
    lines += [f"#SBATCH {x}" for x in sl["extra"]]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines += ["set -euo pipefail", f"cd {shlex.quote(repo)}"]
    lines += [f'export PATH={shlex.quote(python_bin)}:"$PATH"'] if python_bin else []
    lines += [f"export {k}={shlex.quote(v)}" for k, v in desc["launch"]["env"].items()]
    lines += ['case "${SLURM_ARRAY_TASK_ID}" in']
    for i, r in enumerate(runs):
        latest = shlex.quote(os.path.join(r.checkpoint, "latest_checkpointed_iteration.txt"))
        lines += [f"  {i})  # {r.name}",
                  f'    if [ "$(cat {latest} 2>/dev/null)" = "{r.train_iters}" ]; then echo "{r.name}: done"; exit 0; fi',
                  f"    mkdir -p {shlex.quote(r.directory)}",
                  f"    {shlex.join(launch_command(r, desc))} ;;"]
    lines += ['  *) echo "no run for task ${SLURM_ARRAY_TASK_ID}" >&2; exit 1 ;;', "esac", ""]
    return "\n".join(lines)


def train_locally(runs: List[Run], desc: dict, python: str, log=print) -> None:
    """Train every run that has no final checkpoint yet, one after another (output in RUN/train.log)."""
    import subprocess
    import time
    for i, r in enumerate(runs, 1):
        if r.done():
            log(f"[{i}/{len(runs)}] {r.name}: final checkpoint exists, skipped")
            continue
        os.makedirs(r.directory, exist_ok=True)
        logfile = os.path.join(r.directory, "train.log")
        log(f"[{i}/{len(runs)}] {r.name}: training {r.train_iters} iterations (N {r.params:,}, D {r.tokens:,}; "
            f"log {logfile})")
        t0 = time.time()
        with open(logfile, "w") as f:
            path = os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")      # its torchrun too
            code = subprocess.call(launch_command(r, desc, python), stdout=f, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PATH=path, **desc["launch"]["env"]))
        tail = open(logfile).read().splitlines()
        if code != 0 or not r.done():
            raise RuntimeError(f"run {r.name} failed (exit code {code}); last lines of {logfile}:\n  " +
                               "\n  ".join(tail[-15:]))
        last = next((x for x in reversed(tail) if x.startswith("iteration")), "")
        log(f"    done in {time.time() - t0:.0f} s: {last[:60]}")


def evaluate_runs(runs: List[Run], desc: dict, out: str, log=print) -> list:
    """Positional loss of every run's final checkpoint (cached in RUN/positional_loss.json)."""
    from megatron_moba.eval.positional_loss import evaluate_checkpoint, read_documents
    e, eval_prefix = desc["eval"], data_paths(desc, os.path.abspath(out))["eval"]
    settings = dict(data=eval_prefix, seq_length=desc["seq_length"], bucket_width=e["bucket_width"],
                    trailing_tokens=e["trailing_tokens"], num_docs=e["num_docs"])
    docs, results = None, []
    threads = desc["launch"]["env"].get("OMP_NUM_THREADS")
    if threads:                                  # the runs' thread count applies to their evaluation too
        import torch
        torch.set_num_threads(int(threads))
    for r in runs:
        if not r.done():
            raise ValueError(f"run {r.name} has no final checkpoint (iteration {r.train_iters}) in {r.checkpoint}")
        path = os.path.join(r.directory, "positional_loss.json")
        latest = os.path.join(r.checkpoint, "latest_checkpointed_iteration.txt")
        settings.update(iteration=r.train_iters, saved=os.path.getmtime(latest) if os.path.exists(latest) else None)
        cached = {}
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
        if cached.get("settings") == settings:
            results.append(cached["result"])
            continue
        if docs is None:
            docs = read_documents(eval_prefix, desc["seq_length"] + 1, e["num_docs"])
        log(f"evaluating {r.name} on {len(docs)} documents of {eval_prefix}")
        result = evaluate_checkpoint(r.checkpoint, docs, e["bucket_width"], e["trailing_tokens"],
                                     micro_batch_size=e["micro_batch"], label=r.name)
        with open(path, "w") as f:
            json.dump(dict(settings=settings, result=result), f, indent=1)
        results.append(result)
    return results


TABLE_FIELDS = ("variant", "bucket", "compute_pflops_days", "loss", "model", "non_embedding_params", "train_tokens",
                "layers", "hidden", "heads", "seq_length", "train_iters", "kind", "start", "end", "eval_tokens",
                "eval_documents", "checkpoint")


def table_rows(runs: List[Run], results: list) -> list:
    """One row per run and bucket (and "all", "last N"), ready for tools/fit_scaling.py."""
    from megatron_moba.eval.positional_loss import result_rows
    rows = []
    for r, res in zip(runs, results):
        for b in result_rows(res):
            if b["loss"] is None:
                continue
            rows.append(dict(variant=r.variant, bucket=b["bucket"], compute_pflops_days=r.compute_pflops_days,
                             loss=b["loss"], model=r.model["name"], non_embedding_params=r.params,
                             train_tokens=r.tokens, layers=r.model["layers"], hidden=r.model["hidden"],
                             heads=r.model["heads"], seq_length=res["seq_length"], train_iters=r.train_iters,
                             kind=b["kind"], start=b["start"], end=b["end"], eval_tokens=b["tokens"],
                             eval_documents=b["documents"], checkpoint=r.checkpoint))
    return rows


def write_table(rows: list, path: str) -> str:
    import csv
    if not rows:
        raise ValueError("the sweep produced no table rows (no run evaluated)")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path
