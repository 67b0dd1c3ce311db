#!/usr/bin/env python
"""Long context in miniature: continued pretraining of the CPU scaling study's largest MoBA/full pair
from 2048 to 8192 tokens, as users extend a released model's context (the MoBA paper: Llama-3.1-8B
from 128K to 1M with MoBA, last layers full attention).

    python examples/continued_pretraining_cpu.py --sweep runs/sweeps/cpu-small --out runs/long_context_cpu \
        --publish benchmarks/results/long_context_cpu

1. From each final checkpoint of the study's largest model (trained at 2048, RoPE base 10000):
   `python -m megatron_moba.pretrain --load SRC --finetune` at --seq-length 8192 with the RoPE base
   raised (--rotary-base), MoBA chunk 512, top-3, last layer full attention from the MoBA run, full
   attention from the full run, on the same tokens (the study's training data) in the same order.
2. Positional loss at 8192 (buckets of 1024) on the study's held-out documents, and passkey
   retrieval (megatron_moba.eval.needle) at 2K, 4K and 8K, before (the 2048-token checkpoints,
   evaluated past their length) and after.
3. The continued MoBA model exported to Hugging Face (hf.convert), loaded by transformers with
   attn_implementation="moba", and the same passkey prompts run through it: its answers are
   compared with the megatron evaluation's.
Writes OUT/: positional.json/.csv, positional_8k.png, needle.json/.csv, needle.png, hf_passkey.json,
summary.json (settings, wall times, commit, versions).  A finished step is not redone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from megatron_moba.eval import needle, positional_loss, sweep
from megatron_moba.eval.sweep.launch import provenance
from megatron_moba.training.logs import quiet_absent_backend_warnings

quiet_absent_backend_warnings()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_flags(argv: list, values: dict) -> list:
    """``argv`` with each flag of ``values`` set (replaced where present, else appended); a value of
    None drops the flag and its arguments."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in values:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        out.append(argv[i])
        i += 1
    for flag, value in values.items():
        if value is not None:
            out += [flag] + ([str(v) for v in value] if isinstance(value, (list, tuple)) else
                             [] if value is True else [str(value)])
    return out


