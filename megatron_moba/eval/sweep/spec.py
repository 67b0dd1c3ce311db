"""The sweep description: its schema (every key, its default, nested keys), ``validate`` (defaults
filled in, values checked, per-model iterations derived from tokens; errors name the key) and
``load_description`` (a YAML or JSON file, validated; errors name the file).

``tools/scaling_sweep.py --help`` lists the keys with their meaning; examples/sweeps/*.yaml are
complete descriptions.
"""
from __future__ import annotations

import copy
import math
import os

SCHEMA = {      # key -> (default, nested schema or None); REQUIRED marks keys without a default
    "name": ("sweep", None), "out": (None, None), "models": ("REQUIRED", None), "variants": (["moba", "full"], None),
    "seq_length": ("REQUIRED", None), "global_batch": ("REQUIRED", None), "micro_batch": (None, None),
    "tokens": (None, None), "train_iters": (None, None), "tokens_per_param": (None, None), "lr": (3e-4, None),
    "min_lr": (None, None),    "warmup_iters": (None, None), "seed": (1234, None), "extra_args": ([], None),
    "moba": ({}, {"chunk": (512, None), "topk": (3, None), "full_attn_layers": (0, None)}),
    "data": ("REQUIRED", {"stdlib_corpus": (None, {"max_bytes": (4_000_000, None), "vocab_size": (2048, None),
                                                   "eval_every": (10, None), "include_tests": (False, None),
                                                   "eval_min_bytes": (0, None)}),
                          "train": (None, None), "eval": (None, None), "mock": (False, None),
                          "tokenizer_type": ("NullTokenizer", None), "tokenizer_model": (None, None),
                          "vocab_size": (None, None), "split": ("100,0,0", None)}),
    "eval": ({}, {"bucket_width": (2048, None), "trailing_tokens": (None, None), "num_docs": (64, None),
                  "micro_batch": (1, None), "min_tokens": (2, None)}),
    "curve": ({}, {"points": (None, None)}),
    "hybrid": ({}, {"switch": (0.9, None), "models": (None, None)}),
    "fit": ({}, {"buckets": (None, None), "ratio_at": (None, None), "panels": (None, None),
                 "extend_decades": (1.0, None)}),
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
    bad = sorted(set(d["variants"]) - {"moba", "full", "hybrid"}) if isinstance(d["variants"], list) \
        else [d["variants"]]
    if bad or not d["variants"]:
        raise ValueError(f"variants must be a list of moba, full and/or hybrid, got {d['variants']!r}")
    if "hybrid" in d["variants"] and "moba" not in d["variants"]:
        raise ValueError("variants: hybrid (MoBA, then full attention from hybrid.switch on) continues the moba "
                         "run's checkpoint: list moba too")
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
        ratio = d["tokens_per_param"] if not (m["tokens"] or m["train_iters"]) else None
        if (bool(tokens) + bool(iters) + (ratio is not None)) != 1:
            raise ValueError(f"models[{i}] ({m['name']}): give exactly one of tokens, train_iters (at the top "
                             "level or per model) and tokens_per_param (top level)")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
                raise ValueError(f"tokens_per_param must be a positive number, got {ratio!r}")
            m["train_iters"] = None         # set by plan_runs from N: ceil(ratio * N / (global_batch * seq_length))
        else:
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
    _check_curve_and_hybrid(d)
    if not isinstance(d["launch"]["env"], dict):
        raise ValueError("launch.env must be a mapping of environment variables")
    d["launch"]["env"] = {str(k): str(v) for k, v in d["launch"]["env"].items()}
    if not isinstance(d["extra_args"], list):
        raise ValueError("extra_args must be a list of command-line words")
    d["extra_args"] = [str(a) for a in d["extra_args"]]
    f = d["fit"]
    if f["buckets"] is not None and not isinstance(f["buckets"], list):
        raise ValueError(f"fit.buckets must be a list of bucket names, got {f['buckets']!r}")
    f["buckets"] = [str(b) for b in f["buckets"]] if f["buckets"] else None
    if f["panels"] is not None and not isinstance(f["panels"], list):
        raise ValueError(f"fit.panels must be a list of bucket names, got {f['panels']!r}")
    f["panels"] = [str(b) for b in f["panels"]] if f["panels"] else None
    x = f["extend_decades"]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
        raise ValueError(f"fit.extend_decades must be a number >= 0, got {x!r}")
    at = f["ratio_at"]
    if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float)) or at <= 0):
        raise ValueError(f"fit.ratio_at must be a positive number of PFLOP/s-days, got {at!r}")
    return d


def _check_curve_and_hybrid(d: dict) -> None:
    points = d["curve"]["points"]
    if points is not None:
        if not isinstance(points, list) or not points or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1 for x in points):
            raise ValueError(f"curve.points must be a list of fractions of the training in (0, 1], got {points!r}")
        d["curve"]["points"] = sorted({float(x) for x in points} | {1.0})
    h = d["hybrid"]
    x = h["switch"]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < 1:
        raise ValueError(f"hybrid.switch must be a fraction of the training tokens in (0, 1), got {x!r}")
    names = [m["name"] for m in d["models"]]
    if h["models"] is not None:
        if not isinstance(h["models"], list) or any(str(n) not in names for n in h["models"]):
            raise ValueError(f"hybrid.models must be a list of model names ({', '.join(names)}), got {h['models']!r}")
        h["models"] = [str(n) for n in h["models"]]
    e = d["eval"]
    _positive_int(e["min_tokens"], "eval.min_tokens")
    c = d["data"]["stdlib_corpus"]
    if c is not None and (isinstance(c["eval_min_bytes"], bool) or not isinstance(c["eval_min_bytes"], int)
                          or c["eval_min_bytes"] < 0):
        raise ValueError(f"data.stdlib_corpus.eval_min_bytes must be an integer >= 0, got {c['eval_min_bytes']!r}")


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
