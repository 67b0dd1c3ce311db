"""The runs of a sweep: one per (model size, variant), each with its ``python -m
megatron_moba.pretrain`` flags (checked by the pretraining job's own parser), its directory and
checkpoint, N (``non_embedding_params``: parameters outside the embeddings and the output layer)
and D (training tokens).  Compute is C = 6·N·D FLOPs, in PFLOP/s-days (``PFLOPS_DAY`` FLOPs).

Layout under the sweep's output directory OUT::

    OUT/data/                   built data (``data.stdlib_corpus``) and the datasets' index cache
    OUT/runs/NAME/ckpt/         a run's checkpoints (NAME = MODEL-VARIANT, e.g. L2-H64-moba)
    OUT/runs/NAME/metrics.jsonl its training metrics

With ``curve.points`` every run also saves at those fractions of its iterations (a learning curve).
The ``hybrid`` variant (MoBA/full hybrid, the MoBA paper's pretraining recipe) is the moba run
continued from its checkpoint at ``hybrid.switch`` of the iterations with full attention: the
same weights, optimizer state, schedule and data position (``switch_iteration``, ``source``).
"""
from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from typing import List, Optional

PFLOPS_DAY = 8.64e19


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
    """One training run of the sweep: a model size trained with one attention variant."""
    name: str
    model: dict
    variant: str
    directory: str
    train_iters: int
    argv: List[str] = field(default_factory=list)
    params: int = 0                 # N, non-embedding
    tokens: int = 0                 # D
    curve: List[int] = field(default_factory=list)     # the iterations of its learning curve (the last: train_iters)
    switch_iteration: Optional[int] = None             # hybrid: full attention from this iteration on
    source: Optional["Run"] = None                     # hybrid: the moba run it continues

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.directory, "ckpt")

    @property
    def compute_pflops_days(self) -> float:
        return 6.0 * self.params * self.tokens / PFLOPS_DAY

    @property
    def latest(self) -> str:
        """The checkpoint tracker: the file naming the iteration of the newest complete checkpoint."""
        from megatron_moba.training.checkpointing import LATEST
        return os.path.join(self.checkpoint, LATEST)

    def done(self) -> bool:
        """The final checkpoint (iteration ``train_iters``) is saved."""
        from megatron_moba.training.checkpointing import read_latest
        if not os.path.isfile(self.latest):
            return False
        try:
            return read_latest(self.checkpoint) == self.train_iters
        except ValueError:                  # a damaged tracker: not done (the training run reports it)
            return False


def data_paths(desc: dict, out: str) -> dict:
    """The description's ``data`` with ``{out}`` (the sweep's output directory) filled in."""
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
    def flags(m: dict, variant: str, iters: int, directory: str, saves=()) -> List[str]:
        warmup = desc["warmup_iters"] if desc["warmup_iters"] is not None else min(max(1, iters // 10), iters - 1)
        model_flags = ["--num-layers", m["layers"], "--hidden-size", m["hidden"], "--num-attention-heads", m["heads"]]
        model_flags += ["--num-query-groups", m["query_groups"]] if m["query_groups"] else []
        model_flags += ["--ffn-hidden-size", m["ffn_hidden"]] if m["ffn_hidden"] else []
        ckpt = os.path.join(directory, "ckpt")
        attention = ["--attention", "full" if variant == "hybrid" else variant] + (
            ["--moba-chunk-size", moba["chunk"], "--moba-topk", moba["topk"],
             "--moba-full-attn-layers", moba["full_attn_layers"]] if variant == "moba" else [])
        return [str(a) for a in model_flags + attention + [
            "--seq-length", s, "--micro-batch-size", desc["micro_batch"], "--global-batch-size", gb,
            "--train-iters", iters, "--lr", m["lr"], "--min-lr", desc["min_lr"] if desc["min_lr"] is not None
            else m["lr"] / 10, "--lr-warmup-iters", warmup, "--seed", desc["seed"],
            "--log-interval", 1 if saves else min(max(1, iters // 10), iters - 1), "--save", ckpt, "--load", ckpt,
            "--metrics-file", os.path.join(directory, "metrics.jsonl")] + data_flags] + (
            ["--save-iterations"] + [str(i) for i in saves] if saves else []) + desc["extra_args"]

    def parsed(name: str, argv: List[str]):
        try:
            return parse_args(argv, world_size=desc["launch"]["nproc_per_node"])
        except SystemExit:
            raise ValueError(f"run {name}: the pretraining job rejects its flags (message above): "
                             f"{shlex.join(argv)}") from None

    def params_of(m: dict, args) -> int:
        return non_embedding_params(m["layers"], m["hidden"], m["heads"], args.num_query_groups,
                                    args.ffn_hidden_size, args.swiglu, not args.disable_bias_linear,
                                    args.normalization == "LayerNorm")

    runs = []
    for m in desc["models"]:
        iters = m["train_iters"]
        if iters is None:               # tokens_per_param: D = ratio x N, rounded up to whole iterations
            probe = parsed(m["name"], flags(m, desc["variants"][0], 2, os.path.join(out, "runs", m["name"])))
            iters = math.ceil(desc["tokens_per_param"] * params_of(m, probe) / (gb * s))
            if iters < 2:
                raise ValueError(f"models {m['name']}: tokens_per_param {desc['tokens_per_param']} gives "
                                 f"{iters} iteration(s); a run needs at least 2")
        points = desc["curve"]["points"] or [1.0]
        curve = sorted({min(iters, max(1, round(f * iters))) for f in points})
        hybrid = "hybrid" in desc["variants"] and m["name"] in (desc["hybrid"]["models"] or [m["name"]])
        switch = min(iters - 1, max(1, round(desc["hybrid"]["switch"] * iters))) if hybrid else None
        by_variant = {}
        for variant in sorted(desc["variants"], key=("moba", "full", "hybrid").index):
            if variant == "hybrid" and not hybrid:
                continue
            name = f"{m['name']}-{variant}"
            directory = os.path.join(out, "runs", name)
            own = [i for i in curve if i > switch] if variant == "hybrid" else curve
            saves = sorted(set(own + ([switch] if variant == "moba" and hybrid else [])) - {iters})
            argv = flags(m, variant, iters, directory, saves)
            params = params_of(m, parsed(name, argv))
            run = Run(name, m, variant, directory, iters, argv, params, iters * gb * s, curve)
            if variant == "hybrid":
                run.switch_iteration, run.source = switch, by_variant["moba"]
            by_variant[variant] = run
            runs.append(run)
    return runs