def continue_run(source: sweep.Run, desc: dict, args, out: str, log=print) -> str:
    """Train ``source``'s final checkpoint on at --seq-length args.seq_length; returns the checkpoint."""
    from megatron_moba.training.checkpointing import LATEST, read_latest
    directory = os.path.join(out, "runs", source.variant)
    ckpt = os.path.join(directory, "ckpt")
    if os.path.isfile(os.path.join(ckpt, LATEST)) and read_latest(ckpt) == args.train_iters:
        log(f"{source.variant}: continued checkpoint exists, skipped")
        return ckpt
    started = os.path.isfile(os.path.join(ckpt, LATEST))        # resume this run, else start from the source
    flags = {"--seq-length": args.seq_length, "--rotary-base": args.rotary_base, "--train-iters": args.train_iters,
             "--global-batch-size": args.global_batch, "--micro-batch-size": args.global_batch,
             "--lr": args.lr, "--min-lr": args.lr / 10, "--lr-warmup-iters": max(1, args.train_iters // 10),
             "--log-interval": max(1, args.train_iters // 10), "--save": ckpt,
             "--load": ckpt if started else source.checkpoint, "--finetune": None if started else True,
             "--metrics-file": os.path.join(directory, "metrics.jsonl")}
    if source.variant == "moba":
        flags.update({"--moba-chunk-size": args.moba_chunk, "--moba-topk": args.moba_topk,
                      "--moba-full-attn-layers": args.moba_full_layers})
    argv = set_flags(source.argv, flags)
    os.makedirs(directory, exist_ok=True)
    log(f"{source.variant}: continuing {source.checkpoint} at {args.seq_length} tokens, {args.train_iters} "
        f"iterations (log {directory}/train.log)")
    t0 = time.time()
    with open(os.path.join(directory, "train.log"), "w") as f:
        code = subprocess.call([sys.executable, "-m", "megatron_moba.pretrain"] + argv, stdout=f,
                               stderr=subprocess.STDOUT, env=dict(os.environ, **desc["launch"]["env"]))
    if code != 0 or read_latest(ckpt) != args.train_iters:
        raise RuntimeError(f"continued pretraining of {source.name} failed (exit code {code}): "
                           f"see {directory}/train.log")
    with open(os.path.join(directory, "run.json"), "w") as f:
        json.dump(dict(source=source.name, argv=argv, wall_s=round(time.time() - t0, 1),
                       tokens=args.train_iters * args.global_batch * args.seq_length, **provenance()), f, indent=1)
    log(f"{source.variant}: done in {time.time() - t0:.0f} s")
    return ckpt


def hf_config_for(load_dir: str) -> dict:
    """A transformers Llama config with the architecture a checkpoint of the job was trained with."""
    from transformers import LlamaConfig

    from megatron_moba.eval.checkpoint import saved_args
    from megatron_moba.training.tokenizer import build_tokenizer
    a = saved_args(load_dir)
    if a.normalization != "RMSNorm" or not a.swiglu or not a.disable_bias_linear or not \
            a.untie_embeddings_and_output_weights:
        raise ValueError(f"{load_dir}: only RMSNorm/SwiGLU/no-bias/untied models have a Llama equivalent")
    tok = build_tokenizer(a.tokenizer_type, a.tokenizer_model, a.vocab_size)
    return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=a.hidden_size,
                       intermediate_size=a.ffn_hidden_size or 4 * a.hidden_size, num_hidden_layers=a.num_layers,
                       num_attention_heads=a.num_attention_heads,
                       num_key_value_heads=a.num_query_groups or a.num_attention_heads,
                       max_position_embeddings=a.max_position_embeddings or a.seq_length,
                       rms_norm_eps=a.norm_epsilon, rope_theta=float(a.rotary_base), tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, bos_token_id=tok.bos if hasattr(tok, "bos") else None,
                       eos_token_id=tok.eod).to_dict()


def hf_passkey(load_dir: str, hf_dir: str, megatron_rows: list, lengths, depths, passkeys, batch_size) -> dict:
    """Export ``load_dir`` to ``hf_dir``, run the passkey prompts through transformers with
    attn_implementation="moba", compare every prediction with the megatron evaluation's."""
    import torch
    from transformers import AutoModelForCausalLM

    import megatron_moba.hf  # noqa: F401  (registers attn_implementation="moba")
    from megatron_moba.eval.checkpoint import load_for_eval, saved_args
    from megatron_moba.hf.convert import run_export
    from megatron_moba.training.tokenizer import build_tokenizer
    if not os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        source = os.path.join(os.path.dirname(hf_dir), "hf_config_source")   # read back as the export reads HF
        os.makedirs(source, exist_ok=True)
        with open(os.path.join(source, "config.json"), "w") as f:
            json.dump(hf_config_for(load_dir), f, indent=1)
        run_export(load_dir, hf_dir, source)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="moba", dtype=torch.float32).eval()
    a = saved_args(load_dir)
    tokenizer = build_tokenizer(a.tokenizer_type, a.tokenizer_model, a.vocab_size)

    @torch.no_grad()
    def logits(tokens):                                                     # [b, n] -> [b, n, vocab]
        return model(input_ids=tokens).logits.float()
    rows = needle.evaluate(logits, needle.PromptBuilder(tokenizer), lengths, depths, passkeys, batch_size)
    same = total = 0
    for hf_row in rows:
        mg = next(r for r in megatron_rows if r["length"] == hf_row["length"] and r["depth"] == hf_row["depth"])
        same += sum(p == q for p, q in zip(hf_row["predictions"], mg["predictions"]))
        total += len(hf_row["predictions"])
    # the logits themselves, on the longest prompt
    prompt = torch.tensor([needle.PromptBuilder(tokenizer).build(max(lengths), 0.5, passkeys[0]).tokens])
    mg_model, _, _ = load_for_eval(load_dir, seq_length=max(max(lengths), a.seq_length))
    diff = (needle.model_logits_fn(mg_model, tokenizer.vocab_size)(prompt) - logits(prompt)).abs().max().item()
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    return dict(hf_dir=hf_dir, rows=rows, same_predictions=same, trials=total, max_abs_logit_diff=diff,
                logit_diff_prompt_tokens=prompt.shape[1],
                accuracy_hf=sum(r["correct"] for r in rows) / total,
                accuracy_megatron=sum(r["correct"] for r in megatron_rows) / total,
                config={k: cfg.get(k) for k in ("moba_chunk_size", "moba_topk", "moba_full_attn_layers",
                                                "max_position_embeddings", "rope_theta", "rope_parameters")})


def plot(positional: list, needle_rows: list, out: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in positional:
        pts = [((b["start"] + b["end"]) / 2, b["loss"]) for b in r["buckets"] if b["loss"] is not None]
        color = "tab:blue" if r["label"].startswith("moba") else "tab:red"
        ax.plot(*zip(*pts), "o-" if r["label"].endswith("after") else "s:", color=color, label=r["label"])
    ax.set_xlabel("position in document (tokens, bucket midpoint)")
    ax.set_ylabel("LM loss")
    ax.set_title("LM loss by position at 8192 tokens, before and after continued pretraining")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [os.path.join(out, "positional_8k.png")]
    fig.savefig(paths[0], dpi=130)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    labels = sorted({r["label"] for r in needle_rows}, key=lambda s: (s.split("-")[0], s.endswith("after")))
    lengths = sorted({r["length"] for r in needle_rows})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        acc = [sum(r["correct"] for r in needle_rows if r["label"] == label and r["length"] == n) /
               sum(r["trials"] for r in needle_rows if r["label"] == label and r["length"] == n) for n in lengths]
        ax.bar([j + i * width for j in range(len(lengths))], acc, width, label=label,
               color="tab:blue" if label.startswith("moba") else "tab:red", alpha=1.0 if "after" in label else 0.45)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [f"{n // 1024}K" for n in lengths])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("passkey accuracy")
    ax.set_title("Passkey retrieval by prompt length (all depths)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "needle.png"))
    fig.savefig(paths[1], dpi=130)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=os.path.join(ROOT, "examples", "sweeps", "cpu-small.yaml"))
    p.add_argument("--sweep", required=True, help="the scaling sweep's output directory (its runs are trained)")
    p.add_argument("--model", default=None, help="the model of the sweep to continue (default: the largest)")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--rotary-base", type=int, default=40000, help="RoPE base of the continued runs (trained: 10000)")
    p.add_argument("--train-iters", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--moba-chunk", type=int, default=512)
    p.add_argument("--moba-topk", type=int, default=3)
    p.add_argument("--moba-full-layers", type=int, default=1)
    p.add_argument("--bucket-width", type=int, default=1024)
    p.add_argument("--needle-lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--needle-depths", type=float, nargs="+", default=[0.25, 0.75])
    p.add_argument("--needle-trials", type=int, default=3)
    p.add_argument("--num-docs", type=int, default=48, help="held-out documents for the positional loss")
    p.add_argument("--publish", metavar="DIR", help="copy the results (not the checkpoints) to DIR")
    args = p.parse_args(argv)
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")
    t_start = time.time()
    desc = sweep.load_description(args.preset)
    runs = sweep.plan_runs(desc, args.sweep)
    model = args.model or max(runs, key=lambda r: r.params).model["name"]
    sources = {r.variant: r for r in runs if r.model["name"] == model}
    if set(sources) != {"moba", "full"} or not all(r.done() for r in sources.values()):
        print(f"error: {args.sweep} has no finished MoBA and full runs of {model}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    threads = desc["launch"]["env"].get("OMP_NUM_THREADS")
    if threads:
        import torch
        torch.set_num_threads(int(threads))
    walls = {}
    t0 = time.time()
    after = {v: continue_run(sources[v], desc, args, args.out) for v in ("moba", "full")}
    walls["training"] = time.time() - t0
    loads = [(f"{v}-before", sources[v].checkpoint) for v in ("moba", "full")] + \
            [(f"{v}-after", after[v]) for v in ("moba", "full")]
    t0 = time.time()
    pos_path = os.path.join(args.out, "positional.json")
    if not os.path.isfile(pos_path):
        docs = positional_loss.read_documents(sweep.data_paths(desc, os.path.abspath(args.sweep))["eval"],
                                              args.seq_length + 1, args.num_docs)
        results = [positional_loss.evaluate_checkpoint(load, docs, args.bucket_width, args.bucket_width,
                                                       seq_length=args.seq_length, label=label)
                   for label, load in loads]
        positional_loss.write_results(results, args.out, "positional")
    with open(pos_path) as f:
        positional = json.load(f)
    walls["positional"] = time.time() - t0
    t0 = time.time()
    needle_path = os.path.join(args.out, "needle.json")
    batch = len(args.needle_depths) * args.needle_trials             # a prompt length's trials in one batch
    if not os.path.isfile(needle_path):
        needle.run([load for _, load in loads], args.needle_lengths, args.out, [label for label, _ in loads],
                   depths=args.needle_depths, trials=args.needle_trials, batch_size=batch,
                   progress=False)
    with open(needle_path) as f:
        needle_rows = json.load(f)
    walls["needle"] = time.time() - t0
    t0 = time.time()
    hf_path = os.path.join(args.out, "hf_passkey.json")
    if not os.path.isfile(hf_path):
        mine = [r for r in needle_rows if r["label"] == "moba-after"]
        result = hf_passkey(after["moba"], os.path.join(args.out, "hf_moba"), mine, args.needle_lengths,
                            sorted(args.needle_depths), needle.make_passkeys(args.needle_trials), batch)
        with open(hf_path, "w") as f:
            json.dump(result, f, indent=1)
    with open(hf_path) as f:
        hf = json.load(f)
    walls["hf_passkey"] = time.time() - t0
    figures = plot(positional, needle_rows, args.out)
    runs_meta = {}
    for v in ("moba", "full"):
        with open(os.path.join(args.out, "runs", v, "run.json")) as f:
            runs_meta[v] = json.load(f)
    summary = dict(model=model, settings=vars(args), runs=runs_meta, wall_s_this_call={k: round(x, 1) for k, x in
                                                                                       walls.items()},
                   wall_s_total_this_call=round(time.time() - t_start, 1),
                   hf_same_predictions=f"{hf['same_predictions']}/{hf['trials']}",
                   hf_max_abs_logit_diff=hf["max_abs_logit_diff"], **provenance())
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for r in positional:
        print(f"{r['label']:>12}: loss {r['overall_loss']:.4f}, last {r['trailing_tokens']} {r['trailing_loss']:.4f}")
    for label in [x for x, _ in loads]:
        mine = [r for r in needle_rows if r["label"] == label]
        print(f"{label:>12}: passkey " + ", ".join(
            f"{n}: {sum(r['correct'] for r in mine if r['length'] == n)}/"
            f"{sum(r['trials'] for r in mine if r['length'] == n)}" for n in args.needle_lengths))
    print(f"transformers (attn_implementation='moba') gave the megatron model's answer in "
          f"{hf['same_predictions']}/{hf['trials']} passkey trials; logits differ by at most "
          f"{hf['max_abs_logit_diff']:.2e} on a {hf['logit_diff_prompt_tokens']}-token prompt")
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        names = ["positional.json", "positional.csv", "needle.json", "needle.csv", "hf_passkey.json", "summary.json"]
        for name in names + [os.path.basename(x) for x in figures]:
            shutil.copyfile(os.path.join(args.out, name), os.path.join(args.publish, name))
        for v in ("moba", "full"):
            shutil.copyfile(os.path.join(args.out, "runs", v, "metrics.jsonl"),
                            os.path.join(args.publish, f"metrics_{v}.jsonl"))
        print(f"published to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
